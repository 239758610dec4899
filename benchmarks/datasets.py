"""Dataset registry and reader for the folder layouts of the CoOp harness.

`read_dataset(name, data_root)` returns a `DatasetSplits`: image paths relative to one image
root, integer labels, class names in label order and the hand-crafted prompt template of the
CoOp zero-shot CLIP baseline. The data root is the folder that contains one folder per dataset
(`caltech-101/`, `eurosat/`, `imagenet/`, ...), as in the CoOp `DATASETS.md` instructions.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from benchmarks import _layouts
from benchmarks._layouts import RawItem, RawSplits

logger = logging.getLogger(__name__)

DATA_ROOT_ENV = "VLPROMPT_DATA"
"""Environment variable that overrides the default data root."""


@dataclass(frozen=True, slots=True)
class Datum:
    """One labelled image of a split."""

    impath: str
    """Image path relative to `DatasetSplits.image_root`, with forward slashes."""
    label: int
    """Class index, 0-based."""
    classname: str
    """Class name with "_" replaced by " ", as every CoOp trainer does before tokenizing."""


@dataclass(frozen=True)
class DatasetSplits:
    """The train, val and test lists of one dataset, with its class names and template."""

    name: str
    """Registry name, the CoOp config name, for example "eurosat"."""
    image_root: Path
    """Absolute folder that every `Datum.impath` is relative to."""
    train: tuple[Datum, ...]
    val: tuple[Datum, ...]
    test: tuple[Datum, ...]
    classnames: tuple[str, ...]
    """Class names indexed by label."""
    template: str
    """Hand-crafted prompt with one "{}" for the class name, e.g. "a photo of a {}."."""

    def __post_init__(self) -> None:
        # Accept lists and str paths from callers, but store the documented immutable types.
        object.__setattr__(self, "image_root", Path(self.image_root))
        for field_name in ("train", "val", "test", "classnames"):
            object.__setattr__(self, field_name, tuple(getattr(self, field_name)))
        if not self.image_root.is_absolute():
            raise ValueError(
                f"DatasetSplits {self.name!r}: image_root {str(self.image_root)!r} is relative; "
                "pass an absolute path, e.g. Path(root).resolve()."
            )
        if "{}" not in self.template:
            raise ValueError(
                f"DatasetSplits {self.name!r}: template {self.template!r} has no '{{}}' "
                "placeholder for the class name."
            )

    @property
    def num_classes(self) -> int:
        """Number of classes, `len(classnames)`."""
        return len(self.classnames)


Reader = Callable[[Path, "DatasetInfo"], RawSplits]
"""Layout reader: (data root, registry entry) -> raw split lists."""


@dataclass(frozen=True)
class DatasetInfo:
    """Registry entry of one dataset."""

    name: str
    """Registry name, the CoOp config name."""
    display_name: str
    """CoOp dataset class name; JSON-split datasets read `split_zhou_<display_name>.json`."""
    folder: str
    """Dataset folder under the data root."""
    template: str
    """Hand-crafted prompt template of the CoOp zero-shot CLIP baseline."""
    reader: Reader
    layout: str
    """Expected files under the data root, quoted in error messages."""
    setup_hint: str
    """How to obtain the files, quoted in error messages."""
    test_only: bool = False
    """True for datasets with a test split only; class names then come from the test split."""
    val_is_test: bool = False
    """True when the dataset has no val split of its own and reuses the test list (ImageNet)."""
    train_crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of the training RandomResizedCrop; the CoOp harness uses (0.08, 1.0)."""
    train_flip: bool = True
    """Whether training flips images horizontally, as the CoOp harness does."""


def _coop_hint(section: str, folder: str) -> str:
    return (
        f"set up {section} as the {section} section of DATASETS.md in the KaiyangZhou/CoOp "
        f"repository describes, so that '{folder}' sits directly under the data root."
    )


def _json_dataset(name: str, display_name: str, folder: str, image_dir: str, template: str,
                  section: str, layout: str) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        display_name=display_name,
        folder=folder,
        template=template,
        reader=partial(_layouts.read_json_split, image_dir=image_dir),
        layout=layout,
        setup_hint=_coop_hint(section, folder),
    )


def _imagenet_variant(name: str, display_name: str, folder: str, reader: Reader, section: str,
                      layout: str) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        display_name=display_name,
        folder=folder,
        template="a photo of a {}.",
        reader=reader,
        layout=f"{layout}, and classnames.txt in {folder}/ or in imagenet/",
        setup_hint=_coop_hint(section, folder),
        test_only=True,
    )


_REGISTRY_ENTRIES = (
    DatasetInfo(
        name="imagenet",
        display_name="ImageNet",
        folder="imagenet",
        template="a photo of a {}.",
        reader=_layouts.read_imagenet,
        layout="imagenet/classnames.txt and imagenet/images/{train,val}/<wnid>/<image>",
        setup_hint=_coop_hint("ImageNet", "imagenet"),
        val_is_test=True,
    ),
    _json_dataset(
        "caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "a photo of a {}.",
        "Caltech101",
        "caltech-101/101_ObjectCategories/<class>/<image> and "
        "caltech-101/split_zhou_Caltech101.json",
    ),
    _json_dataset(
        "oxford_pets", "OxfordPets", "oxford_pets", "images", "a photo of a {}, a type of pet.",
        "OxfordPets",
        "oxford_pets/images/<image> and oxford_pets/split_zhou_OxfordPets.json",
    ),
    _json_dataset(
        "stanford_cars", "StanfordCars", "stanford_cars", "", "a photo of a {}.", "StanfordCars",
        "stanford_cars/{cars_train,cars_test}/<image> and "
        "stanford_cars/split_zhou_StanfordCars.json (paths relative to stanford_cars/)",
    ),
    _json_dataset(
        "oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg",
        "a photo of a {}, a type of flower.", "Flowers102",
        "oxford_flowers/jpg/<image> and oxford_flowers/split_zhou_OxfordFlowers.json",
    ),
    _json_dataset(
        "food101", "Food101", "food-101", "images", "a photo of {}, a type of food.", "Food101",
        "food-101/images/<class>/<image> and food-101/split_zhou_Food101.json",
    ),
    DatasetInfo(
        name="fgvc_aircraft",
        display_name="FGVCAircraft",
        folder="fgvc_aircraft",
        template="a photo of a {}, a type of aircraft.",
        reader=_layouts.read_fgvc_aircraft,
        layout="fgvc_aircraft/images/<image id>.jpg, fgvc_aircraft/variants.txt and "
               "fgvc_aircraft/images_variant_{train,val,test}.txt",
        setup_hint=_coop_hint("FGVCAircraft", "fgvc_aircraft"),
    ),
    _json_dataset(
        "sun397", "SUN397", "sun397", "SUN397", "a photo of a {}.", "SUN397",
        "sun397/SUN397/<letter>/<class>/<image> and sun397/split_zhou_SUN397.json",
    ),
    _json_dataset(
        "dtd", "DescribableTextures", "dtd", "images", "{} texture.", "DTD",
        "dtd/images/<class>/<image> and dtd/split_zhou_DescribableTextures.json",
    ),
    _json_dataset(
        "eurosat", "EuroSAT", "eurosat", "2750", "a centered satellite photo of {}.", "EuroSAT",
        "eurosat/2750/<class>/<image> and eurosat/split_zhou_EuroSAT.json",
    ),
    _json_dataset(
        "ucf101", "UCF101", "ucf101", "UCF-101-midframes", "a photo of a person doing {}.",
        "UCF101",
        "ucf101/UCF-101-midframes/<class>/<image> and ucf101/split_zhou_UCF101.json",
    ),
    _imagenet_variant(
        "imagenetv2", "ImageNetV2", "imagenetv2", _layouts.read_imagenetv2, "ImageNetV2",
        "imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/<image>",
    ),
    _imagenet_variant(
        "imagenet_sketch", "ImageNetSketch", "imagenet-sketch", _layouts.read_imagenet_sketch,
        "ImageNet-Sketch", "imagenet-sketch/images/<wnid>/<image>",
    ),
    _imagenet_variant(
        "imagenet_a", "ImageNetA", "imagenet-adversarial",
        partial(_layouts.read_imagenet_subset, image_dir="imagenet-a"), "ImageNet-A",
        "imagenet-adversarial/imagenet-a/<wnid>/<image>",
    ),
    _imagenet_variant(
        "imagenet_r", "ImageNetR", "imagenet-rendition",
        partial(_layouts.read_imagenet_subset, image_dir="imagenet-r"), "ImageNet-R",
        "imagenet-rendition/imagenet-r/<wnid>/<image>",
    ),
    DatasetInfo(
        name="digits",
        display_name="Digits",
        folder="digits",
        template="a photo of the digit {}.",
        reader=partial(_layouts.read_json_split, image_dir="images"),
        layout="digits/images/<digit name>/<index>.png and digits/split_zhou_Digits.json",
        setup_hint="build it offline with benchmarks.build_digits(data_root), which writes the "
                   "scikit-learn digits as PNG files.",
        # Crops down to 8 % of a 32-pixel digit and mirror images destroy the class, so the
        # built-in dataset trains with milder crops and no flips.
        train_crop_scale=(0.5, 1.0),
        train_flip=False,
    ),
)

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in _REGISTRY_ENTRIES}
"""Registry of every readable dataset, by name."""

STANDARD_DATASETS: tuple[str, ...] = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)
"""The 11 datasets of the CoOp base-to-novel and few-shot protocols, in the papers' order."""


def list_datasets(include_test_only: bool = True) -> list[str]:
    """List the registered dataset names in registry order.

    Args:
        include_test_only: Whether to include the datasets that have a test split only
            (the four ImageNet variants).

    Returns:
        The standard 11 first, then the ImageNet variants (if included), then "digits", then
        "cifar100" and "mnist" (registered by `benchmarks.torchvision_formats`).
    """
    return [name for name, info in DATASETS.items() if include_test_only or not info.test_only]


def dataset_info(name: str) -> DatasetInfo:
    """Look up the registry entry of `name`.

    Raises:
        ValueError: If `name` is not registered; the message lists the close matches and all
            valid names.
    """
    if name in DATASETS:
        return DATASETS[name]

    # Match against registry names, CoOp class names and folder names alike, so that
    # "EuroSAT", "DescribableTextures" or "food-101" all point to the registry name.
    aliases: dict[str, str] = {}
    for info in DATASETS.values():
        for alias in (info.name, info.display_name, info.folder):
            aliases.setdefault(alias.lower(), info.name)
    matches = difflib.get_close_matches(str(name).lower(), list(aliases), n=3, cutoff=0.6)
    suggestions = list(dict.fromkeys(aliases[match] for match in matches))
    hint = f" Did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    raise ValueError(f"Unknown dataset {name!r}.{hint} Valid names: {', '.join(DATASETS)}.")


def default_data_root() -> Path:
    """Return the data root: `$VLPROMPT_DATA` if set and non-empty, else ~/.cache/vlprompt/data."""
    value = os.environ.get(DATA_ROOT_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    return Path.home() / ".cache" / "vlprompt" / "data"


def read_dataset(name: str, data_root: str | os.PathLike[str]) -> DatasetSplits:
    """Read one dataset from its CoOp folder layout under `data_root`.

    The labels are checked before anything is returned. CoOp takes the class count as the
    largest train label plus one, so a class without train images silently vanishes from its
    text classifier while val or test may still use its label. Here that raises instead.

    Args:
        name: Registry name, see `list_datasets()`.
        data_root: Folder that contains the dataset folders; `~` is expanded.

    Returns:
        The splits with image paths relative to the absolute `image_root`. Test-only datasets
        have empty train and val splits. For ImageNet the val split is the test list.

    Raises:
        ValueError: If `name` is unknown or a split file is malformed. Also if the labels are
            inconsistent: a label in 0..max without train images (test images for test-only
            datasets), a label with two class names, or a val or test label that train lacks.
        FileNotFoundError: If the data root, the dataset folder, a split or class list file, an
            image folder, or the first image of a split is missing. The message names the path,
            the expected layout and how to set it up.
    """
    info = dataset_info(name)
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(data_root))))
    if not root.is_dir():
        raise FileNotFoundError(
            f"Data root {root} is missing or not a folder (reading dataset {name!r}, expected "
            f"layout under it: {info.layout}). Pass the folder that contains the dataset "
            f"folders as data_root, or set {DATA_ROOT_ENV}."
        )

    raw = info.reader(root, info)
    splits = _build_splits(info, raw)
    _check_first_images(splits, info, raw.source)
    logger.info(
        "Read %s from %s: %d train, %d val, %d test images, %d classes.",
        name, splits.image_root, len(splits.train), len(splits.val), len(splits.test),
        splits.num_classes,
    )
    return splits


# ---------------------------------------------------------------------------------------------
# Validation shared by every layout


def _to_data(items: Iterable[RawItem]) -> tuple[Datum, ...]:
    return tuple(
        Datum(impath, label, classname.replace("_", " ")) for impath, label, classname in items
    )


def _format_labels(labels: Sequence[int], limit: int = 20) -> str:
    listed = ", ".join(str(label) for label in labels[:limit])
    return f"[{listed}, ... ({len(labels)} in total)]" if len(labels) > limit else f"[{listed}]"


def _collect_names(splits: dict[str, tuple[Datum, ...]], source: Path, name: str) -> dict[int, str]:
    """Map each label to its class name, raising if one label carries two names."""
    names: dict[int, str] = {}
    where: dict[int, str] = {}
    for split, items in splits.items():
        for item in items:
            known = names.setdefault(item.label, item.classname)
            where.setdefault(item.label, f"{split} item {item.impath!r}")
            if known != item.classname:
                raise ValueError(
                    f"Dataset {name!r} ({source}): label {item.label} is named {known!r} in "
                    f"{where[item.label]} but {item.classname!r} in {split} item "
                    f"{item.impath!r}. Each label must have one class name; fix the split file."
                )
    return names


def _build_splits(info: DatasetInfo, raw: RawSplits) -> DatasetSplits:
    test = _to_data(raw.test)
    # ImageNet passes one list as val and test; sharing the tuple avoids a second copy.
    val = test if raw.val is raw.test else _to_data(raw.val)
    splits = {"train": _to_data(raw.train), "val": val, "test": test}
    names_by_label = _collect_names(splits, raw.source, info.name)

    source_split = "test" if info.test_only else "train"
    source_labels = {item.label for item in splits[source_split]}
    if not source_labels:
        raise ValueError(
            f"Dataset {info.name!r} ({raw.source}) has no {source_split} images. Check that the "
            f"image folders are not empty and that the layout is {info.layout}."
        )

    if raw.classnames is not None:
        classnames = tuple(classname.replace("_", " ") for classname in raw.classnames)
    else:
        classnames = tuple(names_by_label.get(label, "") for label in range(max(source_labels) + 1))

    missing = [label for label in range(len(classnames)) if label not in source_labels]
    if missing:
        missing_names = [classnames[label] for label in missing[:5] if classnames[label]]
        raise ValueError(
            f"Dataset {info.name!r} ({raw.source}): labels {_format_labels(missing)} of "
            f"0..{len(classnames) - 1} have no {source_split} images"
            f"{f' (e.g. {missing_names})' if missing_names else ''}. Class names come from the "
            f"{source_split} labels, so these classes would silently drop out of the classifier. "
            "Re-download the missing images or split file."
        )

    for split in ("train", "val", "test"):
        extra = sorted({item.label for item in splits[split]} - source_labels)
        if extra:
            raise ValueError(
                f"Dataset {info.name!r} ({raw.source}): the {split} split uses labels "
                f"{_format_labels(extra)} that the {source_split} split does not have (classes "
                f"0..{len(classnames) - 1}), so the classifier would have no output for them. "
                "Fix the split file or class list."
            )

    for label, classname in names_by_label.items():
        if classnames[label] != classname:
            raise ValueError(
                f"Dataset {info.name!r} ({raw.source}): label {label} is named {classname!r} in "
                f"the split lists but {classnames[label]!r} in the class list. Fix either file."
            )

    duplicates = sorted({n for n in classnames if classnames.count(n) > 1})
    if duplicates:
        logger.warning(
            "Dataset %r has several classes named %s; their text prompts are identical.",
            info.name, duplicates,
        )

    return DatasetSplits(
        name=info.name,
        image_root=raw.image_root,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        classnames=classnames,
        template=info.template,
    )


def _check_first_images(splits: DatasetSplits, info: DatasetInfo, source: Path) -> None:
    """Check that the first image of each split exists, to catch a wrong image folder early.

    Only one image per split is checked, because checking them all would cost one file system
    call per image (over a million for ImageNet). A missing image later fails when it is loaded.
    """
    for split in ("train", "val", "test"):
        items = getattr(splits, split)
        if not items:
            continue
        path = splits.image_root / items[0].impath
        if not path.is_file():
            raise FileNotFoundError(
                f"Image {path}, the first {split} item of dataset {info.name!r} ({source}), not "
                f"found. Paths in the split lists are relative to {splits.image_root}; the "
                f"expected layout under the data root is {info.layout}. Fix: {info.setup_hint}"
            )

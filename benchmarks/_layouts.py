"""Readers for the folder layouts of the CoOp harness.

Each reader takes the data root and the dataset's registry entry, checks that the expected files
exist, and returns the raw split lists as `RawSplits`. Class-name clean-up and label checks happen
afterwards, in `benchmarks.datasets`, so that every layout gets the same checks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from benchmarks.datasets import DatasetInfo

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")

RawItem = tuple[str, int, str]
"""One split entry as stored on disk: (image path relative to the image root, label, class name)."""


class RawSplits(NamedTuple):
    """Split lists of one dataset as read from disk, before validation."""

    image_root: Path
    train: list[RawItem]
    val: list[RawItem]
    test: list[RawItem]
    source: Path
    """The split file or image folder the lists come from, named in error messages."""
    classnames: tuple[str, ...] | None = None
    """The full class list in label order when the layout defines one (`classnames.txt`,
    `variants.txt`), else None and the names are taken from the items."""


# ---------------------------------------------------------------------------------------------
# Path checks and listings


def _layout_error(kind: str, path: Path, state: str, info: DatasetInfo, data_root: Path) -> str:
    return (
        f"{kind} {path} {state} (dataset {info.name!r}). Expected layout under the data root "
        f"{data_root}: {info.layout}. Fix: {info.setup_hint}"
    )


def require_dir(path: Path, kind: str, info: DatasetInfo, data_root: Path) -> Path:
    """Return `path` if it is a folder, else raise FileNotFoundError naming the layout."""
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "not found"
        raise FileNotFoundError(_layout_error(kind, path, state, info, data_root))
    return path


def require_file(path: Path, kind: str, info: DatasetInfo, data_root: Path) -> Path:
    """Return `path` if it is a file, else raise FileNotFoundError naming the layout."""
    if not path.is_file():
        state = "is not a file" if path.exists() else "not found"
        raise FileNotFoundError(_layout_error(kind, path, state, info, data_root))
    return path


def dataset_dir(data_root: Path, info: DatasetInfo) -> Path:
    """Return the dataset's folder under `data_root`, checking that it exists."""
    return require_dir(data_root / info.folder, "Dataset folder", info, data_root)


def list_files(folder: Path) -> list[str]:
    """Return the sorted names of the regular files in `folder`, skipping hidden ones.

    Sorting makes the item order, and so the few-shot sample of a seed, the same on every
    file system.
    """
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file())


def list_subfolders(folder: Path) -> list[str]:
    """Return the sorted names of the folders in `folder`, skipping hidden ones."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


# ---------------------------------------------------------------------------------------------
# split_zhou_<Name>.json


def load_split_json(path: Path) -> dict[str, list[RawItem]]:
    """Parse a CoOp split file: {"train"|"val"|"test": [[relative_impath, label, classname]]}.

    Raises:
        ValueError: If the file is not valid JSON or an item does not have that form.
    """
    fix = "Re-download the split file or regenerate it with the CoOp split rules."
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Split file {path} is not valid JSON ({error}). {fix}") from error

    if not isinstance(data, dict) or any(split not in data for split in SPLIT_NAMES):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"Split file {path} has keys {keys}; expected an object with the keys "
            f"'train', 'val' and 'test'. {fix}"
        )

    splits: dict[str, list[RawItem]] = {}
    for split in SPLIT_NAMES:
        entries = data[split]
        if not isinstance(entries, list):
            raise ValueError(f"Split file {path}: {split!r} is a {type(entries).__name__}, "
                             f"expected a list of [relative_impath, label, classname]. {fix}")
        splits[split] = [
            _parse_split_item(entry, path, split, index) for index, entry in enumerate(entries)
        ]
    return splits


def _parse_split_item(entry: object, path: Path, split: str, index: int) -> RawItem:
    valid = (
        isinstance(entry, list | tuple)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and entry[0] != ""
        and type(entry[1]) is int
        and entry[1] >= 0
        and isinstance(entry[2], str)
        and entry[2] != ""
    )
    if not valid:
        raise ValueError(
            f"Split file {path}: item {index} of {split!r} is {entry!r}; expected "
            "[relative_impath, label, classname] with a non-negative int label and non-empty "
            "strings."
        )
    impath, label, classname = entry  # type: ignore[misc]
    if os.path.isabs(impath) or impath.startswith(("/", "\\")):
        raise ValueError(
            f"Split file {path}: item {index} of {split!r} has the absolute path {impath!r}; "
            "paths must be relative to the image folder so the data root can move."
        )
    return impath, label, classname


def read_json_split(data_root: Path, info: DatasetInfo, *, image_dir: str) -> RawSplits:
    """Read a dataset described by `<folder>/split_zhou_<display_name>.json`.

    Args:
        data_root: Folder that contains the dataset folders.
        info: Registry entry of the dataset.
        image_dir: Image folder relative to the dataset folder, which the split file's paths are
            relative to. An empty string means the dataset folder itself (Stanford Cars).
    """
    root = dataset_dir(data_root, info)
    split_path = require_file(
        root / f"split_zhou_{info.display_name}.json", "Split file", info, data_root
    )
    image_root = root / image_dir if image_dir else root
    require_dir(image_root, "Image folder", info, data_root)

    lists = load_split_json(split_path)
    return RawSplits(image_root, lists["train"], lists["val"], lists["test"], source=split_path)


# ---------------------------------------------------------------------------------------------
# FGVC-Aircraft: official text lists


def read_fgvc_aircraft(data_root: Path, info: DatasetInfo) -> RawSplits:
    """Read FGVC-Aircraft from `variants.txt` and `images_variant_{train,val,test}.txt`.

    The label of a variant is its line index in `variants.txt`. Each list line is
    "<image id> <variant name>", and the image is `images/<image id>.jpg`.
    """
    root = dataset_dir(data_root, info)
    image_root = require_dir(root / "images", "Image folder", info, data_root)
    variants_path = require_file(root / "variants.txt", "Class list", info, data_root)

    variants = [line.strip() for line in variants_path.read_text(encoding="utf-8").splitlines()]
    variants = [name for name in variants if name]
    duplicates = sorted({name for name in variants if variants.count(name) > 1})
    if duplicates:
        raise ValueError(f"Class list {variants_path} repeats the variants {duplicates}; each "
                         "line must name a different variant. Re-download the dataset.")
    label_of = {name: label for label, name in enumerate(variants)}

    lists: dict[str, list[RawItem]] = {}
    for split in SPLIT_NAMES:
        list_path = require_file(
            root / f"images_variant_{split}.txt", "Split list", info, data_root
        )
        lists[split] = _read_fgvc_list(list_path, label_of, variants_path)
    return RawSplits(
        image_root, lists["train"], lists["val"], lists["test"],
        source=root, classnames=tuple(variants),
    )


def _read_fgvc_list(path: Path, label_of: dict[str, int], variants_path: Path) -> list[RawItem]:
    items: list[RawItem] = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        image_id, _, variant = line.partition(" ")
        variant = variant.strip()
        if variant not in label_of:
            raise ValueError(
                f"{path}, line {line_number}: variant {variant!r} is not listed in "
                f"{variants_path}; expected '<image id> <variant>' with a variant from that file. "
                "Re-download the dataset so that the lists and variants.txt match."
            )
        items.append((f"{image_id}.jpg", label_of[variant], variant))
    return items


# ---------------------------------------------------------------------------------------------
# ImageNet and its variants: class folders named by WordNet id, names from classnames.txt


def read_wnid_classnames(path: Path) -> dict[str, str]:
    """Parse an ImageNet `classnames.txt` with one "<wnid> <class name>" per line.

    Returns:
        WordNet id to class name, in file order (the ImageNet label order).

    Raises:
        ValueError: If a line has no class name, a WordNet id repeats, or the file is empty.
    """
    names: dict[str, str] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        wnid, _, name = line.partition(" ")
        name = name.strip()
        if not name:
            raise ValueError(f"{path}, line {line_number}: {line!r} has no class name; expected "
                             "'<wnid> <class name>', for example 'n01440764 tench'.")
        if wnid in names:
            raise ValueError(f"{path}, line {line_number}: WordNet id {wnid!r} is listed twice.")
        names[wnid] = name
    if not names:
        raise ValueError(f"{path} lists no classes; expected one '<wnid> <class name>' per line.")
    return names


def find_classnames_file(data_root: Path, info: DatasetInfo) -> Path:
    """Return `<folder>/classnames.txt` if present, else `imagenet/classnames.txt`."""
    candidates = [
        data_root / info.folder / "classnames.txt",
        data_root / "imagenet" / "classnames.txt",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Class list classnames.txt not found for dataset {info.name!r}; looked for "
        f"{candidates[0]} and {candidates[1]}. Expected layout under the data root {data_root}: "
        f"{info.layout}. Fix: copy ImageNet's classnames.txt (one '<wnid> <class name>' per "
        f"line) into {candidates[0].parent}."
    )


def _read_wnid_folders(
    split_dir: Path, prefix: str, label_of: dict[str, int], names: dict[str, str],
    classnames_path: Path,
) -> list[RawItem]:
    """List `split_dir/<wnid>/<image>` as items with paths `<prefix><wnid>/<image>`."""
    items: list[RawItem] = []
    for wnid in list_subfolders(split_dir):
        if wnid not in label_of:
            raise ValueError(
                f"Class folder {split_dir / wnid} is not listed in {classnames_path}; every "
                "folder name must be a WordNet id from that file. Remove the folder or use the "
                "ImageNet classnames.txt."
            )
        label = label_of[wnid]
        for image in list_files(split_dir / wnid):
            items.append((f"{prefix}{wnid}/{image}", label, names[wnid]))
    return items


def read_imagenet(data_root: Path, info: DatasetInfo) -> RawSplits:
    """Read ImageNet from `images/{train,val}/<wnid>/` and `classnames.txt`.

    The label of a class is its line index in `classnames.txt`. The val folder is used as the
    test split and also as the val split, as in the CoOp harness.

    NOTE: CoOp numbers the classes by the sorted train folders and lists the images of a folder
    unsorted (`os.listdir`), so its item order, and so its few-shot sample of a seed, depends on
    the file system. Here the images are sorted, which makes the sample reproducible but not
    identical to CoOp's. The labels agree with CoOp's when `classnames.txt` lists the WordNet
    ids in sorted order, as the released file does.
    """
    root = dataset_dir(data_root, info)
    classnames_path = require_file(root / "classnames.txt", "Class list", info, data_root)
    image_root = require_dir(root / "images", "Image folder", info, data_root)
    train_dir = require_dir(image_root / "train", "Image folder", info, data_root)
    val_dir = require_dir(image_root / "val", "Image folder", info, data_root)

    names = read_wnid_classnames(classnames_path)
    wnids = list(names)
    if wnids != sorted(wnids):
        logger.warning(
            "%s does not list the WordNet ids in sorted order, so the labels of %r differ from "
            "CoOp's, which numbers the sorted class folders.", classnames_path, info.name,
        )
    label_of = {wnid: label for label, wnid in enumerate(wnids)}

    train = _read_wnid_folders(train_dir, "train/", label_of, names, classnames_path)
    test = _read_wnid_folders(val_dir, "val/", label_of, names, classnames_path)
    return RawSplits(
        image_root, train, test, test, source=image_root, classnames=tuple(names.values())
    )


def read_imagenetv2(data_root: Path, info: DatasetInfo) -> RawSplits:
    """Read ImageNet-V2, whose class folders are the labels `0..999` themselves."""
    root = dataset_dir(data_root, info)
    image_root = require_dir(
        root / "imagenetv2-matched-frequency-format-val", "Image folder", info, data_root
    )
    classnames_path = find_classnames_file(data_root, info)
    names = list(read_wnid_classnames(classnames_path).values())

    folders = list_subfolders(image_root)
    bad = [folder for folder in folders if not folder.isdigit() or int(folder) >= len(names)]
    if bad:
        raise ValueError(
            f"Image folder {image_root} contains the class folders {bad[:10]}, which are not "
            f"labels 0..{len(names) - 1} of {classnames_path}. Remove them or use the "
            "matched-frequency release of ImageNet-V2."
        )

    test: list[RawItem] = []
    for folder in sorted(folders, key=int):
        label = int(folder)
        for image in list_files(image_root / folder):
            test.append((f"{folder}/{image}", label, names[label]))
    return RawSplits(image_root, [], [], test, source=image_root, classnames=tuple(names))


def read_imagenet_sketch(data_root: Path, info: DatasetInfo) -> RawSplits:
    """Read ImageNet-Sketch from `images/<wnid>/`, with ImageNet's labels and class names."""
    root = dataset_dir(data_root, info)
    image_root = require_dir(root / "images", "Image folder", info, data_root)
    classnames_path = find_classnames_file(data_root, info)
    names = read_wnid_classnames(classnames_path)
    label_of = {wnid: label for label, wnid in enumerate(names)}

    test = _read_wnid_folders(image_root, "", label_of, names, classnames_path)
    return RawSplits(image_root, [], [], test, source=image_root, classnames=tuple(names.values()))


def read_imagenet_subset(data_root: Path, info: DatasetInfo, *, image_dir: str) -> RawSplits:
    """Read ImageNet-A or ImageNet-R, which contain a 200-class subset of ImageNet.

    The labels are re-numbered 0..k-1 over the sorted class folders present, as in the CoOp
    harness, so they are not ImageNet labels. Files directly in the image folder (such as
    ImageNet-A's README.txt) are ignored.
    """
    root = dataset_dir(data_root, info)
    image_root = require_dir(root / image_dir, "Image folder", info, data_root)
    classnames_path = find_classnames_file(data_root, info)
    names = read_wnid_classnames(classnames_path)

    wnids = list_subfolders(image_root)
    unknown = [wnid for wnid in wnids if wnid not in names]
    if unknown:
        raise ValueError(
            f"Image folder {image_root} contains the class folders {unknown[:10]}, which are not "
            f"listed in {classnames_path}. Every folder name must be a WordNet id from that file."
        )
    label_of = {wnid: label for label, wnid in enumerate(wnids)}

    test = _read_wnid_folders(image_root, "", label_of, names, classnames_path)
    subset_names = tuple(names[wnid] for wnid in wnids)
    return RawSplits(image_root, [], [], test, source=image_root, classnames=subset_names)

"""Tests of the dataset registry and the CoOp layout readers, on fake datasets with real images."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import (
    DATASETS,
    STANDARD_DATASETS,
    DatasetSplits,
    Datum,
    dataset_info,
    default_data_root,
    list_datasets,
    read_dataset,
)
from tests.fixtures.coop_layouts import (
    IMAGENET_CLASSES,
    imagenet_subset_indices,
    make_dataset,
    make_imagenet_family,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

EXPECTED_FOLDERS = {
    "imagenet": "imagenet",
    "caltech101": "caltech-101",
    "oxford_pets": "oxford_pets",
    "stanford_cars": "stanford_cars",
    "oxford_flowers": "oxford_flowers",
    "food101": "food-101",
    "fgvc_aircraft": "fgvc_aircraft",
    "sun397": "sun397",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "ucf101": "ucf101",
    "imagenetv2": "imagenetv2",
    "imagenet_sketch": "imagenet-sketch",
    "imagenet_a": "imagenet-adversarial",
    "imagenet_r": "imagenet-rendition",
    "digits": "digits",
    "cifar100": "cifar-100-python",
    "mnist": "MNIST",
}

TEST_ONLY = {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}


def _write_split(path: Path, train: list, val: list, test: list) -> None:
    path.write_text(json.dumps({"train": train, "val": val, "test": test}), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Registry


def test_standard_datasets_order() -> None:
    assert STANDARD_DATASETS == (
        "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
        "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
    )


def test_registry_folder_names() -> None:
    assert {name: info.folder for name, info in DATASETS.items()} == EXPECTED_FOLDERS


def test_list_datasets_test_only_filter() -> None:
    everything = list_datasets()
    trainable = list_datasets(include_test_only=False)

    assert everything[:11] == list(STANDARD_DATASETS)
    assert set(everything) == set(EXPECTED_FOLDERS)
    assert set(everything) - set(trainable) == TEST_ONLY
    assert "digits" in trainable


@pytest.mark.parametrize(("name", "template"), [
    ("eurosat", "a centered satellite photo of {}."),
    ("dtd", "{} texture."),
    ("food101", "a photo of {}, a type of food."),
    ("ucf101", "a photo of a person doing {}."),
    ("oxford_pets", "a photo of a {}, a type of pet."),
    ("fgvc_aircraft", "a photo of a {}, a type of aircraft."),
    ("imagenet_r", "a photo of a {}."),
    ("digits", "a photo of the digit {}."),
])
def test_registry_templates(name: str, template: str) -> None:
    assert DATASETS[name].template == template


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(ValueError, match="Did you mean 'eurosat'") as excinfo:
        dataset_info("euro_sat")
    assert "Valid names:" in str(excinfo.value)
    assert "imagenet_sketch" in str(excinfo.value)


def test_unknown_name_matches_coop_class_name() -> None:
    with pytest.raises(ValueError, match="Did you mean 'dtd'"):
        read_dataset("DescribableTextures", "/nonexistent")


def test_unknown_name_without_match() -> None:
    with pytest.raises(ValueError, match="Unknown dataset 'zzzz'") as excinfo:
        dataset_info("zzzz")
    assert "Did you mean" not in str(excinfo.value)


def test_default_data_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLPROMPT_DATA", str(tmp_path))
    assert default_data_root() == tmp_path

    monkeypatch.setenv("VLPROMPT_DATA", "")
    assert default_data_root() == Path.home() / ".cache" / "vlprompt" / "data"

    monkeypatch.delenv("VLPROMPT_DATA")
    assert default_data_root() == Path.home() / ".cache" / "vlprompt" / "data"


def test_package_imports_no_model_code() -> None:
    code = (
        "import sys, benchmarks\n"
        "banned = ('avalanche', 'flwr', 'open_clip', 'learners', 'strategies', 'plugins')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"


# The data modules; other benchmarks/ modules (Avalanche streams, federated partitions) may
# import their framework, but none may import model or training code.
DATA_MODULES = {
    "__init__.py", "_io.py", "_layouts.py", "datasets.py", "digits.py", "fewshot.py",
    "imagelist.py", "protocols.py", "splits.py", "transforms.py",
}


def _imported_modules(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.append(node.module or "")
    return modules


def test_package_sources_import_no_model_code() -> None:
    offenders = []
    for path in sorted((REPO_ROOT / "benchmarks").rglob("*.py")):
        banned = {"learners", "strategies", "plugins"}
        if path.name in DATA_MODULES:
            banned |= {"avalanche", "flwr", "open_clip"}
        offenders += [f"{path.name}: {module}" for module in _imported_modules(path)
                      if module.split(".")[0] in banned]
    assert offenders == []


# ---------------------------------------------------------------------------------------------
# Every layout


@pytest.mark.parametrize("name", sorted(EXPECTED_FOLDERS))
def test_reader_counts_and_names(name: str, tmp_path: Path) -> None:
    fake = make_dataset(name, tmp_path)
    splits = read_dataset(name, tmp_path)

    assert splits.name == name
    assert splits.classnames == fake.classnames
    assert len(splits.train) == fake.num_train
    assert len(splits.val) == fake.num_val
    assert len(splits.test) == fake.num_test
    assert splits.template == DATASETS[name].template
    assert splits.image_root.is_absolute()

    for split in (splits.train, splits.val, splits.test):
        for item in split:
            assert "\\" not in item.impath
            assert not item.impath.startswith("/")
            assert item.classname == splits.classnames[item.label]
            assert "_" not in item.classname
    labels = {item.label for item in (splits.test if name in TEST_ONLY else splits.train)}
    assert labels == set(range(len(splits.classnames)))

    first = splits.test[0]
    with Image.open(splits.image_root / first.impath) as image:
        assert image.size == (32, 32)


def test_reader_accepts_str_and_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset("dtd", tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))

    splits = read_dataset("dtd", "~")

    assert splits.image_root == tmp_path / "dtd" / "images"


# ---------------------------------------------------------------------------------------------
# Class-name conventions carried by the split files


def test_caltech_renames_and_ignored(tmp_path: Path) -> None:
    fake = make_dataset("caltech101", tmp_path, num_classes=7)
    assert (fake.dataset_dir / "101_ObjectCategories" / "BACKGROUND_Google").is_dir()

    splits = read_dataset("caltech101", tmp_path)

    assert splits.classnames == (
        "face", "leopard", "motorbike", "airplane", "yin yang", "accordion", "anchor",
    )
    impaths = [item.impath for item in splits.train + splits.val + splits.test]
    assert not any(path.startswith(("BACKGROUND_Google/", "Faces_easy/")) for path in impaths)


def test_eurosat_long_names(tmp_path: Path) -> None:
    make_dataset("eurosat", tmp_path, num_classes=10)

    splits = read_dataset("eurosat", tmp_path)

    assert splits.classnames == (
        "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
        "Industrial Buildings", "Pasture Land", "Permanent Crop Land", "Residential Buildings",
        "River", "Sea or Lake",
    )
    assert splits.train[0].impath == "AnnualCrop/AnnualCrop_1.jpg"


def test_pets_lowercase_breeds(tmp_path: Path) -> None:
    make_dataset("oxford_pets", tmp_path, num_classes=37, per_class=(1, 1, 1))

    splits = read_dataset("oxford_pets", tmp_path)

    assert len(splits.classnames) == 37
    assert splits.classnames[:3] == ("abyssinian", "american bulldog", "american pit bull terrier")
    assert splits.classnames[9] == "british shorthair"
    assert splits.train[0].impath == "Abyssinian_1.jpg"


def test_sun397_reversed_paths(tmp_path: Path) -> None:
    make_dataset("sun397", tmp_path, num_classes=6)

    splits = read_dataset("sun397", tmp_path)

    assert splits.classnames == (
        "abbey", "airplane cabin", "shop bakery", "indoor church", "dining room",
        "outdoor church",
    )
    assert splits.train[8].impath.startswith("b/bakery/shop/")


def test_ucf101_camel_case_split(tmp_path: Path) -> None:
    make_dataset("ucf101", tmp_path, num_classes=6)

    splits = read_dataset("ucf101", tmp_path)

    assert splits.classnames == (
        "Apply Eye Makeup", "Apply Lipstick", "Archery", "Baby Crawling", "Yo Yo", "Playing Daf",
    )


def test_stanford_cars_paths_from_dataset_folder(tmp_path: Path) -> None:
    make_dataset("stanford_cars", tmp_path)

    splits = read_dataset("stanford_cars", tmp_path)

    assert splits.image_root == tmp_path / "stanford_cars"
    assert all(item.impath.startswith("cars_train/") for item in splits.train + splits.val)
    assert all(item.impath.startswith("cars_test/") for item in splits.test)
    assert splits.classnames[0] == "2012 Tesla Model S Sedan"


# ---------------------------------------------------------------------------------------------
# FGVC-Aircraft text lists


def test_fgvc_labels_follow_variants_file(tmp_path: Path) -> None:
    fake = make_dataset("fgvc_aircraft", tmp_path)
    (fake.dataset_dir / "variants.txt").write_text(
        "Falcon 2000\nF-16A/B\nCessna 172\nA300B4\n707-320\n\n", encoding="utf-8"
    )

    splits = read_dataset("fgvc_aircraft", tmp_path)

    assert splits.classnames == ("Falcon 2000", "F-16A/B", "Cessna 172", "A300B4", "707-320")
    first = splits.train[0]
    assert first.impath == "1000001.jpg"
    assert first.classname == "707-320"
    assert first.label == 4


def test_fgvc_unknown_variant_rejected(tmp_path: Path) -> None:
    fake = make_dataset("fgvc_aircraft", tmp_path)
    list_path = fake.dataset_dir / "images_variant_val.txt"
    list_path.write_text(list_path.read_text() + "1234567 Boeing 999\n", encoding="utf-8")

    with pytest.raises(ValueError, match="Boeing 999") as excinfo:
        read_dataset("fgvc_aircraft", tmp_path)
    assert "images_variant_val.txt, line 11" in str(excinfo.value)


def test_fgvc_variant_without_train_images(tmp_path: Path) -> None:
    fake = make_dataset("fgvc_aircraft", tmp_path)
    variants = fake.dataset_dir / "variants.txt"
    variants.write_text(variants.read_text() + "Tornado\n", encoding="utf-8")

    with pytest.raises(ValueError, match=r"labels \[5\] of 0..5 have no train images"):
        read_dataset("fgvc_aircraft", tmp_path)


# ---------------------------------------------------------------------------------------------
# ImageNet family


def test_imagenet_names_sorting_and_hidden_files(tmp_path: Path) -> None:
    fake = make_dataset("imagenet", tmp_path, num_classes=8, per_class=(3, 0, 2))

    splits = read_dataset("imagenet", tmp_path)

    assert splits.classnames == tuple(name for _, name in IMAGENET_CLASSES)
    assert "great white shark" in splits.classnames
    assert len(splits.train) == 24
    assert not any(item.impath.endswith(".DS_Store") for item in splits.train)
    assert [item.impath for item in splits.train[:3]] == [
        "train/n01440764/n01440764_1.JPEG",
        "train/n01440764/n01440764_2.JPEG",
        "train/n01440764/n01440764_3.JPEG",
    ]
    assert splits.val == splits.test
    assert all(item.impath.startswith("val/") for item in splits.test)
    assert fake.num_test == len(splits.test)


def test_imagenet_labels_follow_classnames_file(tmp_path: Path) -> None:
    make_dataset("imagenet", tmp_path, num_classes=3)
    # Same classes, listed in a different order: labels must follow the file, not the folders.
    lines = ["n01484850 great white shark", "n01440764 tench", "n01443537 goldfish"]
    (tmp_path / "imagenet" / "classnames.txt").write_text("\n".join(lines) + "\n")

    splits = read_dataset("imagenet", tmp_path)

    assert splits.classnames == ("great white shark", "tench", "goldfish")
    tench = [item for item in splits.train if "n01440764" in item.impath]
    assert {item.label for item in tench} == {1}


def test_imagenet_missing_train_class(tmp_path: Path) -> None:
    make_dataset("imagenet", tmp_path, num_classes=4)
    shutil.rmtree(tmp_path / "imagenet" / "images" / "train" / IMAGENET_CLASSES[3][0])

    with pytest.raises(ValueError, match=r"labels \[3\] of 0..3 have no train images") as excinfo:
        read_dataset("imagenet", tmp_path)
    assert "tiger shark" in str(excinfo.value)


def test_imagenet_unknown_folder(tmp_path: Path) -> None:
    make_dataset("imagenet", tmp_path, num_classes=3)
    (tmp_path / "imagenet" / "images" / "val" / "n99999999").mkdir()

    with pytest.raises(ValueError, match="n99999999"):
        read_dataset("imagenet", tmp_path)


def test_imagenet_a_r_relabelled(tmp_path: Path) -> None:
    fakes = make_imagenet_family(tmp_path, num_classes=8)
    kept = [IMAGENET_CLASSES[i] for i in imagenet_subset_indices(8)]

    for name in ("imagenet_a", "imagenet_r"):
        splits = read_dataset(name, tmp_path)

        assert splits.classnames == tuple(class_name for _, class_name in kept)
        assert splits.classnames[0] == "goldfish"
        assert sorted({item.label for item in splits.test}) == list(range(len(kept)))
        assert splits.train == ()
        assert splits.val == ()
        assert len(splits.test) == fakes[name].num_test
        goldfish = [item for item in splits.test if item.impath.startswith("n01443537/")]
        assert {item.label for item in goldfish} == {0}


def test_imagenetv2_and_sketch_share_imagenet_labels(tmp_path: Path) -> None:
    make_imagenet_family(tmp_path, num_classes=6)
    imagenet = read_dataset("imagenet", tmp_path)

    for name in ("imagenetv2", "imagenet_sketch"):
        splits = read_dataset(name, tmp_path)

        assert splits.classnames == imagenet.classnames
        assert splits.train == ()
        assert splits.val == ()
    v2 = read_dataset("imagenetv2", tmp_path)
    assert {item.label for item in v2.test if item.impath.startswith("4/")} == {4}


def test_variant_classnames_fallback_to_imagenet(tmp_path: Path) -> None:
    make_dataset("imagenet_r", tmp_path, classnames_in_folder=False)
    assert not (tmp_path / "imagenet-rendition" / "classnames.txt").exists()
    assert (tmp_path / "imagenet" / "classnames.txt").is_file()

    splits = read_dataset("imagenet_r", tmp_path)

    assert splits.classnames == ("goldfish", "great white shark", "hammerhead shark")


def test_variant_prefers_own_classnames(tmp_path: Path) -> None:
    make_dataset("imagenet_sketch", tmp_path, num_classes=2)
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01440764 x\nn01443537 y\n")

    splits = read_dataset("imagenet_sketch", tmp_path)

    assert splits.classnames == ("tench", "goldfish")


def test_variant_without_classnames(tmp_path: Path) -> None:
    make_dataset("imagenet_a", tmp_path)
    (tmp_path / "imagenet-adversarial" / "classnames.txt").unlink()

    with pytest.raises(FileNotFoundError, match="classnames.txt") as excinfo:
        read_dataset("imagenet_a", tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "imagenet-adversarial" / "classnames.txt") in message
    assert str(tmp_path / "imagenet" / "classnames.txt") in message


def test_classnames_line_without_name(tmp_path: Path) -> None:
    make_dataset("imagenet", tmp_path, num_classes=2)
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01440764 tench\nn01443537\n")

    with pytest.raises(ValueError, match="line 2"):
        read_dataset("imagenet", tmp_path)


# ---------------------------------------------------------------------------------------------
# Missing files


def test_missing_data_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(FileNotFoundError, match="Data root") as excinfo:
        read_dataset("eurosat", missing)
    message = str(excinfo.value)
    assert str(missing) in message
    assert "VLPROMPT_DATA" in message


@pytest.mark.parametrize("name", sorted(EXPECTED_FOLDERS))
def test_missing_dataset_folder(name: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as excinfo:
        read_dataset(name, tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / EXPECTED_FOLDERS[name]) in message
    assert repr(name) in message
    assert "Expected layout" in message
    assert "Fix:" in message


def test_missing_split_file(tmp_path: Path) -> None:
    fake = make_dataset("dtd", tmp_path)
    split_path = fake.dataset_dir / "split_zhou_DescribableTextures.json"
    split_path.unlink()

    with pytest.raises(FileNotFoundError, match="Split file") as excinfo:
        read_dataset("dtd", tmp_path)
    message = str(excinfo.value)
    assert str(split_path) in message
    assert "dtd/images/<class>/<image>" in message
    assert "DATASETS.md" in message


def test_missing_image_folder(tmp_path: Path) -> None:
    fake = make_dataset("eurosat", tmp_path)
    shutil.rmtree(fake.dataset_dir / "2750")

    with pytest.raises(FileNotFoundError, match="Image folder") as excinfo:
        read_dataset("eurosat", tmp_path)
    assert str(fake.dataset_dir / "2750") in str(excinfo.value)


def test_missing_fgvc_list(tmp_path: Path) -> None:
    fake = make_dataset("fgvc_aircraft", tmp_path)
    (fake.dataset_dir / "images_variant_test.txt").unlink()

    with pytest.raises(FileNotFoundError, match="images_variant_test.txt"):
        read_dataset("fgvc_aircraft", tmp_path)


def test_missing_digits_points_to_builder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build_digits"):
        read_dataset("digits", tmp_path)


def test_nested_extraction_detected(tmp_path: Path) -> None:
    fake = make_dataset("food101", tmp_path)
    images = fake.dataset_dir / "images"
    nested = fake.dataset_dir / "nested"
    images.rename(nested)
    images.mkdir()
    nested.rename(images / "images")

    with pytest.raises(FileNotFoundError, match="first train item") as excinfo:
        read_dataset("food101", tmp_path)
    assert str(images / "apple_pie" / "100000.jpg") in str(excinfo.value)


# ---------------------------------------------------------------------------------------------
# Label checks (a class missing from train would silently shrink the classifier)


def _json_layout(tmp_path: Path, train: list, val: list, test: list) -> None:
    fake = make_dataset("dtd", tmp_path, num_classes=1, per_class=(1, 0, 0))
    _write_split(fake.dataset_dir / "split_zhou_DescribableTextures.json", train, val, test)


def test_label_gap_in_train(tmp_path: Path) -> None:
    image = "banded/banded_0001.jpg"
    train = [[image, 0, "banded"], [image, 2, "bumpy"], [image, 4, "chequered"]]
    _json_layout(tmp_path, train, [], [])

    with pytest.raises(ValueError, match=r"labels \[1, 3\] of 0..4 have no train images"):
        read_dataset("dtd", tmp_path)


def test_label_with_two_names(tmp_path: Path) -> None:
    image = "banded/banded_0001.jpg"
    _json_layout(tmp_path, [[image, 0, "banded"]], [], [[image, 0, "striped"]])

    with pytest.raises(ValueError, match="label 0 is named 'banded'") as excinfo:
        read_dataset("dtd", tmp_path)
    assert "'striped'" in str(excinfo.value)


def test_test_label_absent_from_train(tmp_path: Path) -> None:
    image = "banded/banded_0001.jpg"
    train = [[image, 0, "banded"], [image, 1, "bumpy"]]
    _json_layout(tmp_path, train, [[image, 1, "bumpy"]], [[image, 2, "chequered"]])

    with pytest.raises(ValueError, match=r"the test split uses labels \[2\]"):
        read_dataset("dtd", tmp_path)


def test_malformed_split_item(tmp_path: Path) -> None:
    _json_layout(tmp_path, [["banded/banded_0001.jpg", "0", "banded"]], [], [])

    with pytest.raises(ValueError, match="item 0 of 'train'"):
        read_dataset("dtd", tmp_path)


def test_absolute_split_path_rejected(tmp_path: Path) -> None:
    _json_layout(tmp_path, [["/data/dtd/images/banded/banded_0001.jpg", 0, "banded"]], [], [])

    with pytest.raises(ValueError, match="absolute path"):
        read_dataset("dtd", tmp_path)


def test_split_file_not_json(tmp_path: Path) -> None:
    fake = make_dataset("dtd", tmp_path, num_classes=1)
    (fake.dataset_dir / "split_zhou_DescribableTextures.json").write_text("{not json")

    with pytest.raises(ValueError, match="is not valid JSON"):
        read_dataset("dtd", tmp_path)


def test_duplicate_class_names_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = "banded/banded_0001.jpg"
    _json_layout(tmp_path, [[image, 0, "banded"], [image, 1, "banded"]], [], [])

    with caplog.at_level(logging.WARNING, logger="benchmarks.datasets"):
        splits = read_dataset("dtd", tmp_path)

    assert splits.classnames == ("banded", "banded")
    assert "several classes named ['banded']" in caplog.text


# ---------------------------------------------------------------------------------------------
# Data classes


def test_splits_coerce_and_validate(tmp_path: Path) -> None:
    item = Datum("a.jpg", 0, "cat")
    splits = DatasetSplits("toy", str(tmp_path), [item], [], [item], ["cat"], "a photo of a {}.")

    assert splits.image_root == tmp_path
    assert splits.train == (item,)
    assert splits.classnames == ("cat",)
    assert splits.num_classes == 1

    with pytest.raises(ValueError, match="is relative"):
        DatasetSplits("toy", "relative/dir", (), (), (), (), "a photo of a {}.")
    with pytest.raises(ValueError, match="no '{}' placeholder"):
        DatasetSplits("toy", tmp_path, (), (), (), (), "a photo")


def test_datum_is_hashable_and_frozen() -> None:
    item = Datum("a.jpg", 0, "cat")

    assert {item, Datum("a.jpg", 0, "cat")} == {item}
    with pytest.raises(AttributeError):
        item.label = 1  # type: ignore[misc]


@pytest.mark.skipif(os.name == "nt", reason="uses a POSIX symlink")
def test_symlinked_dataset_folder(tmp_path: Path) -> None:
    make_dataset("dtd", tmp_path / "store")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dtd").symlink_to(tmp_path / "store" / "dtd")

    splits = read_dataset("dtd", tmp_path / "data")

    assert splits.image_root == tmp_path / "data" / "dtd" / "images"
    assert len(splits.train) == 20

"""CIFAR-100 and MNIST read from torchvision's on-disk formats (the two MTIL datasets outside CoOp).

MTIL (ZSCL, https://arxiv.org/abs/2303.06628) adds CIFAR-100 and MNIST to nine of the CoOp
datasets. Neither has a CoOp folder layout. torchvision keeps CIFAR-100 as the python pickles of
the original release (``cifar-100-python/{train,test,meta}``) and MNIST as IDX files
(``MNIST/raw/*-ubyte``, optionally gzipped). The readers here decode those files once into PNG
images and a split list inside the dataset folder (``<folder>/vlprompt/``), then serve that list
like any CoOp split file. Few-shot sampling, its cache and image loading are therefore shared with
the other datasets. Both datasets use their official train/test split, as ZSCL does; val is empty.

Importing this module registers ``cifar100`` and ``mnist`` in ``benchmarks.datasets.DATASETS``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from benchmarks._io import write_json_atomic
from benchmarks._layouts import RawItem, RawSplits
from benchmarks.datasets import DATASETS, DatasetInfo

logger = logging.getLogger(__name__)

DECODED_DIR = "vlprompt"
"""Folder inside the dataset folder that contains the decoded PNG images and their split list."""
DECODED_SPLIT = "split.json"
DECODE_FORMAT = 1

CIFAR100_FILES = ("train", "test", "meta")
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_CLASSNAMES = tuple(str(digit) for digit in range(10))


# ---------------------------------------------------------------------------------------------
# CIFAR-100 python pickles


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a tampered file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR pickle")
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            payload = _ArrayUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(
            f"CIFAR-100 file {path} is not a CIFAR-100 python pickle ({error}). Replace it with the "
            "file from cifar-100-python.tar.gz."
        ) from error
    if not isinstance(payload, dict):
        raise ValueError(f"CIFAR-100 file {path} contains a {type(payload).__name__}, expected a dict. Replace it with the file from cifar-100-python.tar.gz.")
    return payload


def _cifar_split(path: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """Decode one CIFAR-100 split into ``(N, 32, 32, 3)`` uint8 images and fine labels."""
    payload = _load_cifar_pickle(path)
    if "data" not in payload or "fine_labels" not in payload:
        raise ValueError(
            f"CIFAR-100 file {path} has keys {sorted(payload)}; expected 'data' and 'fine_labels'."
        )
    data = np.asarray(payload["data"], dtype=np.uint8)
    labels = [int(label) for label in payload["fine_labels"]]
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
        raise ValueError(
            f"CIFAR-100 file {path}: 'data' has shape {data.shape} for {len(labels)} labels; "
            "expected (N, 3072) with one row per label."
        )
    bad = sorted({label for label in labels if not 0 <= label < num_classes})
    if bad:
        raise ValueError(f"CIFAR-100 file {path}: labels {bad[:10]} are outside 0..{num_classes - 1}.")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    return images, labels


def _decode_cifar100(folder: Path) -> tuple[tuple[str, ...], dict[str, tuple[np.ndarray, list[int]]]]:
    meta = _load_cifar_pickle(folder / "meta")
    names = meta.get("fine_label_names")
    if not isinstance(names, list) or not names:
        raise ValueError(f"CIFAR-100 file {folder / 'meta'} has no 'fine_label_names' list.")
    classnames = tuple(str(name) for name in names)
    splits = {split: _cifar_split(folder / split, len(classnames)) for split in ("train", "test")}
    return classnames, splits


# ---------------------------------------------------------------------------------------------
# MNIST IDX files


def _find_idx(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (the MNIST format) with ``ndim`` dimensions."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    header = 4 + 4 * ndim
    if len(data) < header or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != ndim:
        raise ValueError(
            f"MNIST file {path} is not an unsigned-byte IDX file with {ndim} dimensions "
            f"(header {data[:4].hex() if len(data) >= 4 else 'truncated'}). Replace it with the "
            "file torchvision.datasets.MNIST downloads."
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    values = np.frombuffer(data, dtype=np.uint8, offset=header)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"MNIST file {path}: header declares shape {shape}, but it holds {values.size} values.")
    return values.reshape(shape)


def _decode_mnist(raw: Path, files: dict[str, tuple[Path, Path]]) -> dict[str, tuple[np.ndarray, list[int]]]:
    splits = {}
    for split, (image_path, label_path) in files.items():
        images = _read_idx(image_path, 3)  # (N, 28, 28)
        labels = [int(label) for label in _read_idx(label_path, 1)]
        if images.shape[0] != len(labels):
            raise ValueError(f"MNIST {split}: {images.shape[0]} images in {image_path} but {len(labels)} labels in {label_path}.")
        bad = sorted({label for label in labels if not 0 <= label <= 9})
        if bad:
            raise ValueError(f"MNIST file {label_path}: labels {bad} are outside 0..9.")
        splits[split] = (images, labels)
    return splits


# ---------------------------------------------------------------------------------------------
# Decoding into PNG files plus a split list


def _fingerprint(paths: list[Path]) -> dict[str, list[int]]:
    return {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in paths}


def _decoded_lists(folder: Path, fingerprint: dict[str, list[int]]) -> dict[str, Any] | None:
    """The stored split list if it was decoded from files with this fingerprint, else None."""
    path = folder / DECODED_DIR / DECODED_SPLIT
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if payload.get("format") != DECODE_FORMAT or payload.get("source") != fingerprint:
        return None
    return payload


def _write_decoded(folder: Path, info: DatasetInfo, classnames: tuple[str, ...],
                   splits: dict[str, tuple[np.ndarray, list[int]]], fingerprint: dict[str, list[int]]) -> None:
    """Write every image as a PNG and the split list, replacing any previous decode atomically."""
    target = folder / DECODED_DIR
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{DECODED_DIR}.", dir=folder))
    except OSError as error:
        raise OSError(
            f"Cannot write the decoded images of {info.name!r} into {folder} ({error}). The "
            f"{info.name} reader decodes torchvision's files once into {target}; make the "
            "dataset folder writable."
        ) from error
    try:
        lists: dict[str, list[RawItem]] = {"train": [], "val": [], "test": []}
        for split, (images, labels) in splits.items():
            (staging / "images" / split).mkdir(parents=True)
            for index, (pixels, label) in enumerate(zip(images, labels)):
                impath = f"{split}/{index:05d}.png"
                Image.fromarray(np.ascontiguousarray(pixels)).save(staging / "images" / impath)
                lists[split].append((impath, label, classnames[label]))
        payload = {"format": DECODE_FORMAT, "source": fingerprint, "classnames": list(classnames), **lists}
        write_json_atomic(staging / DECODED_SPLIT, payload)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _raw_splits(folder: Path, payload: dict[str, Any]) -> RawSplits:
    lists = {split: [tuple(item) for item in payload[split]] for split in ("train", "val", "test")}
    return RawSplits(
        image_root=folder / DECODED_DIR / "images",
        train=lists["train"],
        val=lists["val"],
        test=lists["test"],
        source=folder / DECODED_DIR / DECODED_SPLIT,
        classnames=tuple(payload["classnames"]),
    )


def _decoded_splits(folder: Path, info: DatasetInfo, sources: list[Path],
                    decode: Callable[[], tuple[tuple[str, ...], dict[str, tuple[np.ndarray, list[int]]]]]) -> RawSplits:
    """The split lists of the decoded images, decoding ``sources`` first if they changed."""
    fingerprint = _fingerprint(sources)
    payload = _decoded_lists(folder, fingerprint)
    if payload is None:
        logger.info("Decoding %s into PNG files under %s (first use only).", info.name, folder / DECODED_DIR)
        classnames, splits = decode()
        _write_decoded(folder, info, classnames, splits, fingerprint)
        payload = _decoded_lists(folder, fingerprint)
        if payload is None:
            raise OSError(f"the decoded split list of {info.name!r} under {folder / DECODED_DIR} could not be read back")
    return _raw_splits(folder, payload)


def _missing_files_error(info: DatasetInfo, data_root: Path, missing: list[Path]) -> FileNotFoundError:
    shown = ", ".join(str(path) for path in missing)
    return FileNotFoundError(
        f"Dataset {info.name!r}: missing {shown}. Expected layout under the data root {data_root}: "
        f"{info.layout}. Fix: {info.setup_hint}"
    )


def read_cifar100(data_root: Path, info: DatasetInfo) -> RawSplits:
    """Read CIFAR-100 from ``cifar-100-python/{train,test,meta}``, decoding it on first use."""
    folder = data_root / info.folder
    sources = [folder / name for name in CIFAR100_FILES]
    missing = [path for path in sources if not path.is_file()]
    if missing:
        raise _missing_files_error(info, data_root, missing)
    return _decoded_splits(folder, info, sources, lambda: _decode_cifar100(folder))


def read_mnist(data_root: Path, info: DatasetInfo) -> RawSplits:
    """Read MNIST from ``MNIST/raw/*-ubyte[.gz]``, decoding it on first use."""
    folder = data_root / info.folder
    raw = folder / "raw"
    files: dict[str, tuple[Path, Path]] = {}
    missing: list[Path] = []
    for split, names in MNIST_FILES.items():
        found = [_find_idx(raw, name) for name in names]
        missing += [raw / name for name, path in zip(names, found) if path is None]
        if all(found):
            files[split] = (found[0], found[1])  # type: ignore[assignment]
    if missing:
        raise _missing_files_error(info, data_root, missing)
    sources = [path for pair in files.values() for path in pair]
    return _decoded_splits(folder, info, sources, lambda: (MNIST_CLASSNAMES, _decode_mnist(raw, files)))


CIFAR100 = DatasetInfo(
    name="cifar100",
    display_name="CIFAR100",
    folder="cifar-100-python",
    template="a photo of a {}.",
    reader=read_cifar100,
    layout="cifar-100-python/train, cifar-100-python/test and cifar-100-python/meta "
           "(torchvision's CIFAR-100 python pickles)",
    setup_hint="run torchvision.datasets.CIFAR100(DATA_ROOT, download=True) on a machine with "
               "internet access, or extract cifar-100-python.tar.gz into the data root.",
)

MNIST = DatasetInfo(
    name="mnist",
    display_name="MNIST",
    folder="MNIST",
    # CLIP's published MNIST prompt; the class names are the digits themselves.
    template='a photo of the number: "{}".',
    reader=read_mnist,
    layout="MNIST/raw/train-images-idx3-ubyte, MNIST/raw/train-labels-idx1-ubyte, "
           "MNIST/raw/t10k-images-idx3-ubyte and MNIST/raw/t10k-labels-idx1-ubyte "
           "(torchvision's MNIST IDX files, optionally gzipped)",
    setup_hint="run torchvision.datasets.MNIST(DATA_ROOT, download=True) on a machine with "
               "internet access, or put the four IDX files into MNIST/raw/.",
)

for _info in (CIFAR100, MNIST):
    DATASETS.setdefault(_info.name, _info)

__all__ = ["CIFAR100", "MNIST", "MNIST_CLASSNAMES", "read_cifar100", "read_mnist"]

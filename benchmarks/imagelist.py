"""A torch Dataset over a list of `Datum`, loading images from disk."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from benchmarks.datasets import Datum

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


class ImageListDataset(Dataset):
    """Images of a split list, returned as (transformed image, label).

    Images are opened with PIL and converted to RGB. An image that cannot be read (missing,
    truncated or not an image) is handled according to `on_error`:

    - "raise": raise the error type PIL raised (FileNotFoundError, UnidentifiedImageError, or
      OSError for the rest), with the file path and item index in the message.
    - "skip": log a warning once per file, add its path to `skipped`, and return the next
      readable item in list order (wrapping around), with that item's label. The returned
      label then differs from `targets[index]`, and that item appears twice in the epoch;
      this keeps the batch size and the DataLoader's length fixed.

    NOTE: `skipped` is filled in the process that loads the image. With DataLoader workers
    (`num_workers > 0`) each worker has its own copy, so the main process's set stays empty.
    The warnings in the log are then the complete record.

    Attributes:
        items: The split list.
        image_root: Folder that the item paths are relative to.
        transform: Callable applied to the RGB PIL image, or None to return the PIL image.
        on_error: "raise" or "skip".
        targets: Label of each item, in list order (Avalanche reads this attribute).
        skipped: Paths of the unreadable images met so far in this process (skip mode).
    """

    def __init__(self, items: Sequence[Datum], image_root: str | Path,
                 transform: Callable[[Image.Image], Any] | None = None,
                 on_error: OnError = "raise") -> None:
        """Store the list; no image is opened here.

        Args:
            items: Items to serve, in order.
            image_root: Folder that every `Datum.impath` is relative to.
            transform: Applied to each RGB PIL image, e.g. `build_transform(224, train=False)`.
            on_error: "raise" (default) or "skip"; see the class docstring.

        Raises:
            ValueError: If `on_error` is not "raise" or "skip".
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        self.items: tuple[Datum, ...] = tuple(items)
        self.image_root = Path(image_root)
        self.transform = transform
        self.on_error: OnError = on_error
        self.targets: list[int] = [item.label for item in self.items]
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not -len(self.items) <= index < len(self.items):
            raise IndexError(f"index {index} is out of range for {len(self.items)} items.")
        index %= len(self.items)

        for offset in range(len(self.items)):
            position = (index + offset) % len(self.items)
            item = self.items[position]
            image = self._load(item, position)
            if image is not None:
                if self.transform is not None:
                    image = self.transform(image)
                return image, item.label

        raise OSError(
            f"None of the {len(self.items)} images under {self.image_root} could be read "
            f"(skip mode). Check the data root and the image files; unreadable: "
            f"{sorted(self.skipped)[:5]}."
        )

    def _load(self, item: Datum, position: int) -> Image.Image | None:
        """Return the RGB image of `item`, or None if it is unreadable and skip mode is on."""
        path = self.image_root / item.impath
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as error:  # UnidentifiedImageError and FileNotFoundError included
            if self.on_error == "raise":
                message = (
                    f"Cannot read image {path} (item {position}, label {item.label}): {error}. "
                    "Replace or remove the file, or pass on_error='skip' to skip unreadable "
                    "images."
                )
                if isinstance(error, (FileNotFoundError, UnidentifiedImageError)):
                    raise type(error)(message) from error
                raise OSError(message) from error
            if str(path) not in self.skipped:
                self.skipped.add(str(path))
                logger.warning("Skipping unreadable image %s (item %d): %s", path, position, error)
            return None

"""Frozen image features computed once, cached on disk and fed to the training loop.

Learners whose image tower carries no prompt (``PromptLearner.uses_frozen_image_features``:
zero-shot, CoOp, KgCoOp, TCP, CoCoOp, PLOT) see an image only through
``learner.frozen_image_features(images)``. For them the base-to-novel, few-shot and transfer runs
encode each test image once per backbone instead of once per evaluation, and cache training
features too (continual and federated runs cache their evaluation lists only):

- evaluation: one file per (backbone, image list, transform, feature kind);
- training: ``K`` augmented views per image (``TrainConfig.train_feature_views``, one per epoch
  by default), each drawn under a torch RNG seeded by (run seed, view, image index), one file
  per view. Epoch ``e`` trains on view ``e % K``. With ``K >= epochs`` every epoch sees a fresh
  augmentation of every image, as training without the cache does. The crops differ from an
  uncached run's, because those come from the global RNG, but they follow the same
  distribution.

Layout: ``CACHE_DIR/features/<backbone fingerprint>/<file digest>.pt``. The fingerprint hashes
the model name, the pretrained tag, the module structure (activations included) and every
weight. The digest hashes the feature kind, the transform's ``repr``, the image root and the
list of (path, label), and the view and seed for training files. Each file stores one key per
image (absolute path, size, mtime in ns); rows whose key changed are re-encoded and the file is
rewritten atomically. Features are computed in fp32 without autocast, whatever the run's
precision.

Shape letters: N images of a list, B images in a batch, E joint embedding width, P patch tokens
plus the pooled feature.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from benchmarks import ImageListDataset
from benchmarks.streams import make_experience
from learners import ClipBackbone, PromptLearner, TrainConfig
from learners.io import save_torch

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of the cache file layout; part of every file digest."""

_FINGERPRINTS: "weakref.WeakKeyDictionary[ClipBackbone, str]" = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------------
# Keys


def backbone_fingerprint(backbone: ClipBackbone) -> str:
    """Hash the backbone's name, pretrained tag, module structure and weights (hex, 32 chars).

    The module ``repr`` covers what changes features without changing weights (QuickGELU or
    GELU). Computed once per backbone object: about a second for ViT-B/16's 150M weights.
    """
    cached = _FINGERPRINTS.get(backbone)
    if cached is not None:
        return cached
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{backbone.model_name}\0{backbone.pretrained}\0{backbone.model!r}\0".encode())
    for name, tensor in backbone.model.state_dict().items():
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(raw.numpy()))
    fingerprint = digest.hexdigest()
    _FINGERPRINTS[backbone] = fingerprint
    return fingerprint


def image_key(path: str | os.PathLike) -> str:
    """Identify an image file by absolute path, size and mtime (ns); a missing file is ``|missing``."""
    path = os.path.abspath(path)
    try:
        stat = os.stat(path)
    except OSError:
        return f"{path}|missing"
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def view_seed(seed: int, view: int, index: int) -> int:
    """Seed of the augmentation of image ``index`` in training view ``view`` of a run with ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{view}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ------------------------------------------------------------------------------------------------
# Datasets


class SeededViews(Dataset):
    """An image dataset whose random transform is seeded per (view, image).

    Item ``i`` is transformed under the torch RNG seeded with ``view_seed(seed, view, i)``, and the
    global RNG is left untouched, so a view is the same in every process and with any number of
    DataLoader workers. :meth:`set_epoch` selects view ``epoch``: training on this dataset without
    a cache sees exactly the views that a cache with at least as many views as epochs stores.

    Args:
        dataset: the images, e.g. an :class:`~benchmarks.ImageListDataset` with the train transform.
        seed: the run seed.
        view: the view served first.
    """

    def __init__(self, dataset: ImageListDataset, seed: int, view: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.view = view
        self.targets = list(dataset.targets)

    def set_epoch(self, epoch: int) -> None:
        """Serve view ``epoch`` from now on."""
        self.view = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.seed, self.view, index))
            return self.dataset[index]


class FeatureDataset(Dataset):
    """Precomputed features ``(N, ...)`` with their labels, served as ``(features[i], label)``."""

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows for {labels.shape[0]} labels")
        self.features = features
        self.targets = [int(label) for label in labels]

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.features[index], self.targets[index]


class TrainingViewFeatures(Dataset):
    """Cached features of a training set, one augmented view per epoch, cycling over ``views``.

    The view of epoch ``e`` is ``e % views``; :meth:`set_epoch` loads it from the cache (or
    encodes it) before the epoch starts.
    """

    def __init__(
        self, cache: "FeatureCache", learner: PromptLearner, dataset: ImageListDataset, seed: int, views: int, epoch: int = 0
    ) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views!r}")
        self.cache = cache
        self.learner = learner
        self.dataset = dataset
        self.seed = seed
        self.views = views
        self.view: int | None = None
        self.features = torch.empty(0)
        self.targets: list[int] = []
        logger.info("training on cached frozen features: %d augmented views of %d images under %s",
                    views, len(dataset), cache.root)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Load the view of 0-based ``epoch``."""
        view = epoch % self.views
        if view == self.view:
            return
        features, labels = self.cache.features(self.learner, self.dataset, view=view, seed=self.seed)
        self.features, self.targets, self.view = features, [int(label) for label in labels], view

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.features[index], self.targets[index]


class EpochViewPlugin(SupervisedPlugin):
    """Calls ``dataset.set_epoch(strategy.epoch)`` before every training epoch (resume-aware)."""

    def __init__(self, dataset: TrainingViewFeatures | SeededViews) -> None:
        super().__init__()
        self.dataset = dataset

    def before_training_epoch(self, strategy, *args, **kwargs) -> None:
        self.dataset.set_epoch(strategy.epoch)


# ------------------------------------------------------------------------------------------------
# The cache


@dataclass
class _Stored:
    keys: list[str]
    skipped: list[bool]
    labels: Tensor
    features: Tensor


class FeatureCache:
    """Frozen image features of image lists, on disk under ``root``.

    Args:
        root: cache folder (``CACHE_DIR/features``).
        backbone: the frozen backbone; its fingerprint names the subfolder.
        device: where images are encoded.
        batch_size: images per encoder pass.
        num_workers: DataLoader workers that read and transform the images.
        max_bytes: a list whose features (all views) would take more is not cached.
        train_views: views cached per training image; None means one per epoch, 0 no training cache.

    Attributes:
        encoded_images: images encoded so far (cache misses), for logs and tests.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        backbone: ClipBackbone,
        device: str | torch.device = "cpu",
        batch_size: int = 100,
        num_workers: int = 0,
        max_bytes: float = 16e9,
        train_views: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.backbone = backbone
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_bytes = max_bytes
        self.train_views = train_views
        self.encoded_images = 0
        self._item_bytes: dict[tuple[str, str], int] = {}

    @classmethod
    def from_config(
        cls, root: str | os.PathLike, backbone: ClipBackbone, train_config: TrainConfig, device: str | torch.device
    ) -> "FeatureCache | None":
        """Build the cache a run's train config asks for, or None when ``feature_cache`` is off."""
        if not train_config.feature_cache:
            return None
        return cls(
            root,
            backbone,
            device=device,
            batch_size=train_config.eval_batch_size,
            num_workers=train_config.num_workers,
            max_bytes=train_config.feature_cache_max_gb * 1e9,
            train_views=train_config.train_feature_views,
        )

    # ------------------------------------------------------------------------------------------
    # Which lists are cached

    @staticmethod
    def applies_to(learner: PromptLearner) -> bool:
        """Return whether ``learner`` can be fed cached features."""
        return bool(getattr(learner, "uses_frozen_image_features", False))

    def fits(self, learner: PromptLearner, dataset: ImageListDataset, views: int = 1) -> bool:
        """Return whether ``views`` views of ``dataset`` stay within ``max_bytes``; logs when not."""
        size = len(dataset) * views * self._bytes_per_item(learner, dataset)
        if size <= self.max_bytes:
            return True
        logger.warning(
            "feature cache skipped for %d images x %d views of %s features: %.1f GB would exceed "
            "feature_cache_max_gb=%.1f; those passes encode their images",
            len(dataset), views, learner.frozen_feature_kind, size / 1e9, self.max_bytes / 1e9,
        )
        return False

    def training_views(self, learner: PromptLearner, dataset: ImageListDataset, epochs: int) -> int:
        """Views to cache for training ``epochs`` epochs; 0 when training should read pixels."""
        if not self.applies_to(learner) or epochs < 1:
            return 0
        views = epochs if self.train_views is None else self.train_views
        if views == 0 or not self.fits(learner, dataset, views):
            return 0
        return views

    def _bytes_per_item(self, learner: PromptLearner, dataset: ImageListDataset) -> int:
        key = (type(learner).__name__, learner.frozen_feature_kind)
        if key not in self._item_bytes:
            size = self.backbone.image_size
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                probe = learner.frozen_image_features(torch.zeros(1, 3, size, size, device=self.device))
            self._item_bytes[key] = probe[0].numel() * 4
        return self._item_bytes[key]

    # ------------------------------------------------------------------------------------------
    # Files

    def path(self, learner: PromptLearner, dataset: ImageListDataset, view: int | None = None, seed: int | None = None) -> Path:
        """Return the cache file of ``dataset``'s features for ``learner`` (evaluation or one training view)."""
        digest = hashlib.blake2b(digest_size=16)
        parts = [
            f"format={CACHE_FORMAT}",
            f"kind={learner.frozen_feature_kind}",
            f"transform={dataset.transform!r}",
            f"root={os.path.abspath(dataset.image_root)}",
            f"on_error={dataset.on_error}",
            f"view={view}",
            f"seed={seed if view is not None else None}",
        ]
        digest.update("\0".join(parts).encode())
        for item in dataset.items:
            digest.update(f"\0{item.impath}\0{item.label}".encode())
        name = f"{'eval' if view is None else f'train-view{view}'}-{digest.hexdigest()}.pt"
        return self.root / backbone_fingerprint(self.backbone) / name

    def features(
        self, learner: PromptLearner, dataset: ImageListDataset, view: int | None = None, seed: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Load or encode the features ``(N, ...)`` and labels ``(N,)`` of every image of ``dataset``.

        Rows whose image is unchanged since it was cached are read from disk; the others are
        encoded with ``learner.frozen_image_features`` and the file is rewritten atomically.

        Args:
            learner: the learner whose :meth:`~learners.PromptLearner.frozen_image_features` is cached.
            dataset: the image list with its transform.
            view: None for evaluation (the transform as it is), or the training view index,
                whose random transform is seeded by ``seed`` (see :class:`SeededViews`).
            seed: the run seed, required with ``view``.
        """
        if view is not None and seed is None:
            raise ValueError("a training view needs the run seed")
        if len(dataset) == 0:
            raise ValueError(f"no images to encode under {dataset.image_root}: the image list is empty")
        path = self.path(learner, dataset, view, seed)
        keys = [image_key(dataset.image_root / item.impath) for item in dataset.items]
        stored = self._load(path, len(keys))
        stale = list(range(len(keys))) if stored is None else [i for i, key in enumerate(keys) if stored.keys[i] != key]
        if not stale:
            self._report_skipped(dataset, stored)
            logger.debug("feature cache hit: %s (%d images)", path.name, len(keys))
            return stored.features, stored.labels

        source: Dataset = dataset if view is None else SeededViews(dataset, seed, view)
        features, labels, skipped = self._encode(learner, source, dataset, stale)
        if stored is None:
            merged = _Stored(keys, skipped, labels, features)
        else:
            merged = _Stored(keys, list(stored.skipped), stored.labels.clone(), stored.features.clone())
            index = torch.tensor(stale, dtype=torch.long)
            merged.features[index] = features
            merged.labels[index] = labels
            for row, flag in zip(stale, skipped):
                merged.skipped[row] = flag
            self._report_skipped(dataset, merged)
        save_torch(
            path,
            {"format": CACHE_FORMAT, "keys": merged.keys, "skipped": merged.skipped,
             "labels": merged.labels, "features": merged.features},
        )
        # Training views are encoded once per epoch until every view is cached; their summary
        # line comes from TrainingViewFeatures.
        logger.log(
            logging.INFO if view is None else logging.DEBUG,
            "feature cache: encoded %d of %d images (%s features %s) -> %s",
            len(stale), len(keys), learner.frozen_feature_kind, tuple(merged.features.shape[1:]), path,
        )
        return merged.features, merged.labels

    def _load(self, path: Path, count: int) -> _Stored | None:
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            stored = _Stored(list(payload["keys"]), list(payload["skipped"]), payload["labels"], payload["features"])
        except Exception as error:  # noqa: BLE001 - any unreadable file is re-encoded, never trusted
            logger.warning("feature cache file %s is unreadable (%s: %s); re-encoding", path, type(error).__name__, error)
            return None
        if payload.get("format") != CACHE_FORMAT or len(stored.keys) != count or stored.features.shape[0] != count:
            logger.warning("feature cache file %s does not match its image list; re-encoding", path)
            return None
        return stored

    @staticmethod
    def _report_skipped(dataset: ImageListDataset, stored: _Stored) -> None:
        # Cached rows of unreadable images still count as skipped, as if the images were read.
        for item, flag in zip(dataset.items, stored.skipped):
            if flag:
                dataset.skipped.add(str(dataset.image_root / item.impath))

    def _encode(
        self, learner: PromptLearner, source: Dataset, dataset: ImageListDataset, rows: Sequence[int]
    ) -> tuple[Tensor, Tensor, list[bool]]:
        loader = DataLoader(Subset(source, list(rows)), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        features, labels = [], []
        # The cache outlives the run, so it is written in fp32 whatever the run's autocast. The
        # forked RNG keeps a miss from consuming random numbers (each DataLoader iterator draws
        # a seed), so a run shuffles the same way whether the cache was cold or warm.
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False), torch.random.fork_rng(devices=[]):
            for images, targets in loader:
                features.append(learner.frozen_image_features(images.to(self.device)).float().cpu())
                labels.append(torch.as_tensor(targets, dtype=torch.long))
        self.encoded_images += len(rows)
        # NOTE: with DataLoader workers the main process does not see which images were
        # unreadable (ImageListDataset.skipped stays empty there), so no row is flagged.
        skipped = [str(dataset.image_root / dataset.items[row].impath) in dataset.skipped for row in rows]
        return torch.cat(features), torch.cat(labels), skipped


# ------------------------------------------------------------------------------------------------
# Glue for the protocol runners


def train_experience(
    strategy, dataset: ImageListDataset, seed: int, *, num_workers: int = 0, drop_last: bool = False
) -> None:
    """Train ``strategy`` on ``dataset``, on cached features when its ``feature_cache`` allows.

    Without a cache (``strategy.feature_cache`` None, a learner with prompts in its image tower,
    ``train_feature_views=0`` or a list over the size limit) this is ``strategy.train`` on the
    images. Otherwise each epoch trains on one cached view (see :class:`TrainingViewFeatures`).
    """
    cache: FeatureCache | None = strategy.feature_cache
    learner = strategy.model
    views = cache.training_views(learner, dataset, strategy.total_epochs) if cache is not None else 0
    if not views:
        strategy.train(make_experience(dataset), num_workers=num_workers, drop_last=drop_last)
        return
    features = TrainingViewFeatures(cache, learner, dataset, seed, views, epoch=strategy.start_epoch)
    plugin = EpochViewPlugin(features)
    strategy.plugins.append(plugin)
    strategy.inputs_are_features = True
    try:
        # Features are in memory (or memory-mapped): DataLoader workers would only add copies.
        strategy.train(make_experience(features), num_workers=0, drop_last=drop_last)
    finally:
        strategy.inputs_are_features = False
        strategy.plugins.remove(plugin)


def eval_experience(strategy, dataset: ImageListDataset, *, num_workers: int = 0) -> None:
    """Evaluate ``strategy.model`` on ``dataset``, from cached features when possible."""
    cache: FeatureCache | None = strategy.feature_cache
    learner = strategy.model
    if cache is None or not cache.applies_to(learner) or not cache.fits(learner, dataset):
        strategy.eval([make_experience(dataset)], num_workers=num_workers)
        return
    features = FeatureDataset(*cache.features(learner, dataset))
    strategy.inputs_are_features = True
    try:
        strategy.eval([make_experience(features)], num_workers=0)
    finally:
        strategy.inputs_are_features = False

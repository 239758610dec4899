#!/usr/bin/env python
"""Time every method's training step and evaluation pass with the speed and memory options on
and off, side by side in one process, and print the ratios, peak memory and logit differences.

Off is what the published implementations do: every text pass runs all 77 token positions, every
step encodes its images, an evaluation pass encodes the class prompts once per batch, and no text
chunking or checkpointing is used. On turns on everything vlprompt has:

- truncation of every text pass after its longest end-of-text position;
- cached frozen image features for methods whose image tower has no prompt (the evaluation pass
  reads a warm cache file; the training step gets the features of its batch, as a cached view);
- class prompts encoded once per evaluation pass;
- from ``--checkpoint-from`` classes on, text chunks of ``--text-chunk`` prompts with activation
  checkpointing.

Both paths run in fp32 on the same learner, images and labels, so the largest logit difference
measures what the options change numerically. Peak memory is the process's peak resident set
(VmHWM, reset before each measurement) on CPU and ``torch.cuda.max_memory_allocated`` on CUDA.

Usage::

    python bench_speed.py --model ViT-B-16 --pretrained none --classes 10 100 1000
    python bench_speed.py --model toy-clip --classes 10 --quick
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks import Datum, ImageListDataset, build_transform
from learners import ClassSet, PromptLearner, get_method, list_methods, load_backbone
from learners.backbone import ClipBackbone
from strategies.feature_cache import FeatureCache

logger = logging.getLogger("bench_speed")

TEMPLATE = "a photo of a {}."


# ------------------------------------------------------------------------------------------------
# Measurement


def _libc_trim() -> None:
    """Hand freed heap pages back to the OS, so one measurement's peak does not inflate the next."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resident_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of one measured call: CUDA allocations, or the process's peak resident set."""

    def __init__(self, device: torch.device, collect: bool = True) -> None:
        self.device = device
        self.collect = collect  # a full gc pass takes a quarter second with open_clip loaded
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> None:
        if self.collect:
            gc.collect()
        _libc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            # Writing 5 resets VmHWM to the current resident set (Linux 4.0 and later).
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.kind = "cpu_peak_rss_since_start"

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return _resident_bytes("VmHWM") or 0


@dataclass
class Measurement:
    """One timed call: wall seconds (best of the repeats) and peak memory in bytes."""

    seconds: float
    peak_bytes: int


def measure(call: Callable[[], Any], memory: PeakMemory, repeats: int) -> tuple[Measurement, Any]:
    """Run ``call`` ``repeats`` times; keep the fastest time, the highest peak and the last result."""
    best, peak, result = float("inf"), 0, None
    for _ in range(repeats):
        memory.reset()
        start = time.perf_counter()
        result = call()
        if memory.device.type == "cuda":
            torch.cuda.synchronize(memory.device)
        best = min(best, time.perf_counter() - start)
        peak = max(peak, memory.peak())
    return Measurement(best, peak), result


# ------------------------------------------------------------------------------------------------
# Inputs


def class_names(count: int) -> tuple[str, ...]:
    """Return the first ``count`` ImageNet class names (open_clip's list), for realistic token lengths."""
    if count > len(IMAGENET_CLASSNAMES):
        raise ValueError(f"--classes {count} exceeds the {len(IMAGENET_CLASSNAMES)} ImageNet class names")
    return tuple(IMAGENET_CLASSNAMES[:count])


def write_images(folder: Path, count: int, side: int = 256) -> list[Datum]:
    """Write ``count`` random RGB PNG images (seeded) and return their items, label 0."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.RandomState(0)
    items = []
    for index in range(count):
        path = folder / f"{index:05d}.png"
        if not path.is_file():
            pixels = generator.randint(0, 256, size=(side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        items.append(Datum(impath=path.name, label=0, classname="unused"))
    return items


def relabel(items: Sequence[Datum], num_classes: int) -> list[Datum]:
    """Give the items labels ``0..num_classes-1`` in turn."""
    return [Datum(impath=item.impath, label=index % num_classes, classname="unused") for index, item in enumerate(items)]


# ------------------------------------------------------------------------------------------------
# The two paths


@dataclass
class Settings:
    """Sizes and switches of one benchmark run."""

    train_batch: int
    eval_images: int
    eval_batch: int
    cocoop_eval_images: int
    repeats: int
    checkpoint_from: int
    text_chunk: int
    off_train_max_classes: int
    device: torch.device


def optimized_memory(backbone: ClipBackbone, num_classes: int, settings: Settings):
    if num_classes >= settings.checkpoint_from:
        return backbone.text_memory(chunk_size=settings.text_chunk, checkpoint=True)
    return backbone.text_memory()


def train_step(learner: PromptLearner, inputs: torch.Tensor, labels: torch.Tensor, features: bool) -> torch.Tensor:
    """Run one loss and backward pass (no optimizer step, so both paths see the same parameters)."""
    learner.zero_grad(set_to_none=True)
    if features:
        logits, terms = learner.loss_terms_features(inputs, labels)
    else:
        logits, terms = learner.loss_terms(inputs, labels)
    sum(term.float() for term in terms.values()).backward()
    return logits.detach().float()


def eval_pass_pixels(learner: PromptLearner, dataset: ImageListDataset, settings: Settings, reuse_text: bool) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=settings.eval_batch, shuffle=False)
    outputs = []
    with torch.no_grad():
        if reuse_text:
            with learner.reuse_text_features():
                for images, _ in loader:
                    outputs.append(learner(images.to(settings.device)).float())
        else:
            for images, _ in loader:
                outputs.append(learner(images.to(settings.device)).float())
    return torch.cat(outputs)  # (N, K)


def eval_pass_cached(learner: PromptLearner, cache: FeatureCache, dataset: ImageListDataset, settings: Settings) -> torch.Tensor:
    features, _ = cache.features(learner, dataset)
    outputs = []
    with torch.no_grad(), learner.reuse_text_features():
        for chunk in features.split(settings.eval_batch):
            outputs.append(learner.forward_features(chunk.to(settings.device)).float())
    return torch.cat(outputs)  # (N, K)


# ------------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    """Side-by-side numbers of one method at one class count."""

    method: str
    classes: int
    train_off: Measurement | None = None
    train_on: Measurement | None = None
    eval_off: Measurement | None = None
    eval_on: Measurement | None = None
    max_logit_difference: float | None = None
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def ratio(off: Measurement | None, on: Measurement | None) -> float | None:
        return off.seconds / on.seconds if off is not None and on is not None and on.seconds > 0 else None


def bench_text_tower(backbone: ClipBackbone, num_classes: int, settings: Settings, memory: PeakMemory) -> Row:
    """CoOp's learned class prompts through the text tower, forward and backward, 77 tokens vs truncated."""
    spec = get_method("coop")
    learner = spec.learner_class(backbone, spec.config_class()).to(settings.device)
    learner.set_classnames(ClassSet(class_names(num_classes), TEMPLATE, "imagenet"))
    row = Row("text tower (CoOp prompts)", num_classes)

    def run(truncate: bool) -> torch.Tensor:
        learner.zero_grad(set_to_none=True)
        if truncate:
            with optimized_memory(backbone, num_classes, settings):
                features = learner._encode_class_prompts()
        else:
            with backbone.text_memory(truncate=False):
                features = learner._encode_class_prompts()
        features.float().square().sum().backward()
        return features.detach().float()

    row.train_on, on = measure(lambda: run(True), memory, settings.repeats)
    if num_classes <= settings.off_train_max_classes:
        row.train_off, off = measure(lambda: run(False), memory, settings.repeats)
        row.max_logit_difference = float((on - off).abs().max())
        row.notes.append("max difference of the text features")
    else:
        row.notes.append(f"77-token pass not run above {settings.off_train_max_classes} classes")
    return row


def bench_method(
    method: str, backbone: ClipBackbone, num_classes: int, settings: Settings, memory: PeakMemory, work: Path
) -> Row:
    spec = get_method(method)
    torch.manual_seed(0)
    learner = spec.learner_class(backbone, spec.config_class()).to(settings.device)
    learner.set_classnames(ClassSet(class_names(num_classes), TEMPLATE, "imagenet"))
    row = Row(method, num_classes)
    uses_features = FeatureCache.applies_to(learner)
    size = backbone.image_size
    images_folder = work / "images"

    eval_count = settings.cocoop_eval_images if method == "cocoop" else settings.eval_images
    eval_set = ImageListDataset(relabel(write_images(images_folder, eval_count), num_classes), images_folder,
                                build_transform(size, train=False))
    trainable = spec.train_defaults.epochs > 0 and learner.num_trainable_parameters() > 0
    batch = min(settings.train_batch, spec.train_defaults.batch_size)
    if trainable and batch != settings.train_batch:
        row.notes.append(f"train batch {batch} (the method's published batch)")
    images = torch.stack([eval_set[i % len(eval_set)][0] for i in range(batch)]).to(settings.device)  # (B, 3, H, W)
    labels = torch.arange(batch, device=settings.device) % num_classes

    # Untimed warm-up: builds lazy per-class-set buffers (PromptSRC's and CoPrompt's frozen text
    # targets) with truncation, so both timed paths reuse them.
    learner.train()
    with torch.no_grad(), optimized_memory(backbone, num_classes, settings):
        learner.loss_terms(images[:1], labels[:1])

    differences = []
    if trainable:
        with torch.no_grad():
            batch_features = learner.frozen_image_features(images) if uses_features else None

        def train_on() -> torch.Tensor:
            with optimized_memory(backbone, num_classes, settings):
                if uses_features:
                    return train_step(learner, batch_features, labels, features=True)
                return train_step(learner, images, labels, features=False)

        def train_off() -> torch.Tensor:
            with backbone.text_memory(truncate=False):
                return train_step(learner, images, labels, features=False)

        row.train_on, on_logits = measure(train_on, memory, settings.repeats)
        if num_classes <= settings.off_train_max_classes:
            row.train_off, off_logits = measure(train_off, memory, settings.repeats)
            differences.append(float((on_logits - off_logits).abs().max()))
        else:
            row.notes.append(f"77-token training step not run above {settings.off_train_max_classes} classes")
        learner.zero_grad(set_to_none=True)

    learner.eval()
    if uses_features:
        cache = FeatureCache(work / "features", backbone, device=settings.device, batch_size=settings.eval_batch)
        cache.features(learner, eval_set)  # fill the cache: the timed pass reads it warm

        def eval_on() -> torch.Tensor:
            with optimized_memory(backbone, num_classes, settings):
                return eval_pass_cached(learner, cache, eval_set, settings)
    else:
        def eval_on() -> torch.Tensor:
            with optimized_memory(backbone, num_classes, settings):
                return eval_pass_pixels(learner, eval_set, settings, reuse_text=True)

    def eval_off() -> torch.Tensor:
        with backbone.text_memory(truncate=False):
            return eval_pass_pixels(learner, eval_set, settings, reuse_text=False)

    row.eval_on, on_logits = measure(eval_on, memory, settings.repeats)
    row.eval_off, off_logits = measure(eval_off, memory, settings.repeats)
    differences.append(float((on_logits - off_logits).abs().max()))
    row.max_logit_difference = max(differences)
    row.notes.append(f"{len(eval_set)} evaluation images" + (", warm feature cache" if uses_features else ""))
    return row


def warm_up(backbone: ClipBackbone, device: torch.device) -> None:
    """Run each tower forward and backward once, untimed, so thread pools and kernel caches are
    set up before the first measurement instead of inside it."""
    ids = backbone.tokenize(["a photo of a dog.", "a photo of a golden retriever."])
    embeddings = backbone.token_embedding(ids).detach().requires_grad_(True)  # (K, L, D)
    for truncate in (True, False):
        with backbone.text_memory(truncate=truncate):
            backbone.encode_text_tokens(embeddings, backbone.eot_index(ids)).sum().backward()
    size = backbone.image_size
    images = torch.zeros(2, 3, size, size, device=device, requires_grad=True)
    backbone.encode_image(images).sum().backward()


# ------------------------------------------------------------------------------------------------
# Report


def machine_description(device: torch.device) -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    described = {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described


def _seconds(value: Measurement | None) -> str:
    return f"{value.seconds:.3f}" if value is not None else "-"


def _megabytes(value: Measurement | None) -> str:
    return f"{value.peak_bytes / 2**20:.0f}" if value is not None else "-"


def _ratio(value: float | None) -> str:
    return f"{value:.1f}x" if value is not None else "-"


def markdown_table(rows: Sequence[Row]) -> str:
    header = (
        "| method | classes | train off s | train on s | train speed-up | eval off s | eval on s | eval speed-up "
        "| peak MB train off / on | peak MB eval off / on | max abs logit diff | notes |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for row in rows:
        difference = f"{row.max_logit_difference:.2e}" if row.max_logit_difference is not None else "-"
        lines.append(
            f"| {row.method} | {row.classes} | {_seconds(row.train_off)} | {_seconds(row.train_on)} "
            f"| {_ratio(Row.ratio(row.train_off, row.train_on))} | {_seconds(row.eval_off)} | {_seconds(row.eval_on)} "
            f"| {_ratio(Row.ratio(row.eval_off, row.eval_on))} | {_megabytes(row.train_off)} / {_megabytes(row.train_on)} "
            f"| {_megabytes(row.eval_off)} / {_megabytes(row.eval_on)} | {difference} | {'; '.join(row.notes)} |"
        )
    return header + "\n".join(lines) + "\n"


def row_record(row: Row) -> dict[str, Any]:
    record = asdict(row)
    record["train_speedup"] = Row.ratio(row.train_off, row.train_on)
    record["eval_speedup"] = Row.ratio(row.eval_off, row.eval_on)
    return record


# ------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (default: ViT-B-16)")
    parser.add_argument("--pretrained", default="none", help="pretrained tag or weight file; 'none' for random weights (default: none)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--methods", nargs="+", default=["all"], help="methods to time, or 'all' (default: all)")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000], help="class counts (default: 10 100 1000)")
    parser.add_argument("--large-methods", nargs="+", default=["coop", "kgcoop", "zeroshot"], help="methods also timed above --large-from classes; 'all' for every method (default: coop kgcoop zeroshot)")
    parser.add_argument("--large-from", type=int, default=101, help="class count from which only --large-methods run (default: 101)")
    parser.add_argument("--train-batch", type=int, default=8, help="images per training step, capped at a method's published batch (default: 8)")
    parser.add_argument("--eval-images", type=int, default=32, help="images per evaluation pass (default: 32)")
    parser.add_argument("--cocoop-eval-images", type=int, default=8, help="images per CoCoOp evaluation pass, which encodes K prompts per image (default: 8)")
    parser.add_argument("--eval-batch", type=int, default=32, help="images per evaluation batch (default: 32)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement; the fastest counts (default: 1)")
    parser.add_argument("--checkpoint-from", type=int, default=1000, help="class count from which the optimized path chunks and checkpoints the text tower (default: 1000)")
    parser.add_argument("--text-chunk", type=int, default=256, help="prompts per text-tower chunk with checkpointing (default: 256)")
    parser.add_argument("--off-train-max-classes", type=int, default=100, help="largest class count at which the 77-token training step runs; by estimate it needs tens of GB on ViT-B/16 at 1000 classes (default: 100)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--work-dir", type=Path, default=None, help="folder for the generated images and the feature cache (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=None, help="also write the rows and the machine description as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run: 2 training images, 4 evaluation images")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", module="qpsolvers")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.train_batch, args.eval_images, args.cocoop_eval_images, args.eval_batch = 2, 4, 2, 4
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    methods = list_methods() if args.methods == ["all"] else args.methods
    large = set(list_methods()) if args.large_methods == ["all"] else set(args.large_methods)
    settings = Settings(
        train_batch=args.train_batch, eval_images=args.eval_images, eval_batch=args.eval_batch,
        cocoop_eval_images=args.cocoop_eval_images, repeats=args.repeats, checkpoint_from=args.checkpoint_from,
        text_chunk=args.text_chunk, off_train_max_classes=args.off_train_max_classes, device=device,
    )
    backbone = load_backbone(args.model, args.pretrained, device=device)
    warm_up(backbone, device)
    memory = PeakMemory(device, collect=not args.quick)
    machine = machine_description(device)
    print(f"# bench_speed: {args.model} ({args.pretrained}) on {machine['device']}")
    print(f"nproc {machine['nproc']}, CPU {machine['cpu_model']}, torch {machine['torch']} "
          f"({machine['torch_threads']} threads)" + (f", GPU {machine['gpu']}" if "gpu" in machine else ""))
    if device.type == "cpu":
        print("no GPU used: CPU timings only")
    print(f"command: python bench_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}\n", flush=True)

    records = []
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work_dir or Path(temporary)
        for num_classes in args.classes:
            load_before = os.getloadavg()
            rows = [bench_text_tower(backbone, num_classes, settings, memory)]
            for method in methods:
                if num_classes >= args.large_from and method not in large:
                    continue
                try:
                    rows.append(bench_method(method, backbone, num_classes, settings, memory, work / f"{num_classes}"))
                except (RuntimeError, NotImplementedError, ValueError) as error:
                    rows.append(Row(method, num_classes, notes=[f"failed: {type(error).__name__}: {error}"]))
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
            load_after = os.getloadavg()
            print(f"\n## {num_classes} classes (load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
                  f"peak memory: {memory.kind})\n")
            print(markdown_table(rows), flush=True)
            records.append({
                "classes": num_classes,
                "load_average_before": load_before,
                "load_average_after": load_after,
                "rows": [row_record(row) for row in rows],
            })

    if args.output is not None:
        payload = {"machine": machine, "arguments": {k: str(v) for k, v in vars(args).items()},
                   "peak_memory_kind": memory.kind, "results": records}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""vlprompt command line: ``python run_benchmark.py PROTOCOL [options]``.

With no options, ``python run_benchmark.py base2novel`` runs CoOp on the built-in ``digits``
dataset with the ``toy-clip`` model and its ``digits`` weights, offline, in a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger("vlprompt")

DEFAULT_METHOD = "coop"
DEFAULT_DATASET = "digits"
DEFAULT_MODEL = "toy-clip"
DEFAULT_PRETRAINED = "digits"


def _add_common_arguments(parser: argparse.ArgumentParser, dataset: bool = True, shots: bool = True) -> None:
    """Add the options every protocol shares; a protocol that defines its own ``--dataset`` or
    ``--shots`` turns that one off."""
    parser.add_argument("--method", nargs="+", default=[DEFAULT_METHOD], help="method name(s), or 'all'")
    if dataset:
        parser.add_argument("--dataset", nargs="+", default=[DEFAULT_DATASET], help="dataset name(s) (CoOp config names), or 'all' for the 11 standard ones")
    parser.add_argument("--data-root", type=Path, default=None, help="folder holding the dataset folders (default: $VLPROMPT_DATA or ~/.cache/vlprompt/data)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name, e.g. ViT-B-16 (default: toy-clip)")
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED, help="open_clip pretrained tag (openai, ...), a local weight file such as ~/.cache/clip/ViT-B-16.pt, 'digits' (toy-clip only) or 'none'")
    if shots:
        parser.add_argument("--shots", type=int, default=16, help="training images per class; 0 uses the full training split (default: 16)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds; one run per seed (default: 1)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"), help="where runs and summaries are written (default: runs)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the method's published value); 0 evaluates the initialization")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the method's published value)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)")
    parser.add_argument("--precision", choices=("fp32", "amp-bf16", "amp-fp16"), default="fp32", help="fp32, or autocast with fp32 parameters (default: fp32)")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE", help="override any method or train config field, e.g. --set n_ctx=16 train.lr=0.01")
    parser.add_argument("--cache-dir", type=Path, default=None, help="few-shot splits, weights and feature caches (default: $VLPROMPT_CACHE or ~/.cache/vlprompt)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs from the checkpoint of their last finished epoch (federated: round)")
    parser.add_argument("--force", action="store_true", help="rerun runs whose results.json is already complete")
    parser.add_argument("--on-bad-image", choices=("raise", "skip"), default="raise", help="stop on an unreadable image, or skip and count it (default: raise)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")


def _add_feature_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feature-cache", choices=("on", "off"), default=None, help="cache frozen image features on disk (under --cache-dir) for methods whose image tower has no prompt; off encodes the images in every pass (default: on; same as --set feature_cache=true)")


def _add_base2novel_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_arguments(parser)
    _add_feature_cache_argument(parser)


def _expand(values: Sequence[str], everything: Sequence[str], kind: str) -> list[str]:
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            if name == "all":
                names.extend(everything)
            else:
                names.append(name)
    seen: list[str] = []
    for name in names:
        if name not in seen:
            seen.append(name)
    if not seen:
        raise ValueError(f"no {kind} given")
    return seen


def _settings_list(args: argparse.Namespace) -> list[Any]:
    """Validate names and overrides, and expand the sweep into one RunSettings per run."""
    import torch

    from benchmarks import STANDARD_DATASETS, list_datasets
    from learners import TrainConfig, get_method, list_methods, parse_overrides
    from strategies.experiment import RunSettings

    methods = _expand(args.method, [m for m in list_methods() if m != "zeroshot"], "method")
    for method in methods:
        get_method(method)
    datasets = _expand(args.dataset, list(STANDARD_DATASETS), "dataset")
    known = list_datasets()
    for dataset in datasets:
        if dataset not in known:
            import difflib

            close = difflib.get_close_matches(dataset, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown dataset {dataset!r}.{hint} Known datasets: {', '.join(known)}")
    shot_counts = args.shots if isinstance(args.shots, list) else [args.shots]
    for shots in shot_counts:
        if shots < 0:
            raise ValueError(f"--shots must be >= 0, got {shots}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed_device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"invalid --device {device!r}: {error}; use cpu, cuda or cuda:N") from error
    if parsed_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} needs CUDA, but torch {torch.__version__} sees no GPU; use --device cpu")
    pairs = [pair for group in args.overrides for pair in group]
    settings = []
    for method in methods:
        spec = get_method(method)
        overrides = parse_overrides(pairs, {"method": spec.config_class, "train": TrainConfig}) if pairs else {"method": {}, "train": {}}
        if getattr(args, "feature_cache", None) is not None:
            overrides["train"]["feature_cache"] = args.feature_cache == "on"
        for dataset in datasets:
            for shots, seed in itertools.product(shot_counts, args.seeds):
                settings.append(
                    RunSettings(
                        method=method,
                        dataset=dataset,
                        seed=seed,
                        shots=shots or None,
                        data_root=args.data_root,
                        output_dir=args.output_dir,
                        model=args.model,
                        pretrained=args.pretrained,
                        device=device,
                        precision=args.precision,
                        epochs=args.epochs,
                        batch_size=args.batch_size,
                        method_overrides=overrides["method"],
                        train_overrides=overrides["train"],
                        cache_dir=args.cache_dir,
                        resume=args.resume,
                        progress=not args.no_progress,
                        on_bad_image=args.on_bad_image,
                    )
                )
    return settings


def _is_complete(path: Path) -> bool:
    import json

    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _stored_differences(protocol: str, setting: Any, results_path: Path) -> list[str]:
    """Differences between the requested settings and those recorded in a results file.

    Continual and federated settings compare themselves (``stored_differences``); the paper
    protocols compare the run fields and the resolved configs of ``protocol``.
    """
    import json

    from strategies.experiment import RunSettings, stored_config_differences

    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError):
        return []
    if isinstance(setting, RunSettings):
        return stored_config_differences(setting, results, protocol)
    return setting.stored_differences(results)


def run_sweep(
    protocol: str,
    settings: list[Any],
    run: Callable[[Any], dict],
    force: bool,
    is_complete: Callable[[Any, Path], bool] | None = None,
    results_file: Callable[[Any], Path] | None = None,
) -> int:
    """Run every setting; skip complete ones unless ``force``; report failures and go on.

    A complete run made with other settings is not skipped silently: the sweep reports the
    differences and suggests ``--force`` or another output folder.

    Args:
        is_complete: ``is_complete(setting, results_path)`` decides what counts as complete
            (default: the results file contains ``"complete": true``).
        results_file: the ``results.json`` path of a setting (default: in ``run_dir``).
    """
    from learners.io import remove_temporaries
    from strategies.experiment import run_dir

    failures = []
    for index, setting in enumerate(settings, 1):
        results_path = results_file(setting) if results_file is not None else run_dir(setting, protocol) / "results.json"
        label = results_path.parent.relative_to(setting.output_dir).as_posix()
        complete = is_complete(setting, results_path) if is_complete is not None else _is_complete(results_path)
        if not force and complete:
            differences = _stored_differences(protocol, setting, results_path)
            if not differences:
                logger.info("[%d/%d] %s: complete results exist, skipped (--force reruns)", index, len(settings), label)
                continue
            error = ValueError(
                f"{results_path} contains complete results of other settings ({'; '.join(differences)}); "
                "pass --force to overwrite them, or choose another --output-dir to keep both"
            )
            if len(settings) == 1:
                raise error
            logger.error("%s: %s", label, error)
            failures.append((label, error))
            continue
        logger.info("[%d/%d] %s", index, len(settings), label)
        stale = remove_temporaries(results_path.parent)
        if stale:
            logger.info("removed %d temporary files of interrupted writes: %s", len(stale), ", ".join(p.name for p in stale))
        try:
            run(setting)
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the sweep
            if len(settings) == 1:
                raise
            logger.error("%s failed: %s: %s", label, type(error).__name__, error)
            failures.append((label, error))
    if failures:
        logger.error("%d of %d runs failed: %s", len(failures), len(settings), ", ".join(f for f, _ in failures))
    return 1 if failures else 0


def _run_base2novel(args: argparse.Namespace) -> int:
    from benchmarks.summary import write_summary
    from strategies.protocols import run_base2novel

    settings = _settings_list(args)
    status = run_sweep("base2novel", settings, run_base2novel, args.force)
    paths = write_summary(args.output_dir, "base2novel")
    logger.info("summary: %s", ", ".join(str(p) for p in paths))
    return status


def _add_fewshot_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_arguments(parser, shots=False)
    _add_feature_cache_argument(parser)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="shot counts, one run per count; 0 uses the full training split (default: 1 2 4 8 16)")


def _add_transfer_arguments(parser: argparse.ArgumentParser, targets_help: str) -> None:
    _add_common_arguments(parser, dataset=False)
    _add_feature_cache_argument(parser)
    parser.add_argument("--source", "--dataset", dest="dataset", nargs="+", default=["imagenet"], help="dataset(s) to train on, with all classes; one run per source (default: imagenet)")
    parser.add_argument("--targets", nargs="+", default=None, help=targets_help)


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs_dir", type=Path, metavar="RUNS_DIR", help="the --output-dir of earlier runs")
    parser.add_argument("--published", type=Path, default=None, help="published results table to compare with (default: the one shipped in benchmarks/data/published.json)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")


def _write_summary(output_dir: Path, protocol: str) -> None:
    from benchmarks.summary import write_summary

    paths = write_summary(output_dir, protocol)
    logger.info("summary: %s", ", ".join(str(p) for p in paths))


def _run_fewshot(args: argparse.Namespace) -> int:
    from strategies.protocols import FEWSHOT, run_fewshot

    status = run_sweep(FEWSHOT, _settings_list(args), run_fewshot, args.force)
    _write_summary(args.output_dir, FEWSHOT)
    return status


def _run_transfer(args: argparse.Namespace, protocol: str) -> int:
    from benchmarks import STANDARD_DATASETS, dataset_info
    from strategies.protocols import CROSS_DATASET, DOMAIN_GENERALIZATION_TARGETS, default_targets, results_complete, run_transfer

    settings = _settings_list(args)
    targets = None  # each source's default targets
    if args.targets is not None and args.targets != ["all"]:
        everything = STANDARD_DATASETS if protocol == CROSS_DATASET else DOMAIN_GENERALIZATION_TARGETS
        targets = _expand(args.targets, everything, "target")
        for target in targets:
            dataset_info(target)

    def complete(setting: Any, path: Path) -> bool:
        return results_complete(path, targets if targets is not None else default_targets(protocol, setting.dataset))

    run = functools.partial(run_transfer, protocol=protocol, targets=targets)
    status = run_sweep(protocol, settings, run, args.force, is_complete=complete)
    _write_summary(args.output_dir, protocol)
    return status


def _run_report(args: argparse.Namespace) -> int:
    from benchmarks.report import write_report

    paths = write_report(args.runs_dir, published_path=args.published)
    logger.info("report: %d files under %s", len(paths), args.runs_dir)
    return 0


def _add_continual_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_arguments(parser, dataset=False)
    parser.add_argument("--stream", choices=("datasets", "mtil", "class-incremental", "base-novel"), default="datasets", help="task sequence: one task per dataset (task identity known), the 11 MTIL tasks, the classes of one dataset in steps, or its base then novel classes (default: datasets)")
    parser.add_argument("--datasets", nargs="+", default=["all"], help="datasets stream: dataset names in training order, comma- or space-separated, or 'all' for the 11 CoOp datasets (default: all)")
    parser.add_argument("--dataset", default=None, help="class-incremental and base-novel streams: the dataset whose classes are split")
    parser.add_argument("--order", type=int, choices=(1, 2), default=1, help="mtil: Order I or II; datasets: 1 as listed, 2 reversed (default: 1)")
    parser.add_argument("--classes-per-step", type=int, default=None, help="class-incremental: classes per step; leftover classes join the last step")
    parser.add_argument("--initial-classes", type=int, default=None, help="class-incremental: classes of the first step (default: --classes-per-step)")
    parser.add_argument("--class-order-seed", type=int, default=1993, help="class-incremental: seed of the class order, numpy RandomState permutation (default: 1993)")
    parser.add_argument("--label-order", action="store_true", help="class-incremental: keep the label order instead of the seeded class order")
    parser.add_argument("--train-classes", choices=("current", "seen"), default="current", help="class-incremental: train each step on its own classes or on all classes seen so far (default: current)")
    parser.add_argument("--plugins", nargs="+", default=[], help="continual plugins, comma- or space-separated: gpa, separate_prompts, kg, src, lwf, ewc, replay; options with --set NAME.FIELD=VALUE (default: none)")


def _run_continual(args: argparse.Namespace) -> int:
    from benchmarks.continual import StreamSpec
    from benchmarks.continual_report import write_continual_summary
    from plugins.registry import split_plugin_overrides
    from strategies.continual import PROTOCOL, continual_settings, run_continual

    if args.dataset is not None and args.stream in ("datasets", "mtil"):
        raise ValueError(f"--dataset is for the class-incremental and base-novel streams; the {args.stream} stream takes --datasets or none")
    shared, plugin_pairs = split_plugin_overrides([pair for group in args.overrides for pair in group])
    # The stream names the data, so the RunSettings carry the default dataset as a placeholder.
    base = _settings_list(argparse.Namespace(**{**vars(args), "dataset": [DEFAULT_DATASET], "overrides": [shared]}))
    datasets = tuple(args.datasets) if args.stream == "datasets" else ((args.dataset,) if args.dataset else ())
    stream = StreamSpec(
        kind=args.stream,
        datasets=datasets,
        order=args.order,
        classes_per_step=args.classes_per_step,
        initial_classes=args.initial_classes,
        class_order_seed=None if args.label_order else args.class_order_seed,
        train_classes=args.train_classes,
    )
    settings = continual_settings(base, stream, args.plugins, plugin_pairs)
    status = run_sweep(PROTOCOL, settings, run_continual, args.force)
    paths = write_continual_summary(args.output_dir)
    logger.info("summary: %s", ", ".join(str(p) for p in paths))
    return status


FEDERATED_PARTITIONS = ("dirichlet", "fedotp", "fedtpg", "multidomain", "base2novel")


def _add_federated_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_arguments(parser, shots=False)
    parser.add_argument("--shots", type=int, default=None, help="training images per class per client; 0 uses every image (default: the partition's published protocol)")
    parser.add_argument("--partition", choices=FEDERATED_PARTITIONS, default="dirichlet", help="dirichlet: Dir(alpha) label skew; fedotp: FedOTP's shuffled disjoint class blocks; fedtpg: FedTPG's label-order chunks; multidomain: one dataset per client; base2novel: clients hold base classes only, the global prompt is scored on base and novel (default: dirichlet)")
    parser.add_argument("--base-scheme", choices=("fedtpg", "fedotp", "dirichlet"), default="fedtpg", help="base2novel: how the base classes are split among clients (default: fedtpg, FedTPG's cross-class protocol)")
    parser.add_argument("--clients", type=int, default=None, help="clients per dataset for dirichlet and fedotp splits (default: the protocol's, 10); fedtpg and multidomain derive the count")
    parser.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration; smaller is more skewed (default: 0.3, PromptFolio)")
    parser.add_argument("--classes-per-client", type=int, default=None, help="fedtpg: classes per client (default: 20)")
    parser.add_argument("--class-seed", type=int, default=2023, help="fedotp: seed of the class shuffle, the same for every run seed (default: 2023, FedOTP's)")
    parser.add_argument("--rounds", type=int, default=None, help="communication rounds (default: the protocol's)")
    parser.add_argument("--local-epochs", type=int, default=None, help="epochs each sampled client trains per round (default: the protocol's)")
    parser.add_argument("--fraction", type=float, default=None, help="fraction of clients sampled for training per round (default: 1.0)")
    parser.add_argument("--fraction-evaluate", type=float, default=1.0, help="fraction of clients that report personalized accuracy per round; 0 skips it (default: 1.0)")
    parser.add_argument("--lr", type=float, default=None, help="client SGD learning rate (default: the protocol's)")
    parser.add_argument("--client-classes", choices=("own", "all"), default=None, help="score a client's images over its own classes or all classes of its dataset (default: own for fedtpg and base2novel, else all)")
    parser.add_argument("--strategy", default="fedavg", help="Flower strategy: fedavg, fedprox, fedavgm, fedadagrad, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum, multikrum, bulyan, qfedavg (default: fedavg)")
    parser.add_argument("--strategy-option", dest="strategy_options", action="append", nargs="+", default=[], metavar="KEY=VALUE", help="constructor argument of the strategy, e.g. proximal_mu=0.01 or eta=0.01")
    parser.add_argument("--failure-tolerance", type=float, default=0.5, help="largest fraction of sampled clients that may fail in a round that is still aggregated (default: 0.5)")
    parser.add_argument("--round-timeout", type=float, default=86400.0, help="seconds the server waits for a round's replies (default: 86400)")
    parser.add_argument("--eval-every", type=int, default=1, help="evaluate the global prompt on the server every N rounds; the last round always (default: 1)")
    parser.add_argument("--backend", choices=("ray", "inprocess"), default="ray", help="ray: Flower's Simulation Runtime; inprocess: fallback that runs the clients one by one in this process (default: ray)")
    parser.add_argument("--client-cpus", type=int, default=2, help="Ray CPUs per client; each client running at the same time loads its own backbone copy (default: 2)")
    parser.add_argument("--client-gpus", type=float, default=0.0, help="Ray GPU share per client, for scheduling only (default: 0)")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    parser.add_argument("--ray-object-store-mb", type=int, default=256, help="Ray object store size in MiB (default: 256)")


def _run_federated(args: argparse.Namespace) -> int:
    from benchmarks.federated_report import write_federated_summary
    from strategies.federated import PROTOCOL, FederatedSettings, results_path
    from strategies.fl_apps import SimulationOptions, run_federated

    if args.epochs is not None:
        raise ValueError("federated runs train --local-epochs per round for --rounds rounds; --epochs does not apply")
    # Flower logs through its own console handler; propagating would print every line twice.
    logging.getLogger("flwr").propagate = False
    simulation = SimulationOptions(backend=args.backend, client_cpus=args.client_cpus, client_gpus=args.client_gpus, ray_cpus=args.ray_cpus, object_store_mb=args.ray_object_store_mb)
    # Validates the methods, datasets and --set pairs; one entry per (method, dataset, seed).
    base = _settings_list(argparse.Namespace(**{**vars(args), "shots": 0}))
    datasets = list(dict.fromkeys(s.dataset for s in base))
    federations = [tuple(datasets)] if args.partition in ("multidomain", "base2novel") else [(d,) for d in datasets]
    overrides = " ".join(pair for group in args.overrides for pair in group)
    strategy_options = " ".join(pair for group in args.strategy_options for pair in group)
    settings = [
        FederatedSettings(
            method=method, datasets=federation, partition=args.partition, base_scheme=args.base_scheme,
            clients=args.clients, alpha=args.alpha, classes_per_client=args.classes_per_client, class_seed=args.class_seed,
            shots=args.shots, rounds=args.rounds, local_epochs=args.local_epochs, fraction=args.fraction,
            fraction_evaluate=args.fraction_evaluate, batch_size=args.batch_size, lr=args.lr, client_classes=args.client_classes,
            strategy=args.strategy, strategy_options=strategy_options, failure_tolerance=args.failure_tolerance,
            round_timeout=args.round_timeout, eval_every=args.eval_every, overrides=overrides, seed=seed,
            model=args.model, pretrained=args.pretrained, device=base[0].device, precision=args.precision,
            data_root=str(args.data_root or ""), cache_dir=str(args.cache_dir or ""), output_dir=str(args.output_dir),
            on_bad_image=args.on_bad_image, resume=args.resume,
        )
        for method in dict.fromkeys(s.method for s in base)
        for federation in federations
        for seed in args.seeds
    ]
    run = functools.partial(run_federated, simulation=simulation)
    status = run_sweep(PROTOCOL, settings, run, args.force, results_file=results_path)
    paths = write_federated_summary(args.output_dir)
    logger.info("summary: %s", ", ".join(str(p) for p in paths))
    return status


PROTOCOLS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "base2novel": (
        "train on the base half of the classes, evaluate base and novel (HM)",
        _add_base2novel_arguments,
        _run_base2novel,
    ),
    "fewshot": (
        "train on K images of every class, evaluate on the full test split, for each K",
        _add_fewshot_arguments,
        _run_fewshot,
    ),
    "cross-dataset": (
        "train on a source dataset (all classes), evaluate the same prompts on other datasets",
        functools.partial(_add_transfer_arguments, targets_help="datasets to evaluate on, or 'all' (default: the 10 standard datasets other than the source)"),
        functools.partial(_run_transfer, protocol="cross-dataset"),
    ),
    "domain-generalization": (
        "train on ImageNet, evaluate on ImageNet-V2, -Sketch, -A and -R",
        functools.partial(_add_transfer_arguments, targets_help="ImageNet variants to evaluate on, or 'all' (default: imagenetv2 imagenet_sketch imagenet_a imagenet_r)"),
        functools.partial(_run_transfer, protocol="domain-generalization"),
    ),
    "continual": (
        "train on a sequence of tasks; report the accuracy matrix, Transfer/Avg/Last, forgetting and BWT",
        _add_continual_arguments,
        _run_continual,
    ),
    "federated": (
        "federated prompt learning on Flower: clients train on their partition, a Flower strategy aggregates the global prompt",
        _add_federated_arguments,
        _run_federated,
    ),
    "report": (
        "rebuild the summaries of every protocol under RUNS_DIR and plot them as PNG files",
        _add_report_arguments,
        _run_report,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_benchmark.py",
        description="Benchmark prompt learners for CLIP-style models on the paper protocols.",
    )
    commands = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    for name, (help_text, add_arguments, _) in PROTOCOLS.items():
        add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def configure_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_open_clip_root_messages)


def _quiet_open_clip_root_messages(record: logging.LogRecord) -> bool:
    """Drop open_clip's root-logger notices below ERROR.

    open_clip logs through the root logger; its "No pretrained weights loaded" warning is
    misleading here because the adapter loads local weight files itself after building the model.
    """
    return not (record.name == "root" and "open_clip" in record.pathname and record.levelno < logging.ERROR)


def _prepare_builtin_data(args: argparse.Namespace) -> None:
    """Write the built-in ``digits`` dataset under the data root when a run names it."""
    named: list[str] = []
    for field in ("dataset", "datasets", "source", "targets"):
        value = getattr(args, field, None)
        if isinstance(value, str):
            named.append(value)
        elif isinstance(value, (list, tuple)):
            named.extend(str(v) for v in value)
    if any(DEFAULT_DATASET in name.split(",") for name in named):
        from benchmarks import build_digits, default_data_root

        build_digits(args.data_root if args.data_root is not None else default_data_root())


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", "INFO"))
    import warnings

    warnings.filterwarnings("ignore", module="qpsolvers")
    warnings.filterwarnings("ignore", message=".*No loggers specified.*")
    try:
        _prepare_builtin_data(args)
        return PROTOCOLS[args.protocol][2](args)
    except KeyboardInterrupt:
        logger.error(
            "interrupted; the current run's folder keeps the checkpoint of its last finished epoch (federated: "
            "round): run the same command with --resume to continue"
        )
        return 130
    except (ValueError, OSError, NotImplementedError, RuntimeError, FloatingPointError) as error:
        logger.error("%s", error)
        logger.debug("traceback", exc_info=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Continual-learning plugins selectable by name (``--plugins lwf,replay``), with typed configs.

Each plugin has a frozen config dataclass whose fields can be set on the command line with
``--set NAME.FIELD=VALUE`` (e.g. ``--set ewc.ewc_lambda=100 replay.mem_size=500``).
:func:`build_plugins` returns the plugins in a fixed order, whatever order the names came in:
prompt aggregation first (its state is what the others snapshot after an experience), then the
separate-prompts baseline, the regularizers, LwF, EWC and replay.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

from avalanche.core import SupervisedPlugin

from benchmarks.continual import ContinualStream
from learners.templates import get_ensemble


@dataclass(frozen=True)
class GPAConfig:
    """Gaussian prompt aggregation (PromptSRC) over the epochs of each experience.

    Attributes:
        mean: mean of the Gaussian epoch weights, in 1-based epochs; None puts it at 75% of the
            experience's epochs (PromptSRC: 15 of 20).
        std: standard deviation, in epochs.
    """

    mean: float | None = None
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.std <= 0:
            raise ValueError(f"gpa.std must be > 0 epochs, got {self.std!r}")


@dataclass(frozen=True)
class SeparatePromptsConfig:
    """Upper-bound baseline with one prompt per task (no options)."""


@dataclass(frozen=True)
class KnowledgeGuidedConfig:
    """Knowledge-guided distance to the hand-crafted class text features (KgCoOp).

    Attributes:
        weight: weight of the term (KgCoOp: 8.0).
        template: hand-crafted template; None uses each task's own dataset template.
    """

    weight: float = 8.0
    template: str | None = None

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"kg.weight must be >= 0, got {self.weight!r}")
        if self.template is not None and "{}" not in self.template:
            raise ValueError(f"kg.template {self.template!r} has no '{{}}' placeholder for the class name")


@dataclass(frozen=True)
class SelfConsistencyConfig:
    """PromptSRC's self-consistency terms against the frozen backbone.

    Attributes:
        text_weight / image_weight / logit_weight: weights of the text L1, image L1 and logit KL
            (PromptSRC: 25, 10, 1).
        templates: template ensemble of the frozen text features, or None for the task's template.
    """

    text_weight: float = 25.0
    image_weight: float = 10.0
    logit_weight: float = 1.0
    templates: str | None = "promptsrc60"

    def __post_init__(self) -> None:
        for name in ("text_weight", "image_weight", "logit_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"src.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.templates is not None:
            get_ensemble(self.templates)


@dataclass(frozen=True)
class LwFConfig:
    """Learning without Forgetting (Avalanche's defaults).

    Attributes:
        alpha: weight of the distillation term.
        temperature: softmax temperature of the distillation.
    """

    alpha: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.temperature <= 0:
            raise ValueError(f"lwf.alpha must be >= 0 and lwf.temperature > 0, got {self.alpha!r}, {self.temperature!r}")


@dataclass(frozen=True)
class EWCConfig:
    """Elastic Weight Consolidation over the prompt parameters.

    Attributes:
        ewc_lambda: weight of the penalty.
        mode: ``separate`` keeps one penalty per past task, ``online`` one decayed penalty.
        decay_factor: decay of the ``online`` importances (required there, unused otherwise).
    """

    # NOTE: no published value exists for prompt parameters; 100 is an untuned starting point.
    ewc_lambda: float = 100.0
    mode: Literal["separate", "online"] = "separate"
    decay_factor: float | None = None

    def __post_init__(self) -> None:
        if self.ewc_lambda < 0:
            raise ValueError(f"ewc.ewc_lambda must be >= 0, got {self.ewc_lambda!r}")
        if (self.mode == "online") != (self.decay_factor is not None):
            raise ValueError("ewc.decay_factor must be set for ewc.mode=online and only then")


@dataclass(frozen=True)
class ReplayConfig:
    """Experience replay with Avalanche's experience-balanced buffer.

    Attributes:
        mem_size: images kept in the buffer, over all past tasks.
        batch_size_mem: replayed images per step; None uses the training batch size.
        task_balanced: draw the replayed images balanced over tasks.
    """

    mem_size: int = 200
    batch_size_mem: int | None = None
    task_balanced: bool = False

    def __post_init__(self) -> None:
        if self.mem_size < 1:
            raise ValueError(f"replay.mem_size must be >= 1, got {self.mem_size!r}")
        if self.batch_size_mem is not None and self.batch_size_mem < 1:
            raise ValueError(f"replay.batch_size_mem must be >= 1, got {self.batch_size_mem!r}")


@dataclass(frozen=True)
class PluginContext:
    """Inputs a plugin may need when it is built: the stream and the epochs per experience."""

    stream: ContinualStream
    epochs: int


@dataclass(frozen=True)
class PluginSpec:
    name: str
    config_class: type
    build: Callable[[Any, PluginContext], SupervisedPlugin]
    description: str


def _gpa(config: GPAConfig, context: PluginContext) -> SupervisedPlugin:
    from .gpa import GaussianPromptAggregationPlugin

    mean = config.mean if config.mean is not None else 0.75 * max(context.epochs, 1)
    return GaussianPromptAggregationPlugin(mean, config.std)


def _separate(config: SeparatePromptsConfig, context: PluginContext) -> SupervisedPlugin:
    from .separate_prompts import SeparatePromptsPlugin

    return SeparatePromptsPlugin()


def _kg(config: KnowledgeGuidedConfig, context: PluginContext) -> SupervisedPlugin:
    from .regularizers import KnowledgeGuidedPlugin

    return KnowledgeGuidedPlugin(config.weight, config.template)


def _src(config: SelfConsistencyConfig, context: PluginContext) -> SupervisedPlugin:
    from .regularizers import SelfConsistencyPlugin

    return SelfConsistencyPlugin(config.text_weight, config.image_weight, config.logit_weight, config.templates)


def _lwf(config: LwFConfig, context: PluginContext) -> SupervisedPlugin:
    from .avalanche_adapters import PromptLwFPlugin

    return PromptLwFPlugin(alpha=config.alpha, temperature=config.temperature)


def _ewc(config: EWCConfig, context: PluginContext) -> SupervisedPlugin:
    from .avalanche_adapters import PromptEWCPlugin

    return PromptEWCPlugin(config.ewc_lambda, mode=config.mode, decay_factor=config.decay_factor)


def _replay(config: ReplayConfig, context: PluginContext) -> SupervisedPlugin:
    from .avalanche_adapters import PromptReplayPlugin

    return PromptReplayPlugin(context.stream, config.mem_size, config.batch_size_mem, config.task_balanced)


PLUGINS: dict[str, PluginSpec] = {
    spec.name: spec
    for spec in (
        PluginSpec("gpa", GPAConfig, _gpa, "Gaussian prompt aggregation over each task's epochs (PromptSRC)"),
        PluginSpec("separate_prompts", SeparatePromptsConfig, _separate, "upper bound: one prompt per task, oracle task identity"),
        PluginSpec("kg", KnowledgeGuidedConfig, _kg, "knowledge-guided distance to hand-crafted text features (KgCoOp)"),
        PluginSpec("src", SelfConsistencyConfig, _src, "self-consistency L1/KL against the frozen backbone (PromptSRC)"),
        PluginSpec("lwf", LwFConfig, _lwf, "Learning without Forgetting, Avalanche's model copy"),
        PluginSpec("ewc", EWCConfig, _ewc, "Elastic Weight Consolidation over the prompts, Avalanche's"),
        PluginSpec("replay", ReplayConfig, _replay, "experience replay with Avalanche's buffer"),
    )
}
"""Every plugin by name, in the order :func:`build_plugins` attaches them."""

EXCLUSIVE = ("separate_prompts", ("lwf", "ewc", "replay"))


def plugin_names(values: Sequence[str]) -> list[str]:
    """Parse ``--plugins`` values (comma-separated, ``none`` for no plugin) and check each name.

    Raises:
        ValueError: an unknown name (with close matches), a repeated name, or the separate-prompts
            baseline combined with a method that shares prompts across tasks.
    """
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip().replace("-", "_")
            if not name or name == "none":
                continue
            if name not in PLUGINS:
                close = difflib.get_close_matches(name, list(PLUGINS), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"unknown plugin {name!r}.{hint} Plugins: {', '.join(PLUGINS)}")
            if name in names:
                raise ValueError(f"plugin {name!r} is listed twice")
            names.append(name)
    baseline, shared = EXCLUSIVE
    clash = [name for name in names if name in shared]
    if baseline in names and clash:
        raise ValueError(f"{baseline} trains an independent prompt per task; it cannot be combined with {clash}")
    return [name for name in PLUGINS if name in names]


def plugin_config_classes(names: Sequence[str]) -> dict[str, type]:
    """``--set`` sections of the given plugins: name -> config dataclass."""
    return {name: PLUGINS[name].config_class for name in names}


def build_plugins(names: Sequence[str], context: PluginContext,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[list[SupervisedPlugin], dict[str, Any]]:
    """Build the named plugins in the registry's order.

    Returns:
        The plugins, and name -> resolved config (for results.json).
    """
    overrides = overrides or {}
    plugins, configs = [], {}
    for name in plugin_names(names):
        spec = PLUGINS[name]
        config = spec.config_class(**dict(overrides.get(name, {})))
        plugins.append(spec.build(config, context))
        configs[name] = config
    return plugins, configs


def split_plugin_overrides(pairs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``--set`` pairs into (method and train pairs, plugin pairs ``NAME.FIELD=VALUE``)."""
    others, plugin_pairs = [], []
    for pair in pairs:
        section = pair.split("=", 1)[0].strip().replace("-", "_").split(".", 1)
        (plugin_pairs if len(section) == 2 and section[0] in PLUGINS else others).append(pair)
    return others, plugin_pairs


def parse_plugin_overrides(pairs: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Convert ``NAME.FIELD=VALUE`` pairs for the selected plugins and check each config builds.

    Raises:
        ValueError: a pair for a plugin that is not selected, an unknown field, a value of the
            wrong type, or a config that fails its own validation.
    """
    from learners.config import parse_overrides

    selected = plugin_names(names)
    unselected = sorted({p.split(".", 1)[0].replace("-", "_") for p in pairs} - set(selected))
    if unselected:
        raise ValueError(f"--set gives options for plugins {unselected} that --plugins does not select ({selected or 'none'})")
    overrides = parse_overrides(list(pairs), plugin_config_classes(selected)) if pairs else {}
    for name in selected:
        PLUGINS[name].config_class(**overrides.get(name, {}))
    return {name: values for name, values in overrides.items() if values}

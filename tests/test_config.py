"""Training config: the Dassl LR schedule, optimizer, and --set parsing."""

from __future__ import annotations

import pytest
import torch

from learners import TrainConfig, build_optimizer, lr_at_epoch, parse_overrides
from learners.coop import CoOpConfig

# Learning rate used in each epoch, measured by running Dassl's own scheduler.
MAPLE = [1.0000e-05, 3.5000e-03, 3.1658e-03, 2.2908e-03, 1.2092e-03]
COCOOP = [1.0000e-05, 2.0000e-03, 1.9511e-03, 1.8090e-03, 1.5878e-03, 1.3090e-03, 1.0000e-03, 6.9098e-04, 4.1221e-04, 1.9098e-04]
PROMPTSRC_HEAD = [1.0000e-05, 2.5000e-03, 2.4846e-03, 2.4388e-03, 2.3638e-03]
PROMPTSRC_TAIL = [1.3624e-04, 6.1179e-05]


@pytest.mark.parametrize(
    ("lr", "epochs", "expected"),
    [(0.0035, 5, MAPLE), (0.002, 10, COCOOP)],
)
def test_lr_schedule_matches_dassl(lr, epochs, expected):
    config = TrainConfig(lr=lr, epochs=epochs)
    values = [lr_at_epoch(config, e) for e in range(epochs)]
    assert values == pytest.approx(expected, rel=1e-4)


def test_lr_schedule_promptsrc_never_reaches_zero():
    config = TrainConfig(lr=0.0025, epochs=20)
    values = [lr_at_epoch(config, e) for e in range(20)]
    assert values[:5] == pytest.approx(PROMPTSRC_HEAD, rel=1e-4)
    assert values[-2:] == pytest.approx(PROMPTSRC_TAIL, rel=1e-4)
    assert min(values) > 0


def test_sgd_optimizer_uses_dassl_defaults():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer([param], TrainConfig())
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert group["momentum"] == 0.9
    assert group["weight_decay"] == 5e-4
    assert group["dampening"] == 0
    assert group["nesterov"] is False


def test_adam_eps_is_configurable():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer([param], TrainConfig(optimizer="adam", adam_eps=1e-3))
    assert optimizer.param_groups[0]["eps"] == 1e-3


def test_overrides_are_type_checked():
    sections = {"method": CoOpConfig, "train": TrainConfig}
    parsed = parse_overrides(["n_ctx=16", "train.lr=0.01", "ctx_init=none", "class_specific=true"], sections)
    assert parsed["method"] == {"n_ctx": 16, "ctx_init": None, "class_specific": True}
    assert parsed["train"] == {"lr": 0.01}
    with pytest.raises(ValueError, match="n_ctx expects an integer, got 'four'"):
        parse_overrides(["n_ctx=four"], sections)
    with pytest.raises(ValueError, match="class_token_position must be one of"):
        parse_overrides(["class_token_position=left"], sections)


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config key 'n_ctxx'.*Did you mean n_ctx\?.*train\.lr"):
        parse_overrides(["n_ctxx=3"], {"method": CoOpConfig, "train": TrainConfig})
    with pytest.raises(ValueError, match="expects KEY=VALUE"):
        parse_overrides(["n_ctx"], {"method": CoOpConfig})


def test_invalid_train_config_names_the_value():
    with pytest.raises(ValueError, match="optimizer must be .* got 'rmsprop'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="epochs must be >= 0, got -1"):
        TrainConfig(epochs=-1)

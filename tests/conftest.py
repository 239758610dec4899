"""Shared pytest set-up: telemetry off, and the offline digits data and weights built once."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# The test models are tiny: one thread avoids oversubscribing the 2 CI cores with thread pools.
torch.set_num_threads(1)
# Set, not defaulted: no test may let Flower or Ray phone home, whatever the caller's environment.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
warnings.filterwarnings("ignore", module="qpsolvers")


@pytest.fixture(scope="session")
def digits_env(tmp_path_factory):
    """Data root and cache dir holding the built-in digits dataset and its toy-clip weights.

    The weights are pre-trained once per test session (tens of seconds on 2 cores).
    """
    from benchmarks import build_digits
    from strategies.pretrain import ensure_digits_weights

    root = tmp_path_factory.mktemp("digits_env")
    data_root, cache_dir = root / "data", root / "cache"
    build_digits(data_root)
    ensure_digits_weights(data_root, cache_dir)
    return {"data_root": data_root, "cache_dir": cache_dir}

"""Shared pytest set-up: telemetry off, default data and cache folders inside a temporary folder,
and the offline digits data and weights built once."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

import pytest
import torch

# The test models are tiny: one thread avoids oversubscribing the 2 CI cores with thread pools.
torch.set_num_threads(1)
# Set, not defaulted: no test may let Flower or Ray phone home, whatever the caller's environment.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Runs without --data-root or --cache-dir (the README's default job) write into a folder of this
# session, never into the user's ~/.cache/vlprompt or real data folders.
_SESSION_HOME = tempfile.mkdtemp(prefix="vlprompt-tests-")
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)
os.environ["VLPROMPT_DATA"] = os.path.join(_SESSION_HOME, "data")
os.environ["VLPROMPT_CACHE"] = os.path.join(_SESSION_HOME, "cache")
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

"""Round checkpoints of a federated run, so that ``--resume`` continues a killed run exactly.

After every round the server writes ``resume.pt`` into the run folder: the global arrays, the
result rows so far, the strategy's state (:meth:`RoundBookkeeping.state_dict`), the random
generator states and a fingerprint of the settings. A resumed run restores all of it and starts
Flower's round loop after the saved round, so with the in-process backend on CPU it ends with the
same results as a run that was never interrupted.

NOTE: under Ray (flwr 1.42) every start registers the nodes under new random ids and replies
arrive in any order. A resumed Ray run, like any two Ray runs, therefore samples other clients
when the fraction is below 1, and its aggregates can differ in the last bits.

A client's local (personalized) state lives in its Flower ``Context``, which dies with the
process. Where the run config names a ``client-state-dir``, each client also writes its local
state there (``client<partition-id>.pt``); the file never leaves the client's machine. The
file is tagged with the run token that the server sends in every message and keeps in its
checkpoint, so a client never reads the state of another run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch
from torch import Tensor

from learners.io import save_torch

from .federated import UNCOMPARED_RUN_CONFIG_KEYS, FederatedSettings

RESUME_FILE = "resume.pt"
CLIENT_STATE_DIR = "client_state"
RUN_TOKEN_KEY = "run-token"
"""Message config key: random id of one run, the same in every resumed part of it."""
CHECKPOINT_SCHEMA = 1

def run_fingerprint(settings: FederatedSettings, partition_digest: str) -> dict[str, Any]:
    """Return the settings that a checkpoint must share with the run that resumes it."""
    fingerprint: dict[str, Any] = {
        key: value for key, value in settings.to_run_config().items() if key not in UNCOMPARED_RUN_CONFIG_KEYS
    }
    fingerprint["partition-digest"] = partition_digest
    # The strategy state is a snapshot of flwr's own attributes, which may change between releases.
    fingerprint["flwr-version"] = flwr.__version__
    return fingerprint


def capture_rng() -> dict[str, Any]:
    """Return the states of Python's, NumPy's and torch's global random generators."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(states: dict[str, Any]) -> None:
    """Set the global random generators to a :func:`capture_rng` result."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass(frozen=True)
class RoundCheckpoint:
    """The server's ``resume.pt`` of one run.

    Attributes:
        path: The checkpoint file in the run folder.
        fingerprint: :func:`run_fingerprint` of the run that writes it.
        run_token: Id of the run, sent to the clients under ``run-token``.
    """

    path: Path
    fingerprint: dict[str, Any]
    run_token: str

    def save(self, server_round: int, arrays: dict[str, Tensor], recorder: dict[str, Any],
             strategy: dict[str, Any]) -> None:
        """Write the state after ``server_round`` atomically, replacing the previous round's.

        Args:
            server_round: The round just finished.
            arrays: The global state that the next round starts from.
            recorder: :meth:`RunRecorder.state_dict` of the run.
            strategy: :meth:`RoundBookkeeping.state_dict` of the strategy.
        """
        save_torch(self.path, {
            "schema": CHECKPOINT_SCHEMA,
            "round": server_round,
            "fingerprint": self.fingerprint,
            "run_token": self.run_token,
            "arrays": arrays,
            "recorder": recorder,
            "strategy": strategy,
            "rng": capture_rng(),
        })

    def remove(self) -> None:
        """Delete the checkpoint once the run is complete."""
        self.path.unlink(missing_ok=True)


def load_round_checkpoint(path: Path, fingerprint: dict[str, Any], rounds_planned: int) -> dict[str, Any]:
    """Read ``resume.pt`` and check that it belongs to a run with these settings.

    Raises:
        ValueError: The file cannot be read, has another schema, was written with other
            settings (each differing key is named with both values), or records more rounds
            than the run plans.
    """
    restart = "rerun without --resume to start over"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise ValueError(f"cannot resume from {path}: the file cannot be read ({type(error).__name__}: {error}); "
                         f"{restart}") from error
    if not isinstance(payload, dict) or payload.get("schema") != CHECKPOINT_SCHEMA:
        found = payload.get("schema") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"cannot resume from {path}: it has checkpoint schema {found!r}, expected "
                         f"{CHECKPOINT_SCHEMA}; {restart}")
    saved = payload["fingerprint"]
    differing = sorted(key for key in set(saved) | set(fingerprint) if saved.get(key) != fingerprint.get(key))
    if differing:
        details = ", ".join(f"{key} (checkpoint {_shown(saved, key)}, now {_shown(fingerprint, key)})" for key in differing)
        raise ValueError(
            f"cannot resume from {path}: it was saved by a run with other settings: {details}. "
            f"Resume with the same options, or {restart}"
        )
    if not 0 < payload["round"] <= rounds_planned:
        raise ValueError(f"cannot resume from {path}: it was saved after round {payload['round']}, but the run plans "
                         f"{rounds_planned} rounds; {restart}")
    return payload


def _shown(fingerprint: dict[str, Any], key: str) -> str:
    # to_run_config leaves out unset options, which take the protocol's default.
    return repr(fingerprint[key]) if key in fingerprint else "default"


@dataclass(frozen=True)
class ClientStateFile:
    """One client's local state on its own disk, kept for the last two rounds it trained in.

    A resumed server repeats the round that was running when the run was killed, and a client
    may already have trained in it. Keeping the previous round's state as well lets the client
    start that round again from the state it had before.

    Attributes:
        path: ``<client-state-dir>/client<partition-id>.pt``.
        run_token: The run's id; a file written under another token is ignored.
    """

    path: Path
    run_token: str

    def _rounds(self) -> dict[int, dict[str, Tensor]]:
        if not self.path.is_file():
            return {}
        payload = torch.load(self.path, map_location="cpu", weights_only=True)
        if payload.get("run_token") != self.run_token:
            return {}
        return payload["rounds"]

    def load(self, latest_round: int) -> dict[str, Tensor] | None:
        """Return the state saved after the last round up to ``latest_round``, or None."""
        rounds = self._rounds()
        eligible = [r for r in rounds if r <= latest_round]
        return rounds[max(eligible)] if eligible else None

    def save(self, server_round: int, state: dict[str, Tensor]) -> None:
        """Store the state after ``server_round`` and keep the latest earlier round's beside it."""
        earlier = {r: s for r, s in self._rounds().items() if r < server_round}
        retained = {max(earlier): earlier[max(earlier)]} if earlier else {}
        retained[server_round] = state
        save_torch(self.path, {"run_token": self.run_token, "rounds": retained})

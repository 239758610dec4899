"""run_benchmark.py federated through Flower's Simulation Runtime (Ray) on the built-in digits.

Ray 2.55's GCS, raylet and worker servers listen on every interface, and ``ray.init`` turns
127.0.0.1 into the machine's address, so the run goes into a private network namespace
(``unshare -rn``) whose only interface is loopback. The test is skipped where such a namespace
cannot be created. Every process left in the namespace afterwards is killed by its pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAIN = "import sys, run_benchmark; sys.exit(run_benchmark.main(sys.argv[1:]))"


def _loopback_namespace_available() -> bool:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return False
    probe = subprocess.run([unshare, "-rn", ip, "link", "set", "lo", "up"], capture_output=True, timeout=30)
    return probe.returncode == 0


def _namespace_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _processes_in(namespace: str) -> dict[int, str]:
    """Pid -> command line of every live process in the network namespace."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _namespace_of(int(entry.name)) == namespace:
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            except OSError:
                continue
    return found


def _survivors(namespace: str, grace: float = 15.0) -> dict[int, str]:
    """Processes still in the namespace after ``grace`` seconds (Ray's helpers exit shortly after
    the driver shuts Ray down)."""
    deadline = time.monotonic() + grace
    found = _processes_in(namespace)
    while found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = _processes_in(namespace)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not _loopback_namespace_available(),
                    reason="needs `unshare -rn` and `ip` to confine Ray's servers to a loopback-only network namespace")
def test_ray_simulation_on_digits(tmp_path):
    command = [
        shutil.which("unshare"), "-rn", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, "-c", MAIN,
        "federated", "--method", "coop", "--dataset", "digits", "--partition", "dirichlet", "--alpha", "0.5",
        "--clients", "3", "--fraction", "1.0", "--rounds", "2", "--local-epochs", "1", "--shots", "1",
        "--pretrained", "none", "--backend", "ray", "--client-cpus", "2", "--ray-object-store-mb", "128",
        "--data-root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"),
        "--output-dir", str(tmp_path / "runs"), "--log-level", "WARNING",
    ]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    own_namespace = _namespace_of(os.getpid())
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    namespace = None
    deadline = time.monotonic() + 30
    while namespace in (None, own_namespace) and process.poll() is None and time.monotonic() < deadline:
        namespace = _namespace_of(process.pid)
        time.sleep(0.05)
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        leftovers = _survivors(namespace) if namespace not in (None, own_namespace) else {}
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert process.returncode == 0, output[-4000:]
    assert leftovers == {}, f"processes left running after the simulation: {leftovers}"

    run = tmp_path / "runs/federated/digits/coop/dirichlet-a0.5-c3-fedavg-s1-r2e1/seed1"
    results = json.loads((run / "results.json").read_text())
    assert results["complete"] is True
    assert results["backend"] == "ray"
    assert results["trainable_params"] == 8 * 64  # PromptFolio's n_ctx 8, toy-clip width 64
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for row in results["rounds"]:
        assert row["clients_succeeded"] == 3
        assert row["clients_failed"] == 0
        assert row["bytes_sent"] > 0
        assert row["bytes_received"] > 0
        assert sorted(row["local_accuracy_per_client"]) == ["0", "1", "2"]
        assert 0.0 <= row["global_accuracy"] <= 100.0
    assert results["global_accuracy"] == results["rounds"][-1]["global_accuracy"]
    assert (run / "rounds.csv").is_file()
    assert (run / "rounds.png").is_file()
    assert (run / "partitions.json").is_file()

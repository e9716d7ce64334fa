"""Shared fixtures. Tests use real data (Debian's dataset-fashion-mnist, which .ci/run installs)
and real Flower simulations; no part of Flower is mocked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FEDREP_OFFLINE", "1")  # never try to download inside tests


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """The real Fashion-MNIST files. In CI their absence is a failure, locally a skip."""
    from fedrep.data.fashion_mnist import DataError, locate

    try:
        return locate(allow_download=False)
    except DataError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Fashion-MNIST not installed: {err}")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path_factory.getbasetemp() / "fedrep-cache"
    monkeypatch.setenv("FEDREP_CACHE_DIR", str(cache))


def fedrep_cli(*args: str, timeout: float = 300, check: bool = True, **popen):
    """Run the real `fedrep` CLI in a subprocess (its own Ray, its own process group)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fedrep.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


# A small but real federation: 6 clients x 120 Fashion-MNIST images, 2 classes each.
SMALL_FMNIST = [
    "--num-clients", "6", "--classes-per-client", "2", "--seed", "3",
    "--set", "max-train-per-client=120", "--set", "max-test-per-client=60",
    "--set", "fraction-train=0.5", "--set", "head-epochs=2", "--set", "body-epochs=1",
    "--set", "lr=0.05", "--set", "wait-for-clients=60",
]

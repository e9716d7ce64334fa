"""The out-of-tree example plugin: installed with pip into this environment, discovered through
its entry point, run in a real Flower simulation, then uninstalled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL_FMNIST, fedrep_cli
from fedrep.results import RunDir

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin-fedbabu"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, capture_output=True, text=True)


def _installed() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("fedrep-plugin-fedbabu")
    except PackageNotFoundError:
        return False
    return True


@pytest.fixture
def installed_example():
    """Installed for the test, then the environment is left as it was found: a developer who had
    installed the example keeps it."""
    had_it = _installed()
    _pip("install", "--no-deps", "--no-build-isolation", "-e", str(EXAMPLE))
    try:
        yield had_it
    finally:
        if not had_it and _installed():
            _pip("uninstall", "-y", "fedrep-plugin-fedbabu")


def test_example_plugin_installs_runs_and_uninstalls(installed_example, tmp_path: Path,
                                                     fmnist_dir: Path):
    listing = fedrep_cli("strategies").stdout
    line = next(x for x in listing.splitlines() if x.startswith("fedbabu "))
    assert line.endswith("[fedrep-plugin-fedbabu: fedbabu_plugin:PLUGIN]")
    assert "    finetune_epochs = 5  # " in listing
    run_dir = tmp_path / "babu"
    fedrep_cli("run", *SMALL_FMNIST, "--strategy", "fedbabu", "--rounds", "2",
               "--set", "strategy-options={finetune_epochs = 3}", "--set", f"run-dir={run_dir}",
               "--set", f"data-dir={fmnist_dir}")
    run = RunDir(run_dir)
    assert run.state()["status"] == "completed"
    assert run.read_metrics()[-1]["accuracy-mean"] > 0.5
    audit = [r for r in run.read_audit() if r["kind"] == "train"]
    assert audit and all(not any("head" in a for a in r["arrays"]) for r in audit)
    if installed_example:
        return  # it was installed before the test; it stays
    _pip("uninstall", "-y", "fedrep-plugin-fedbabu")  # (the fixture's uninstall is then a no-op)
    assert not _installed()
    assert not any(x.startswith("fedbabu ") for x in fedrep_cli("strategies").stdout.splitlines())

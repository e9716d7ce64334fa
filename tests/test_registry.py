"""Strategy plugins are found through the real entry-point machinery.

Extra plugin packages are made as real distributions (a ``*.dist-info`` folder with
``entry_points.txt``) on ``sys.path``, which is exactly what ``pip install`` leaves behind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedrep import registry


def _install_fake_dist(root: Path, dist: str, entry_points: dict[str, str], module: str = "",
                       code: str = "") -> None:
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"  # as pip names it
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = ["[fedrep.strategies]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    if module:
        (root / f"{module}.py").write_text(code)


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    for fn in (registry._entry_points, registry.get_strategy):
        fn.cache_clear()
    yield tmp_path
    for fn in (registry._entry_points, registry.get_strategy):
        fn.cache_clear()
    for name in [m for m in sys.modules if m.startswith("fake_plugin")]:
        del sys.modules[name]


def test_builtins_register_through_entry_points():
    assert {"fedrep", "fedavg"} <= set(registry.available_strategies())
    plugin = registry.get_strategy("fedrep")
    assert plugin.name == "fedrep" and plugin.server == "server.strategies.base:SharedAveraging"
    assert callable(plugin.client)  # the client half by class, the server half by reference
    ep = registry.entry_point("fedrep")
    assert ep.group == "fedrep.strategies" and ep.dist.name == "fedrep"


def test_third_party_plugin_is_discovered(plugin_path: Path):
    code = (
        "from fedrep.registry import StrategyPlugin\n"
        "from fedrep.algorithms.fedavg import FedAvgUpdate\n"
        "from server.strategies.base import SharedAveraging\n"
        "PLUGIN = StrategyPlugin('myalgo', 'mine', SharedAveraging, FedAvgUpdate)\n"
    )
    _install_fake_dist(plugin_path, "fake-plugin-ok", {"myalgo": "fake_plugin_ok:PLUGIN"},
                       "fake_plugin_ok", code)
    assert "myalgo" in registry.available_strategies()
    assert registry.get_strategy("myalgo").description == "mine"
    rows = {r["name"]: r for r in registry.describe()}
    assert rows["myalgo"]["package"] == "fake-plugin-ok"


def test_two_packages_claiming_one_name(plugin_path: Path):
    _install_fake_dist(plugin_path, "fake-plugin-a", {"clash": "fake_plugin_a:PLUGIN"})
    _install_fake_dist(plugin_path, "fake-plugin-b", {"clash": "fake_plugin_b:PLUGIN"})
    with pytest.raises(registry.PluginError) as err:
        registry.available_strategies()
    msg = str(err.value)
    assert "'clash' is claimed by two plugins" in msg
    assert "fake-plugin-a" in msg and "fake-plugin-b" in msg


def test_plugin_import_failure_names_the_package(plugin_path: Path):
    _install_fake_dist(plugin_path, "fake-plugin-broken", {"broken": "fake_plugin_broken:PLUGIN"},
                       "fake_plugin_broken", "import not_a_real_module_xyz\n")
    with pytest.raises(registry.PluginError) as err:
        registry.get_strategy("broken")
    assert "package fake-plugin-broken failed to import" in str(err.value)
    assert "not_a_real_module_xyz" in str(err.value)
    row = {r["name"]: r for r in registry.describe()}["broken"]
    assert row["description"].startswith("BROKEN")


def test_entry_point_must_be_a_plugin_with_its_name(plugin_path: Path):
    _install_fake_dist(plugin_path, "fake-plugin-wrong", {"wrong": "fake_plugin_wrong:PLUGIN",
                                                          "named": "fake_plugin_wrong:OTHER"},
                       "fake_plugin_wrong",
                       "from fedrep.registry import StrategyPlugin\nPLUGIN = 42\n"
                       "OTHER = StrategyPlugin('other', '', object, object)\n")
    with pytest.raises(registry.PluginError, match="not a fedrep.registry.StrategyPlugin"):
        registry.get_strategy("wrong")
    with pytest.raises(registry.PluginError, match="make them equal"):
        registry.get_strategy("named")


def test_client_actions_shared_names_and_bad_names(plugin_path: Path):
    code = ("from fedrep.registry import StrategyPlugin\n"
            "A = StrategyPlugin('act-a', '', object, object, client_actions=('phase', 'kd3a_source'))\n"
            "B = StrategyPlugin('act-b', '', object, object, client_actions=('phase',))\n"
            "BAD = StrategyPlugin('act-bad', '', object, object, client_actions=('two words',))\n")
    _install_fake_dist(plugin_path, "fake-plugin-actions", {"act-a": "fake_plugin_actions:A",
                                                            "act-b": "fake_plugin_actions:B",
                                                            "act-bad": "fake_plugin_actions:BAD"},
                       "fake_plugin_actions", code)
    # one handler per name: it calls the running strategy's rule, so a shared name is harmless,
    # and a broken declaration is left out instead of breaking every run on the node
    actions = registry.client_actions()
    assert sorted(actions) == ["kd3a_source", "kd3a_target", "phase"]
    with pytest.raises(registry.PluginError, match=r"act-bad.*\['two words'\].*Python identifiers"):
        registry.get_strategy("act-bad")


def test_unknown_strategy_message():
    with pytest.raises(registry.PluginError, match="unknown strategy 'nope'; installed: .*fedrep"):
        registry.get_strategy("nope")


def test_builtin_table_matches_pyproject():
    """The fallback for bare app bundles must list exactly what pyproject.toml registers."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared["fedrep.strategies"] == registry.BUILTINS


def test_option_lines_are_toml_with_required_and_factory_defaults():
    from pydantic import BaseModel, Field

    from fedrep.registry import option_lines

    class Opts(BaseModel):
        mu: float = Field(description="proximal weight")
        layers: list[str] = Field(default_factory=lambda: ["head"])
        on: bool = True

    assert option_lines(Opts) == [("mu = (required)", "proximal weight"),
                                  ('layers = ["head"]', ""), ("on = true", "")]


def test_a_supernode_imports_no_server_code():
    """The ClientApp builds client halves only: importing it, and building every installed
    strategy's client rule, imports nothing of ``server`` and no part of ``flwr.serverapp``
    beyond what Flower's own ``flwr.app`` / ``flwr.clientapp`` already import."""
    import subprocess
    import sys

    code = ("import sys\nimport flwr.app, flwr.clientapp\n"
            "flower = {m for m in sys.modules if m.startswith('flwr.serverapp')}\n"
            "import clients.app\nfrom fedrep.config import parse_run_config\n"
            "from fedrep.registry import available_strategies, get_strategy\n"
            "for name in sorted(available_strategies()):\n"
            "    get_strategy(name).client_rule(parse_run_config({'strategy': name}))\n"
            "bad = sorted(m for m in sys.modules if m == 'server' or m.startswith('server.')\n"
            "             or (m.startswith('flwr.serverapp') and m not in flower))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_server_half_that_is_not_a_round_program_is_refused():
    from fedrep.algorithms.fedavg import FedAvgUpdate
    from fedrep.config import parse_run_config
    from fedrep.registry import PluginError, StrategyPlugin

    plugin = StrategyPlugin("odd", "not a program", lambda cfg, opts: object(), FedAvgUpdate)
    with pytest.raises(PluginError, match="not a fedrep.RoundProgram"):
        plugin.server_strategy(parse_run_config({}))
    missing = StrategyPlugin("gone", "a reference that does not load", "nowhere.at_all:Thing", FedAvgUpdate)
    with pytest.raises(PluginError, match="'gone': its server half 'nowhere.at_all:Thing' cannot be loaded"):
        missing.server_strategy(parse_run_config({}))


def test_the_example_plugin_needs_only_fedrep():
    source = (Path(__file__).parent.parent / "examples" / "plugin-fedbabu" / "fedbabu_plugin" / "__init__.py")
    imports = [line for line in source.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert imports and all(not line.split()[1].startswith(("server", "clients")) for line in imports), imports

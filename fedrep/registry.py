"""Strategy plugins: a name -> (server strategy, client update rule) registry.

Discovery is through the entry-point group ``fedrep.strategies``; each entry point names a
:class:`StrategyPlugin` object. Built-in strategies register in this project's own
``pyproject.toml`` exactly as a third-party package would in its own::

    [project.entry-points."fedrep.strategies"]
    my-algo = "my_package.plugin:PLUGIN"

Only names are read at start-up (cheap); a plugin's module is imported when it is used, and an
import failure names the package that shipped it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution, entry_points
from typing import TYPE_CHECKING, Any

import tomllib
from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from fedrep.algorithms.base import ClientUpdateRule
    from fedrep.config import RunConfig
    from fedrep.round_program import RoundProgram

GROUP = "fedrep.strategies"


class PluginError(RuntimeError):
    """A plugin is missing, ambiguous or broken; the message names the package."""


class NoOptions(BaseModel):
    """For plugins without options of their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class StrategyPlugin:
    """What a strategy plugin provides.

    ``server(cfg, options)`` builds the server half, a :class:`fedrep.round_program.RoundProgram`
    (usually ``fedrep.SharedAveraging``, a Flower ``Strategy`` too); ``client(cfg, options)``
    builds the client half, a :class:`fedrep.algorithms.base.ClientUpdateRule` (plain PyTorch).
    Either may be given as a ``"module:attr"`` reference, imported only when that half is built:
    declare the server half that way and a SuperNode, which builds only client halves, never
    imports your server code (or ``flwr.serverapp``). ``options`` is the
    plugin's own pydantic model for its hyper-parameters, filled from the run-config key
    ``strategy-options`` (a TOML inline table, e.g. ``"{mu = 0.01}"``) and validated at start.
    ``config_keys`` lists the shared run-config keys the plugin reads, for ``fedrep strategies``.
    ``client_actions`` names extra message types the client half handles, ``train.<action>``
    (KD3A's ``kd3a_source`` and ``kd3a_target``; Python identifiers, as Flower requires); the
    ClientApp routes them to the running strategy's ``ClientUpdateRule.act``, so two plugins
    may use the same action name.
    """

    name: str
    description: str
    server: Callable[[RunConfig, Any], RoundProgram] | str
    client: Callable[[RunConfig, Any], ClientUpdateRule] | str
    config_keys: tuple[str, ...] = field(default_factory=tuple)
    options: type[BaseModel] = NoOptions
    client_actions: tuple[str, ...] = ()

    def parse_options(self, text: str) -> BaseModel:
        """Validate ``strategy-options``; ValueError names the bad option and the allowed ones."""
        try:
            values = tomllib.loads(f"o = {text.strip() or '{}'}")["o"] if text.strip() else {}
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"strategy-options {text!r} is not a TOML inline table such as "
                             f"'{{mu = 0.01}}': {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"strategy-options {text!r} must be an inline table like '{{mu = 0.01}}'")
        allowed = ", ".join(self.options.model_fields) or "none"
        for key, value in values.items():  # pydantic would read true as 1 and "0.5" as 0.5
            field = self.options.model_fields.get(key)
            wants = field.annotation if field is not None else None
            if (isinstance(value, bool) != (wants is bool) and wants in (bool, int, float)) or (
                    isinstance(value, str) and wants in (int, float)):
                raise ValueError(f"strategy-options.{key} = {value!r}: expected "
                                 f"{getattr(wants, '__name__', wants)}, not "
                                 f"{type(value).__name__} (options of {self.name!r}: {allowed})")
        try:
            return self.options.model_validate(values)
        except ValidationError as err:
            problems = "; ".join(
                f"strategy-options{''.join('.' + str(p) for p in e['loc'])}: "
                f"{e['msg'].removeprefix('Value error, ')}" for e in err.errors())
            raise ValueError(f"{problems} (options of {self.name!r}: {allowed})") from None

    def client_rule(self, cfg: RunConfig) -> ClientUpdateRule:
        from fedrep.algorithms.base import ClientUpdateRule

        rule = self._resolve(self.client, "client")(cfg, self.parse_options(cfg.strategy_options))
        if not isinstance(rule, ClientUpdateRule):
            raise PluginError(f"strategy {self.name!r}: its client half built a {type(rule).__name__}, not a "
                              "fedrep.ClientUpdateRule")
        return rule

    def server_strategy(self, cfg: RunConfig) -> RoundProgram:
        from fedrep.round_program import RoundProgram

        program = self._resolve(self.server, "server")(cfg, self.parse_options(cfg.strategy_options))
        if not isinstance(program, RoundProgram):
            raise PluginError(f"strategy {self.name!r}: its server half built a {type(program).__name__}, "
                              "not a fedrep.RoundProgram (subclass fedrep.SharedAveraging, or implement "
                              "RoundProgram)")
        return program

    def _resolve(self, half: Callable[..., Any] | str, which: str) -> Callable[..., Any]:
        """A half given as ``"module:attr"``, imported now; an import failure names the plugin."""
        if not isinstance(half, str):
            return half
        module, _, attr = half.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise PluginError(f"strategy {self.name!r}: its {which} half {half!r} cannot be loaded: "
                              f"{err}") from None


def _dist_name(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "<unknown package>"


# The built-ins as this project's pyproject.toml declares them. Used only where the fedrep
# distribution itself is not installed (a Flower app bundle unpacked on a bare SuperNode), so
# that the built-ins stay available there; installed, they come from the entry points like any
# third-party plugin.
BUILTINS = {
    "fedrep": "fedrep.builtin_plugins:FEDREP",
    "fedavg": "fedrep.builtin_plugins:FEDAVG",
    "fedavg-ft": "fedrep.builtin_plugins:FEDAVG_FT",
    "fedper": "fedrep.builtin_plugins:FEDPER",
    "lg-fedavg": "fedrep.builtin_plugins:LG_FEDAVG",
    "split": "fedrep.builtin_plugins:SPLIT",
    "local": "fedrep.builtin_plugins:LOCAL",
    "fedprox": "fedrep.builtin_plugins:FEDPROX",
    "ditto": "fedrep.builtin_plugins:DITTO",
    "kd3a": "fedrep.builtin_plugins:KD3A",
}


def _builtin_fallback() -> list[EntryPoint]:
    try:
        distribution("fedrep")
        return []
    except PackageNotFoundError:
        return [EntryPoint(name, value, GROUP) for name, value in BUILTINS.items()]


@cache
def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in [*entry_points(group=GROUP), *_builtin_fallback()]:
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginError(
                f"strategy name {ep.name!r} is claimed by two plugins: "
                f"{found[ep.name].value} (package {_dist_name(found[ep.name])}) and "
                f"{ep.value} (package {_dist_name(ep)}); uninstall one of them"
            )
        found[ep.name] = ep
    return found


def available_strategies() -> list[str]:
    return sorted(_entry_points())


def entry_point(name: str) -> EntryPoint:
    eps = _entry_points()
    if name not in eps:
        raise PluginError(
            f"unknown strategy {name!r}; installed: {', '.join(sorted(eps)) or 'none'}. "
            f"Plugins register under the entry-point group {GROUP!r}."
        )
    return eps[name]


@cache
def get_strategy(name: str) -> StrategyPlugin:
    ep = entry_point(name)
    try:
        plugin = ep.load()
    except Exception as err:  # a plugin may fail in any way while importing
        raise PluginError(
            f"strategy plugin {name!r} from package {_dist_name(ep)} failed to import "
            f"({ep.value}): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(plugin, StrategyPlugin):
        raise PluginError(
            f"entry point {name!r} of package {_dist_name(ep)} points at {ep.value}, which is a "
            f"{type(plugin).__name__}, not a fedrep.registry.StrategyPlugin"
        )
    if plugin.name != name:
        raise PluginError(
            f"package {_dist_name(ep)} registers {plugin.name!r} under the entry-point name "
            f"{name!r}; make them equal"
        )
    bad = [a for a in plugin.client_actions if not a.isidentifier()]
    if bad:
        raise PluginError(f"plugin {name!r} of package {_dist_name(ep)} declares client actions "
                          f"{bad}; Flower routes only Python identifiers (e.g. '{name.replace('-', '_')}"
                          "_phase1')")
    from fedrep.protocol import ONBOARD_ACTION

    if ONBOARD_ACTION in plugin.client_actions:
        raise PluginError(f"plugin {name!r} of package {_dist_name(ep)} declares the client action "
                          f"{ONBOARD_ACTION!r}, which fedrep's ClientApp reserves for new clients; "
                          "choose another name")
    return plugin


def client_actions() -> list[str]:
    """Every extra client message action the installed plugins declare, each once.

    The ClientApp must register its handlers when it is imported, before it knows the run's
    strategy, so it registers all of them. Each handler calls the *running* strategy's rule, so
    two plugins may declare the same action without interfering. A plugin that fails to import,
    or declares an action Flower cannot route, is left out here: only runs that use it fail, with
    its own error, rather than every run on the node."""
    actions: list[str] = []
    for name in available_strategies():
        try:
            plugin = get_strategy(name)
        except PluginError:
            continue
        actions += [a for a in plugin.client_actions if a.isidentifier() and a not in actions]
    from fedrep.protocol import ONBOARD_ACTION

    actions = [a for a in actions if a != ONBOARD_ACTION]
    return actions


def describe() -> list[dict[str, Any]]:
    """One row per installed plugin: name, package, target, description (or the import error),
    config keys, and its options as lines a user can copy into ``strategy-options``."""
    rows: list[dict[str, Any]] = []
    for name, ep in sorted(_entry_points().items()):
        row: dict[str, Any] = {"name": name, "package": _dist_name(ep), "target": ep.value,
                               "config-keys": "", "options": []}
        try:
            plugin = get_strategy(name)
            row["description"] = plugin.description
            row["config-keys"] = ", ".join(plugin.config_keys)
            row["options"] = option_lines(plugin.options)
        except PluginError as err:
            row["description"] = f"BROKEN: {err}"
        rows.append(row)
    return rows


def option_lines(options: type[BaseModel]) -> list[tuple[str, str]]:
    """(``name = <default as TOML>``, description) per option, ready to copy into
    ``strategy-options`` (``(required)`` where there is no default)."""
    from fedrep.config import toml_value

    lines = []
    for name, f in options.model_fields.items():
        default = ("(required)" if f.is_required()
                   else toml_value(f.get_default(call_default_factory=True)))
        lines.append((f"{name} = {default}", f.description or ""))
    return lines

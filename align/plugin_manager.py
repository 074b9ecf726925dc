"""Finding plugins, and the registries their registration hooks fill.

:func:`get_plugin_manager` builds a fresh manager on demand (never at import time), so tests stay
isolated and ``align --help`` loads nothing. Plugins come from three places, in this order:

1. the ``align`` entry-point group: align's own built-ins and every installed third-party package;
2. ``-p module.name`` on the command line (``-p no:NAME`` blocks an entry-point plugin instead);
3. ``--plugins-dir DIR``: every ``*.py`` file in it.

A plugin that fails to import stops everything before any work, with its name and error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from align import hookspecs
from align.errors import AlignError
from align.schema import did_you_mean

__all__ = ["AlignPluginManager", "PluginOrigin", "Registered", "get_plugin_manager"]

#: Set to 1 to load only align's own entry points (third-party packages are ignored).
DISABLE_AUTOLOAD_ENV = "ALIGN_DISABLE_PLUGIN_AUTOLOAD"

#: The kinds of registered object, each with the hook that fills it.
REGISTRIES = {
    "stage": "align_register_stages",
    "model source": "align_register_model_sources",
    "dataset format": "align_register_dataset_formats",
    "data kind": "align_register_data_kinds",
    "peft method": "align_register_peft_methods",
    "rollout engine": "align_register_rollout_engines",
    "reward function": "align_register_reward_functions",
    "advantage estimator": "align_register_advantage_estimators",
    "evaluator": "align_register_evaluators",
    "chat template": "align_register_chat_templates",
    "tracker": "align_register_trackers",
}

#: Plugins that are part of the core rather than extensions: registered directly, never blockable.
ESSENTIAL_PLUGINS = ("align.runner", "align.kinds", "align.plots")


@dataclass(frozen=True)
class PluginOrigin:
    """Where a plugin came from, for ``align plugins`` and for error messages."""

    source: str  #: ``core``, ``entry point``, ``-p`` or ``plugins-dir``
    where: str  #: the distribution, module or file
    version: str | None = None

    def __str__(self) -> str:
        version = f" {self.version}" if self.version else ""
        return f"{self.source} {self.where}{version}"


@dataclass(frozen=True)
class Registered:
    """One object a plugin registered, and which plugin did."""

    name: str
    obj: Any
    plugin: str


class AlignPluginManager(pluggy.PluginManager):
    """pluggy's manager plus where each plugin came from and the registries built from the hooks."""

    def __init__(self) -> None:
        super().__init__("align")
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, PluginOrigin] = {}
        self._registries: dict[str, dict[str, Registered]] = {}

    def add_plugin(self, plugin: Any, name: str, origin: PluginOrigin | None = None) -> None:
        """Register ``plugin`` and check its hooks against the specs; an error names the plugin."""
        origin = origin or PluginOrigin("registered", name)
        if self.is_registered(plugin):
            return  # the same module reached twice, e.g. an installed plugin also given with -p
        if self.has_plugin(name):
            raise AlignError(
                f"two plugins are named '{name}': {self.origins[name]} and {origin}",
                hint="uninstall one of them, or block one with -p no:NAME",
            )
        try:
            self.register(plugin, name=name)
            self.check_pending()  # an implementation of no known hook is almost always a typo
        except pluggy.PluginValidationError as error:
            if self.is_registered(plugin):
                self.unregister(plugin)
            raise AlignError(f"plugin '{name}' ({origin}) is not valid: {_hook_problem(error)}") from None
        self.origins[name] = origin
        self._registries.clear()

    def registry(self, kind: str) -> dict[str, Registered]:
        """Name → :class:`Registered` for one kind (see :data:`REGISTRIES`); built once, then cached."""
        if kind not in self._registries:
            self._registries[kind] = self._collect(kind)
        return self._registries[kind]

    def get(self, kind: str, name: str) -> Any:
        """The object registered as ``name``, or an error listing the known names of that kind."""
        registry = self.registry(kind)
        if name not in registry:
            known = ", ".join(sorted(registry)) or "none"
            raise AlignError(
                f"unknown {kind} '{name}'{did_you_mean(name, registry)}; known: {known}",
                hint=f"is the plugin that provides it installed? `align plugins` lists every {kind}",
            )
        return registry[name].obj

    def fallback(self, kind: str, setting: str) -> Any:
        """The object of ``kind`` that serves where a setting names none: one whose ``fallback`` is true
        (the first by name if several are). ``setting`` names the setting in the error when none does."""
        registry = self.registry(kind)
        offered = sorted(name for name, entry in registry.items() if getattr(entry.obj, "fallback", False))
        if not offered:
            raise AlignError(
                f"no installed {kind} serves as the default, and {setting} names none",
                hint=f"set {setting} (installed: {', '.join(sorted(registry)) or 'none'})",
            )
        return registry[offered[0]].obj

    def registered_by(self, plugin_name: str) -> dict[str, list[str]]:
        """Kind → names that one plugin registers (for ``align plugins``)."""
        found: dict[str, list[str]] = {}
        for kind in REGISTRIES:
            for entry in self.registry(kind).values():
                if entry.plugin == plugin_name:
                    found.setdefault(kind, []).append(entry.name)
        return found

    def _collect(self, kind: str) -> dict[str, Registered]:
        caller = getattr(self.hook, REGISTRIES[kind])
        registry: dict[str, Registered] = {}
        # Call each implementation on its own so that every name is tied to the plugin that gave it.
        for impl in reversed(caller.get_hookimpls()):
            for obj in impl.function() or ():
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise AlignError(f"plugin '{impl.plugin_name}' registers a {kind} without a `name`: {obj!r}")
                if name in registry:
                    first = registry[name].plugin
                    raise AlignError(
                        f"two plugins register the {kind} '{name}': "
                        f"'{first}' ({self.origins.get(first)}) and "
                        f"'{impl.plugin_name}' ({self.origins.get(impl.plugin_name)})",
                        hint="uninstall or block one of them (-p no:PLUGIN), or rename one",
                    )
                registry[name] = Registered(name, obj, impl.plugin_name)
        return registry


def get_plugin_manager(
    modules: Sequence[str] = (),
    plugins_dir: str | os.PathLike[str] | None = None,
    *,
    entry_points: bool = True,
) -> AlignPluginManager:
    """Build a plugin manager with every plugin loaded and validated.

    :param modules: modules to load as plugins (``-p``); ``no:NAME`` blocks the entry point ``NAME``.
    :param plugins_dir: a folder whose ``*.py`` files are loaded as plugins (``--plugins-dir``).
    :param entry_points: load the ``align`` entry-point group (off only in tests of the other paths).
    """
    blocked = {m[3:] for m in modules if m.startswith("no:")}
    _check_blockable(blocked, modules, plugins_dir)
    pm = AlignPluginManager()
    for name in ESSENTIAL_PLUGINS:
        pm.add_plugin(importlib.import_module(name), name, PluginOrigin("core", name))
    for name in blocked:
        pm.set_blocked(name)
    if entry_points:
        _load_entry_points(pm, only_align=os.environ.get(DISABLE_AUTOLOAD_ENV) == "1")
    for module_name in (m for m in modules if not m.startswith("no:")):
        pm.add_plugin(_import_plugin(module_name), module_name, PluginOrigin("-p", module_name, None))
    if plugins_dir is not None:
        for path in _plugin_files(Path(plugins_dir)):
            pm.add_plugin(_import_file(path), path.stem, PluginOrigin("plugins-dir", str(path)))
    return pm


def _check_blockable(blocked: set[str], modules: Sequence[str], plugins_dir: str | os.PathLike[str] | None) -> None:
    """Refuse ``-p no:NAME`` for a name no plugin has: a typo would otherwise block nothing, silently.
    The core's own plugins cannot be blocked: pluggy would unregister them and the runner would be gone."""
    if not blocked:
        return
    known = {ep.name for ep in importlib.metadata.entry_points(group="align")}  # names only: nothing imported
    known.update(m for m in modules if not m.startswith("no:"))
    if plugins_dir is not None and Path(plugins_dir).is_dir():
        known.update(path.stem for path in _plugin_files(Path(plugins_dir)))
    for name in sorted(blocked):
        if not name:
            raise AlignError("-p no: is missing the name of the plugin to block", hint="`align plugins` lists them")
        if name in ESSENTIAL_PLUGINS:
            raise AlignError(
                f"-p no:{name}: '{name}' is part of align's core and cannot be blocked",
                hint="block the plugins that register what you want to leave out (`align plugins` lists them)",
            )
        if name not in known:
            raise AlignError(
                f"-p no:{name}: no plugin is named '{name}'{did_you_mean(name, known)}",
                hint="`align plugins` lists the plugins by name (its PLUGIN column)",
            )


def _load_entry_points(pm: AlignPluginManager, only_align: bool) -> None:
    for ep in sorted(importlib.metadata.entry_points(group="align"), key=lambda ep: ep.name):
        dist = ep.dist
        dist_name = dist.metadata["Name"] if dist else "an unknown distribution"
        if pm.is_blocked(ep.name) or (only_align and dist_name != "align"):
            continue
        origin = PluginOrigin("entry point", dist_name, dist.version if dist else None)
        try:
            plugin = ep.load()
        except Exception as error:  # any import failure: report it as the plugin's, not ours
            raise AlignError(
                f"plugin '{ep.name}' (from {origin.where}, {ep.value}) failed to import: {_one_line(error)}",
                hint=f"fix or reinstall {origin.where}, uninstall it, or skip it with -p no:{ep.name}",
            ) from None
        pm.add_plugin(plugin, ep.name, origin)


def _import_plugin(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise AlignError(
                f"plugin module '{module_name}' (-p) was not found",
                hint="is it installed in this environment, or on PYTHONPATH? Use --plugins-dir for a .py file",
            ) from None
        raise AlignError(f"plugin '{module_name}' (-p) failed to import: {_one_line(error)}") from None
    except Exception as error:
        raise AlignError(f"plugin '{module_name}' (-p) failed to import: {_one_line(error)}") from None


def _plugin_files(folder: Path) -> Iterable[Path]:
    if not folder.is_dir():
        raise AlignError(f"--plugins-dir {folder}: no such folder")
    return sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))


def _import_file(path: Path) -> ModuleType:
    module_name = f"align_local_plugins.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a *.py path always yields a loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise AlignError(f"plugin file {path} failed to import: {_one_line(error)}") from None
    return module


def _one_line(error: BaseException) -> str:
    """``Type: message (file:line)`` of where the plugin's own code raised."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [f for f in frames if "importlib" not in f.filename]
    where = f" ({own[-1].filename}:{own[-1].lineno})" if own else ""
    return f"{type(error).__name__}: {error}{where}"


def _hook_problem(error: pluggy.PluginValidationError) -> str:
    message = str(error).split(" in plugin ")[0]
    if message.startswith("unknown hook"):
        hook = message.split("'")[1] if "'" in message else ""
        return message + did_you_mean(hook, hook_names())
    return message


def hook_names() -> list[str]:
    """Every hook align declares, in declaration order."""
    return [name for name in vars(hookspecs) if name.startswith("align_")]


def implemented_hooks(pm: AlignPluginManager, plugin: Any) -> list[str]:
    """The hooks one plugin implements."""
    return sorted(caller.name for caller in pm.get_hookcallers(plugin) or ())


def describe_plugins(pm: AlignPluginManager) -> list[Mapping[str, Any]]:
    """One row per plugin, read from the manager itself: what ``align plugins`` prints."""
    rows: list[Mapping[str, Any]] = []
    for name, plugin in pm.list_name_plugin():
        origin = pm.origins[name]
        rows.append(
            {
                "plugin": name,
                "version": origin.version,
                "source": origin.source,
                "where": origin.where,
                "hooks": implemented_hooks(pm, plugin),
                "registers": pm.registered_by(name),
            }
        )
    return rows

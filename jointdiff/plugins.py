"""Plugin discovery: pluggy entry points, a registry of named classes, robust loading.

Built-in plugins are found through the same ``jointdiff`` entry-point group as third-party
ones. Loading never aborts on one bad plugin: failures are kept in :attr:`Registry.failures`
and shown by ``jointdiff plugins``; asking for a plugin that failed explains why.

Environment variables:

- ``JOINTDIFF_PLUGINS``: comma-separated entry-point names; only those load (tests, production).
- ``JOINTDIFF_TRACE_HOOKS``: if set to a non-empty value, every hook call is traced to stderr.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy

from . import hookspecs
from .conditioner import Conditioner
from .errors import ConfigError, PluginError
from .geometry import Geometry
from .synchronizer import Synchronizer

Kind = Literal["geometry", "conditioner", "synchronizer"]
KINDS: dict[str, tuple[type, str]] = {
    "geometry": (Geometry, "register_geometries"),
    "conditioner": (Conditioner, "register_conditioners"),
    "synchronizer": (Synchronizer, "register_synchronizers"),
}


@dataclass(frozen=True)
class PluginInfo:
    """One registered class and where it came from."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str


@dataclass
class Registry:
    """Named plugin classes by kind, plus the plugins that failed to load."""

    entries: dict[str, dict[str, PluginInfo]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: dict[str, str] = field(default_factory=dict)
    conflicts: dict[tuple[str, str], str] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> type:
        if kind not in self.entries:
            raise ConfigError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        if (kind, name) in self.conflicts:
            raise PluginError(self.conflicts[(kind, name)])
        found = self.entries[kind].get(name)
        if found is not None:
            return found.cls
        known = ", ".join(sorted(self.entries[kind])) or "none"
        hint = "".join(f"; plugin {p!r} failed to load: {why}" for p, why in self.failures.items())
        raise ConfigError(f"unknown {kind} {name!r}; available: {known}{hint}")

    def all(self) -> list[PluginInfo]:
        return [info for kind in KINDS for info in sorted(self.entries[kind].values(), key=lambda i: i.name)]


def _distribution_of(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "unknown"


class PluginManager:
    """Wraps :class:`pluggy.PluginManager` with jointdiff's registry and error reporting."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self._sources: dict[str, str] = {}
        if os.environ.get("JOINTDIFF_TRACE_HOOKS"):
            self.pm.trace.root.setwriter(lambda message: sys.stderr.write(message))
            self.pm.enable_tracing()

    def load_entry_points(self) -> None:
        """Import every plugin of the ``jointdiff`` entry-point group, keeping failures."""
        allowed = os.environ.get("JOINTDIFF_PLUGINS")
        allowed_names = {n.strip() for n in allowed.split(",") if n.strip()} if allowed else None
        for entry_point in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            if allowed_names is not None and entry_point.name not in allowed_names:
                continue
            if self.pm.has_plugin(entry_point.name):
                continue
            try:
                module = entry_point.load()
            except Exception as error:  # a broken plugin must not hide the others
                self.registry.failures[entry_point.name] = f"import failed: {type(error).__name__}: {error}"
                continue
            self.add(module, entry_point.name, _distribution_of(entry_point))

    def add(self, plugin: Any, name: str, distribution: str = "local") -> None:
        """Register one plugin object (module or instance) and collect what it registers."""
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as error:
            self._drop(plugin, name, f"invalid hook implementation: {error}")
            return
        self._sources[name] = distribution
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        for kind, (base, hook_name) in KINDS.items():
            caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
            try:
                caller(register=self._registrar(kind, base, name))
            except Exception as error:
                self._drop(plugin, name, f"{hook_name} raised {type(error).__name__}: {error}")
                return

    def _drop(self, plugin: Any, name: str, why: str) -> None:
        self.registry.failures[name] = why
        if self.pm.is_registered(plugin):
            self.pm.unregister(plugin)
        for kind in KINDS:
            for key in [k for k, info in self.registry.entries[kind].items() if info.plugin == name]:
                del self.registry.entries[kind][key]

    def _registrar(self, kind: str, base: type, plugin_name: str):
        def register(cls: type) -> None:
            self._register_class(kind, base, cls, plugin_name)

        return register

    def _register_class(self, kind: str, base: type, cls: type, plugin_name: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"register() expects a subclass of {base.__name__}, got {cls!r}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} has no string 'name' attribute")
        existing = self.registry.entries[kind].get(name)
        distribution = self._sources.get(plugin_name, "local")
        if existing is not None and existing.cls is not cls:
            self.registry.conflicts[(kind, name)] = (
                f"{kind} name {name!r} is claimed twice: by plugin {existing.plugin!r} "
                f"({existing.distribution}) and by plugin {plugin_name!r} ({distribution})"
            )
            return
        self.registry.entries[kind][name] = PluginInfo(kind, name, cls, plugin_name, distribution)


_MANAGER: PluginManager | None = None


def get_plugin_manager(reload: bool = False) -> PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _MANAGER
    if _MANAGER is None or reload:
        manager = PluginManager()
        manager.load_entry_points()
        _MANAGER = manager
    return _MANAGER


def get_registry() -> Registry:
    return get_plugin_manager().registry


def create(kind: str, name: str, options: Any = None, **kwargs: Any) -> Any:
    """Construct a plugin object by kind and name with validated options.

    Example: ``create("geometry", "strip", width_px=2048)``.
    """
    cls = get_registry().get(kind, name)
    return cls(options, **kwargs)


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register an in-process plugin (a module or object with hook implementations)."""
    manager = get_plugin_manager()
    name = name or getattr(plugin, "__name__", None) or repr(plugin)
    manager.add(plugin, name, "local")
    if name in manager.registry.failures:
        raise PluginError(f"plugin {name!r}: {manager.registry.failures[name]}")

"""Plugin discovery: pluggy entry points, a registry of named classes, robust loading.

Built-in plugins are found through the same ``jointdiff`` entry-point group as third-party
ones. Loading never aborts on one bad plugin: each failure (import error, invalid hook,
unsupported plugin API version, an invalid registered class) is kept in
:attr:`Registry.failures` under the plugin's name with the reason, and ``jointdiff plugins``
shows it next to the plugins that did load. Asking for a class that a failed plugin would
have provided explains why it is missing.

Environment variables:

- ``JOINTDIFF_PLUGINS``: comma-separated entry-point names; only those load (tests,
  production). Set but empty, no entry point loads. A listed name that no installed
  distribution provides is reported as a failure, not ignored.
- ``JOINTDIFF_TRACE_HOOKS``: if set to a non-empty value, every hook call and its result is
  traced to stderr.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import pluggy

from jointdiff.core import hookspecs
from jointdiff.core.conditioner import Conditioner
from jointdiff.core.family import ModelFamily
from jointdiff.core.geometry import Geometry
from jointdiff.core.options import PluginOptions
from jointdiff.core.synchronizer import Synchronizer
from jointdiff.utils.errors import ConfigError, PluginError

Kind = Literal["geometry", "conditioner", "synchronizer", "family"]
KINDS: dict[str, tuple[type, str]] = {
    "geometry": (Geometry, "register_geometries"),
    "conditioner": (Conditioner, "register_conditioners"),
    "synchronizer": (Synchronizer, "register_synchronizers"),
    "family": (ModelFamily, "register_families"),
}
ENV_PLUGINS = "JOINTDIFF_PLUGINS"
ENV_TRACE = "JOINTDIFF_TRACE_HOOKS"
# Names appear in job files and on the command line: no spaces, no empty names.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")


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
    """Named plugin classes by kind, plus the plugins that failed to load.

    ``failures`` maps a plugin (entry-point) name to why it did not load; ``conflicts`` maps
    ``(kind, name)`` to a message naming both plugins and distributions that claim it;
    ``only`` is the entry-point names ``JOINTDIFF_PLUGINS`` restricted loading to, if set.
    """

    entries: dict[str, dict[str, PluginInfo]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: dict[str, str] = field(default_factory=dict)
    conflicts: dict[tuple[str, str], str] = field(default_factory=dict)
    only: tuple[str, ...] | None = None

    def get(self, kind: str, name: str) -> type:
        """The class registered as ``name`` for ``kind``; ConfigError listing what exists."""
        if kind not in self.entries:
            raise ConfigError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        if (kind, name) in self.conflicts:
            raise PluginError(self.conflicts[(kind, name)])
        found = self.entries[kind].get(name)
        if found is not None:
            return found.cls
        known = ", ".join(sorted(self.entries[kind])) or "none"
        hint = "".join(f"; plugin {p!r} failed to load: {why}" for p, why in self.failures.items())
        if self.only is not None:
            hint += f"; {ENV_PLUGINS} restricts loading to: {', '.join(self.only) or 'nothing'}"
        raise ConfigError(f"unknown {kind} {name!r}; available: {known}{hint}")

    def all(self) -> list[PluginInfo]:
        """Every registered class, by kind then name."""
        return [info for kind in KINDS for info in sorted(self.entries[kind].values(), key=lambda i: i.name)]


def _distribution_of(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "unknown"


def allowed_entry_points() -> tuple[str, ...] | None:
    """Entry-point names listed in ``JOINTDIFF_PLUGINS``, or None when it is not set."""
    value = os.environ.get(ENV_PLUGINS)
    if value is None:
        return None
    return tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))


def hook_problems(plugin: Any) -> str | None:
    """Why ``plugin`` must not be registered, or None: a required plugin API this jointdiff
    does not provide, a marked function that matches no hook (a misspelling would otherwise
    be silently ignored), or a hook-named function that lacks the :data:`hookimpl` marker."""
    required = getattr(plugin, hookspecs.REQUIRES_ATTRIBUTE, None)
    if required is not None and (mismatch := hookspecs.api_mismatch(required)):
        return mismatch
    specs = hookspecs.hook_names()
    marker = hookspecs.PROJECT_NAME + "_impl"
    for attr in dir(plugin):
        try:
            value = inspect.getattr_static(plugin, attr)
        except AttributeError:
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if not (inspect.isfunction(value) or inspect.ismethod(value)):
            continue  # pluggy only takes hook implementations from functions and methods
        opts = getattr(value, marker, None)
        if isinstance(opts, dict):
            hook = opts.get("specname") or attr
            if hook not in specs and not opts.get("optionalhook"):
                close = difflib.get_close_matches(hook, specs, n=1)
                suggestion = f"; did you mean {close[0]!r}?" if close else f"; hooks are: {', '.join(specs)}"
                return f"unknown hook {hook!r}{suggestion}"
        elif attr in specs:
            return f"{attr!r} is not marked with @jointdiff.hookimpl, so it would never be called"
    return None


class PluginManager:
    """Wraps :class:`pluggy.PluginManager` with jointdiff's registry and error reporting."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self._sources: dict[str, str] = {}
        if os.environ.get(ENV_TRACE):
            # Look sys.stderr up at each write so redirected or captured stderr gets the trace.
            self.pm.trace.root.setwriter(lambda message: sys.stderr.write(message))
            self.pm.enable_tracing()

    def load_entry_points(self) -> None:
        """Import every plugin of the ``jointdiff`` entry-point group, keeping failures."""
        allowed = allowed_entry_points()
        self.registry.only = allowed
        found = set()
        for entry_point in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            if allowed is not None and entry_point.name not in allowed:
                continue
            found.add(entry_point.name)
            self._load_entry_point(entry_point)
        for name in allowed or ():
            if name not in found:
                self.registry.failures[name] = (
                    f"{ENV_PLUGINS} lists {name!r}, but no installed distribution has a "
                    f"{hookspecs.ENTRY_POINT_GROUP!r} entry point of that name"
                )

    def _load_entry_point(self, entry_point: importlib.metadata.EntryPoint) -> None:
        distribution = _distribution_of(entry_point)
        name = entry_point.name
        if self.pm.has_plugin(name):
            if self._sources.get(name) == distribution:
                return  # loaded before
            # Two distributions use one entry-point name: keep both, told apart by distribution.
            name = f"{name}@{distribution.split(' ')[0]}"
            if self.pm.has_plugin(name):
                return
        try:
            module = entry_point.load()
        except Exception as error:  # a broken plugin must not hide the others
            self._fail(None, name, f"import of {entry_point.value!r} ({distribution}) failed: "
                       f"{type(error).__name__}: {error}")
            return
        self.add(module, name, distribution)

    def add(self, plugin: Any, name: str, distribution: str = "local") -> None:
        """Register one plugin object (module or instance) and collect what it registers.

        Either everything the plugin registers is added, or nothing is and the plugin is
        listed in :attr:`Registry.failures` with the reason.
        """
        if self.pm.has_plugin(name):
            raise PluginError(f"a plugin named {name!r} is already registered")
        problem = hook_problems(plugin)
        if problem is not None:
            self._fail(None, name, problem)
            return
        if self.pm.is_registered(plugin):
            self._fail(None, name, f"the same object is already registered as plugin {self.pm.get_name(plugin)!r}")
            return
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as error:
            self._fail(plugin, name, f"invalid hook implementation: {error}")
            return
        if not self.pm.get_hookcallers(plugin):
            self._fail(plugin, name, "implements no jointdiff hook (is anything marked with @jointdiff.hookimpl?)")
            return
        self._sources[name] = distribution
        staged = self._collect(plugin, name)
        if staged is not None:
            self.registry.failures.pop(name, None)
            for kind, cls in staged:
                self._commit(kind, cls, name, distribution)

    def _collect(self, plugin: Any, name: str) -> list[tuple[str, type]] | None:
        """Call the plugin's own hooks; the classes it registers, or None if one hook failed."""
        staged: list[tuple[str, type]] = []
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        for kind, (base, hook_name) in KINDS.items():
            caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
            try:
                caller(register=self._registrar(kind, base, staged))
            except Exception as error:
                self._fail(plugin, name, f"{hook_name} raised {type(error).__name__}: {error}")
                return None
        return staged

    def _fail(self, plugin: Any, name: str, why: str) -> None:
        """Record why plugin ``name`` did not load (on one line, for ``jointdiff plugins``) and
        unregister ``plugin`` if given."""
        self.registry.failures[name] = "; ".join(line.strip() for line in why.splitlines() if line.strip())
        if plugin is not None and self.pm.is_registered(plugin):
            self.pm.unregister(plugin)

    def _registrar(self, kind: str, base: type, staged: list[tuple[str, type]]) -> Callable[[type], None]:
        def register(cls: type) -> None:
            check_plugin_class(cls, base)
            staged.append((kind, cls))

        return register

    def _commit(self, kind: str, cls: type, plugin_name: str, distribution: str) -> None:
        name = cls.name
        existing = self.registry.entries[kind].get(name)
        if existing is not None and existing.cls is not cls:
            self.registry.conflicts[(kind, name)] = (
                f"{kind} name {name!r} is claimed twice: by plugin {existing.plugin!r} "
                f"({existing.distribution}) and by plugin {plugin_name!r} ({distribution})"
            )
            return
        if existing is None:
            self.registry.entries[kind][name] = PluginInfo(kind, name, cls, plugin_name, distribution)


def check_plugin_class(cls: Any, base: type) -> None:
    """Raise TypeError unless ``cls`` is a concrete ``base`` subclass with a valid ``name``
    and an ``Options`` model derived from :class:`~jointdiff.core.options.PluginOptions`."""
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"register() expects a subclass of {base.__name__}, got {cls!r}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise TypeError(f"{cls.__name__} is abstract: it does not implement {missing}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise TypeError(
            f"{cls.__name__}.name must be a non-empty string of letters, digits, '_', '.' or '-', got {name!r}"
        )
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, PluginOptions)):
        raise TypeError(
            f"{cls.__name__}.Options must be a subclass of jointdiff.core.options.PluginOptions, got {options!r}"
        )


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
    """The process-wide registry of plugin classes."""
    return get_plugin_manager().registry


def create(kind: str, name: str, options: Any = None, **kwargs: Any) -> Any:
    """Construct a plugin object by kind and name with validated options.

    Example: ``create("geometry", "strip", length_px=2048)``.
    """
    cls = get_registry().get(kind, name)
    return cls(options, **kwargs)


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register an in-process plugin (a module or object with hook implementations) in the
    process-wide manager; PluginError with the reason if it is invalid."""
    manager = get_plugin_manager()
    name = name or getattr(plugin, "__name__", None) or repr(plugin)
    manager.add(plugin, name, "local")
    if name in manager.registry.failures:
        raise PluginError(f"plugin {name!r}: {manager.registry.failures[name]}")

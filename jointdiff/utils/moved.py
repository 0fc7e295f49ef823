"""Module paths that moved when jointdiff was laid out in layers (0.2), and the shim that
keeps the old ones importable for one release with a :class:`DeprecationWarning` naming the
new import. Plugin authors import from :mod:`jointdiff.plugin` instead."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any, Callable, Sequence

_FAMILIES = ("vp", "flow", "sd", "sdxl", "sd3", "flux", "flux2", "qwenimage")

MOVED: dict[str, str] = {
    "jointdiff.errors": "jointdiff.utils.errors",
    "jointdiff.fingerprint": "jointdiff.utils.fingerprint",
    "jointdiff.options": "jointdiff.core.options",
    "jointdiff.hookspecs": "jointdiff.core.hookspecs",
    "jointdiff.plugins": "jointdiff.core.registry",
    "jointdiff.geometry": "jointdiff.core.geometry",
    "jointdiff.conditioner": "jointdiff.core.conditioner",
    "jointdiff.synchronizer": "jointdiff.core.synchronizer",
    "jointdiff.context": "jointdiff.core.context",
    "jointdiff.tiling": "jointdiff.core.tiling",
    "jointdiff.masks": "jointdiff.core.masks",
    "jointdiff.families": "jointdiff.models.families",
    "jointdiff.families.base": "jointdiff.core.family",
    **{f"jointdiff.families.{name}": f"jointdiff.models.families.{name}" for name in _FAMILIES},
    "jointdiff.lora": "jointdiff.models.lora",
    "jointdiff.tiny": "jointdiff.models.tiny",
    "jointdiff.tiled_decode": "jointdiff.models.tiled_decode",
    "jointdiff.spherical": "jointdiff.surfaces.spherical",
    "jointdiff.cube": "jointdiff.surfaces.cube",
    "jointdiff.sphere_base": "jointdiff.surfaces.sphere_base",
    "jointdiff.export360": "jointdiff.surfaces.export360",
    "jointdiff.viewer": "jointdiff.surfaces.viewer",
    "jointdiff.textures": "jointdiff.surfaces.textures",
    "jointdiff.init_image": "jointdiff.image.init_image",
    "jointdiff.placement": "jointdiff.image.placement",
    "jointdiff.init_spec": "jointdiff.image.init_spec",
    "jointdiff.output": "jointdiff.image.output",
    "jointdiff.budget": "jointdiff.cost.budget",
    "jointdiff.profiling": "jointdiff.cost.profiling",
    "jointdiff.denoiser": "jointdiff.engine.denoiser",
    "jointdiff.fusion": "jointdiff.engine.fusion",
    "jointdiff.fewstep": "jointdiff.engine.fewstep",
    "jointdiff.shifted": "jointdiff.engine.shifted",
    "jointdiff.job_state": "jointdiff.engine.job_state",
    "jointdiff.result": "jointdiff.engine.result",
    "jointdiff.distributed": "jointdiff.engine.distributed",
    "jointdiff.job": "jointdiff.jobs.spec",
    "jointdiff.job_toml": "jointdiff.jobs.toml_writer",
}
"""Old module path → new module path. ``jointdiff.engine`` and ``jointdiff.models`` became
packages: their old names resolve through the packages' own ``__getattr__``."""


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new}; import from {new} (or, in a plugin, from jointdiff.plugin). "
        f"The old path works until jointdiff 0.3.",
        DeprecationWarning,
        stacklevel=3,
    )


class _Alias(importlib.abc.Loader):
    """Loads an old path as the new module itself (one module object, one identity)."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(spec.name, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module is already imported."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old module paths of :data:`MOVED`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once): it answers only the old names, and it
    must answer ``jointdiff.families.sd`` before the path finder finds ``sd.py`` through the
    aliased parent's ``__path__`` and makes a second copy of the module."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())


def moved_attribute(package: str, name: str, module: ModuleType) -> Any:
    """``package.name`` for a name that lived in the old module ``package`` and now lives in
    ``module``: the value, with a DeprecationWarning; AttributeError when it is not there."""
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warnings.warn(
        f"{package}.{name} moved to {module.__name__}.{name}; import it from {module.__name__}. "
        f"The old path works until jointdiff 0.3.",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(module, name)


def package_getattr(package: str, home: str, public: Sequence[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``, which was a module before 0.2 and whose names
    now live in ``home``: the ``public`` names are imported from ``home`` on first use (the
    package itself stays light), any other name of the old module with a DeprecationWarning."""

    def __getattr__(name: str) -> Any:
        module = importlib.import_module(home)
        if name in public:
            return getattr(module, name)
        return moved_attribute(package, name, module)

    return __getattr__

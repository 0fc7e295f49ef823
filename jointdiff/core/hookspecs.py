"""The hooks a jointdiff plugin may implement.

Hooks only *register* things; behaviour lives on the registered classes (see
:mod:`jointdiff.core.geometry`, :mod:`jointdiff.core.conditioner`, :mod:`jointdiff.core.synchronizer`).
Nothing per denoising step goes through a hook: a job names its parts and the engine calls
those objects directly.

A plugin is a module (or any object) whose hook functions are marked with
:data:`hookimpl`; it is found through the ``jointdiff`` entry-point group. A hook
implementation may take fewer arguments than its spec (pluggy passes only the ones it names).

Plugin API versioning
---------------------
``PLUGIN_API_VERSION`` is ``MAJOR.MINOR``; it covers these hooks, the base classes
(:class:`~jointdiff.core.geometry.Geometry`, :class:`~jointdiff.core.conditioner.Conditioner`,
:class:`~jointdiff.core.synchronizer.Synchronizer`), the objects handed to plugins
(:mod:`jointdiff.core.context`, :class:`~jointdiff.core.conditioner.Prompt`) and
:class:`~jointdiff.core.options.PluginOptions`.

- A MINOR bump may add hooks, add keyword arguments to a hook (implementations may take
  fewer arguments than a spec, so this never breaks a plugin), add methods *with defaults*
  to the base classes and add fields to the context objects.
- A MAJOR bump is needed to remove or rename a hook, remove or change a hook's arguments,
  add an abstract method, change an abstract method's signature or tensor conventions, or
  remove a field plugins may read.

A plugin module may declare the API it was written for with a module attribute
``REQUIRES_PLUGIN_API = "MAJOR.MINOR"`` (or ``"MAJOR"``). It loads when the major versions
are equal and jointdiff's minor version is at least the required one; otherwise loading it
is reported as a failure of that plugin, and the other plugins load as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from jointdiff.core.conditioner import Conditioner
    from jointdiff.core.family import ModelFamily
    from jointdiff.core.geometry import Geometry
    from jointdiff.core.synchronizer import Synchronizer

PLUGIN_API_VERSION = "2.1"
PROJECT_NAME = "jointdiff"
ENTRY_POINT_GROUP = "jointdiff"
REQUIRES_ATTRIBUTE = "REQUIRES_PLUGIN_API"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_geometries(register: Callable[[type[Geometry]], None]) -> None:
    """Register :class:`~jointdiff.core.geometry.Geometry` subclasses.

    :param register: call ``register(GeometryClass)`` once per class. The class must be a
        concrete subclass of ``Geometry`` with a string ``name`` (how jobs refer to it) and a
        nested ``Options`` model derived from :class:`~jointdiff.core.options.PluginOptions`.
    :returns: nothing; return values are ignored.
    """


@hookspec
def register_conditioners(register: Callable[[type[Conditioner]], None]) -> None:
    """Register :class:`~jointdiff.core.conditioner.Conditioner` subclasses.

    :param register: call ``register(ConditionerClass)`` once per class (same requirements
        as for geometries, with ``Conditioner`` as the base class).
    :returns: nothing; return values are ignored.
    """


@hookspec
def register_synchronizers(register: Callable[[type[Synchronizer]], None]) -> None:
    """Register :class:`~jointdiff.core.synchronizer.Synchronizer` subclasses.

    :param register: call ``register(SynchronizerClass)`` once per class (same requirements
        as for geometries, with ``Synchronizer`` as the base class).
    :returns: nothing; return values are ignored.
    """


@hookspec
def register_families(register: Callable[[type[ModelFamily]], None]) -> None:
    """Register :class:`~jointdiff.core.family.ModelFamily` subclasses (model families:
    how a kind of diffusers pipeline is loaded, prompted, called on windows and decoded).

    :param register: call ``register(FamilyClass)`` once per class (same requirements as for
        geometries, with ``ModelFamily`` as the base class). ``pipeline_classes`` names the
        diffusers pipeline classes the family accepts; ``tiny_models`` its built-in test models.
    :returns: nothing; return values are ignored.
    """


def parse_version(version: str, what: str = "version") -> tuple[int, int]:
    """``"MAJOR.MINOR"`` or ``"MAJOR"`` → ``(major, minor)``; ValueError naming ``what`` otherwise."""
    parts = str(version).strip().split(".")
    if not 1 <= len(parts) <= 2 or not all(part.isdigit() for part in parts):
        raise ValueError(f"{what} must look like 'MAJOR' or 'MAJOR.MINOR', got {version!r}")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0


def api_mismatch(required: object) -> str | None:
    """Why a plugin requiring plugin API ``required`` cannot load here, or None if it can."""
    try:
        major, minor = parse_version(str(required), REQUIRES_ATTRIBUTE)
    except ValueError as error:
        return str(error)
    have_major, have_minor = parse_version(PLUGIN_API_VERSION)
    if major != have_major or minor > have_minor:
        message = f"requires plugin API {required}, but this jointdiff provides {PLUGIN_API_VERSION}"
        return message + MIGRATION.get((major, have_major), "")
    return None


MIGRATION: dict[tuple[int, int], str] = {
    (1, 2): (
        "; to port it to 2.x: rename Conditioner.unet_kwargs(latent_model_input, timestep, "
        "encoder_hidden_states, window_ids, context) to model_kwargs(model_input, timestep, embeds, "
        "window_ids, context) with embeds an Embeddings, read Prompt.embeds as Embeddings, use "
        "JobContext.model (the model family; .pipeline is the diffusers pipeline), take a LatentFormat "
        "in Geometry.setup, import from jointdiff.plugin, then set REQUIRES_PLUGIN_API = \"2.1\" "
        "(docs/hooks.md, \"Changes in 2.0\")"
    ),
}
"""(required major, provided major) → how to port a plugin, appended to the refusal."""


def hook_names() -> list[str]:
    """Names of every hook specified in this module."""
    marker = PROJECT_NAME + "_spec"
    return sorted(name for name, value in globals().items() if callable(value) and hasattr(value, marker))

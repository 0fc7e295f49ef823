"""The hooks a jointdiff plugin may implement.

Hooks only *register* things; behaviour lives on the registered classes (see
:mod:`jointdiff.geometry`, :mod:`jointdiff.conditioner`, :mod:`jointdiff.synchronizer`).
Nothing per denoising step goes through a hook.

Plugin API versioning
---------------------
``PLUGIN_API_VERSION`` is ``MAJOR.MINOR``. A MINOR bump may add hooks, add optional keyword
arguments to hooks (implementations may take fewer arguments than a spec, so this never breaks
a plugin) and add methods with defaults to the base classes. A MAJOR bump is needed to remove
or rename a hook, change a hook's arguments, or change an abstract method's signature.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PLUGIN_API_VERSION = "1.0"
PROJECT_NAME = "jointdiff"
ENTRY_POINT_GROUP = "jointdiff"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_geometries(register: Callable[[type], None]) -> None:
    """Register :class:`~jointdiff.geometry.Geometry` subclasses.

    :param register: call ``register(GeometryClass)`` once per class; the class's ``name``
        is how jobs refer to it.
    :returns: nothing.
    """


@hookspec
def register_conditioners(register: Callable[[type], None]) -> None:
    """Register :class:`~jointdiff.conditioner.Conditioner` subclasses.

    :param register: call ``register(ConditionerClass)`` once per class.
    :returns: nothing.
    """


@hookspec
def register_synchronizers(register: Callable[[type], None]) -> None:
    """Register :class:`~jointdiff.synchronizer.Synchronizer` subclasses.

    :param register: call ``register(SynchronizerClass)`` once per class.
    :returns: nothing.
    """

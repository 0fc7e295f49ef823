"""The contracts plugins implement and the registry that finds them.

The four plugin kinds: :class:`~jointdiff.core.geometry.Geometry`,
:class:`~jointdiff.core.conditioner.Conditioner`,
:class:`~jointdiff.core.synchronizer.Synchronizer` and
:class:`~jointdiff.core.family.ModelFamily`; their options
(:mod:`jointdiff.core.options`), the hooks that register them
(:mod:`jointdiff.core.hookspecs`), the objects the engine hands them
(:mod:`jointdiff.core.context`), reusable bases (:mod:`jointdiff.core.tiling`) and helpers
(:mod:`jointdiff.core.masks`). Plugin authors import all of it from :mod:`jointdiff.plugin`.
"""

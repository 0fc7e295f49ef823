"""Everything a jointdiff plugin needs, from one module: the stable surface for plugin authors.

Import from here, not from the modules behind it (they are free to move)::

    from jointdiff.plugin import Geometry, PluginOptions, hookimpl

What it holds (plugin API :data:`PLUGIN_API_VERSION`, see ``docs/hooks.md``):

- registration: :data:`hookimpl`, :data:`PLUGIN_API_VERSION`;
- the four plugin kinds: :class:`Geometry`, :class:`Conditioner`, :class:`Synchronizer`,
  :class:`ModelFamily`, with :class:`PluginOptions` for their options;
- reusable bases and helpers: :class:`TiledGeometry` (crop windows, wrap), :class:`WindowOptions`,
  :func:`resolve_window_stride`, :func:`axis_starts`, :class:`SphereGeometry` and
  :class:`SphereOptions` (perspective views of a sphere), :func:`decode_wrapped`,
  :func:`encode_wrapped`, :func:`encode_text`, :func:`check_geometry_maps` (a conditioner's
  geometry maps against the geometry);
- what the engine hands plugins: :class:`Prompt`, :class:`Embeddings`, :class:`LatentFormat`
  (:data:`SD_LATENT`); :class:`JobContext`, :class:`WindowBatch`, :class:`StepState` and
  :func:`keyed_generator` (imported on first use: they need torch);
- reading images as users mean them: :mod:`images <jointdiff.utils.images>` (``images.load_image``,
  ``load_array``, ``load_tensor``, ``open_image_file``, ``unit_array``: EXIF orientation, 16-bit
  and float images by their real range, palette and alpha, one log line of what was done);
  :func:`stdout_folded` (a library's prints while loading, off stdout, as one note);
- errors: :class:`ConfigError` (a user's mistake: one line, exit 2), :class:`ModelLoadError`,
  :class:`PluginError`, :class:`NonFiniteLatentsError`, :class:`JointDiffError`;
- the conformance kit for a plugin's own tests (imported on first use: it needs torch):
  :class:`GeometryConformance`, :class:`ConditionerConformance`,
  :class:`SynchronizerConformance`, :class:`FamilyConformance`, :func:`check_invariance`,
  :func:`isolated_plugins`, :func:`tiny_pipeline`, :func:`tiny_model`, :func:`make_context`;
- pricing a synchronizer's own networks for the cost estimate (imported on first use):
  :func:`count_flops`, :func:`cached_flops`, :func:`decoder_unit` (a decoder's FLOPs per row).

Importing this module loads neither torch nor diffusers, so a plugin that imports from it at
module level keeps every job's validation fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from jointdiff.core.conditioner import Conditioner, Prompt, check_geometry_maps, encode_text
from jointdiff.core.family import SD_LATENT, Embeddings, GuidanceMode, LatentFormat, ModelFamily
from jointdiff.core.geometry import DecodeFn, EncodeFn, Geometry, decode_wrapped, encode_wrapped
from jointdiff.core.hookspecs import PLUGIN_API_VERSION, hookimpl
from jointdiff.core.options import PluginOptions
from jointdiff.core.synchronizer import Synchronizer
from jointdiff.core.tiling import TiledGeometry, WindowOptions, axis_starts, resolve_window_stride
from jointdiff.surfaces.sphere_base import SphereGeometry, SphereOptions
from jointdiff.utils import images
from jointdiff.utils.errors import ConfigError, JointDiffError, ModelLoadError, NonFiniteLatentsError, PluginError
from jointdiff.utils.quiet import stdout_folded

_LAZY = {
    "JobContext": "jointdiff.core.context",
    "StepState": "jointdiff.core.context",
    "WindowBatch": "jointdiff.core.context",
    "keyed_generator": "jointdiff.core.context",
    "GeometryConformance": "jointdiff.testing",
    "ConditionerConformance": "jointdiff.testing",
    "SynchronizerConformance": "jointdiff.testing",
    "FamilyConformance": "jointdiff.testing",
    "OneWindowGeometry": "jointdiff.testing",
    "isolated_plugins": "jointdiff.testing",
    "tiny_pipeline": "jointdiff.testing",
    "tiny_model": "jointdiff.testing",
    "make_context": "jointdiff.testing",
    "check_invariance": "jointdiff.testing.invariance",
    "count_flops": "jointdiff.cost.profiling",
    "cached_flops": "jointdiff.cost.profiling",
    "decoder_unit": "jointdiff.cost.profiling",
}

__all__ = [
    "PLUGIN_API_VERSION", "hookimpl",
    "Geometry", "Conditioner", "Synchronizer", "ModelFamily", "PluginOptions",
    "TiledGeometry", "WindowOptions", "resolve_window_stride", "axis_starts", "SphereGeometry", "SphereOptions",
    "DecodeFn", "EncodeFn", "decode_wrapped", "encode_wrapped", "encode_text", "check_geometry_maps",
    "Prompt", "Embeddings", "GuidanceMode", "LatentFormat", "SD_LATENT",
    "ConfigError", "JointDiffError", "ModelLoadError", "NonFiniteLatentsError", "PluginError",
    "images", "stdout_folded",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    # lazy: the step objects, the conformance kit and FLOP counting need torch; plugin discovery must not
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jointdiff.plugin' has no attribute {name!r}")

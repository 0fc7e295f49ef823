"""The model layer: model families (:mod:`jointdiff.models.families`), loading any model
(:mod:`jointdiff.models.loading`), LoRAs, the offline tiny models and tiled VAE decoding.

``load_model``, ``load_pipeline`` and ``as_model`` are importable from here.
"""

from __future__ import annotations

from jointdiff.utils.moved import package_getattr

__all__ = ["as_model", "load_model", "load_pipeline"]

# The names are imported on first use: jointdiff.models.loading needs torch, and importing a module of this
# package must not pull in all of it.
__getattr__ = package_getattr("jointdiff.models", "jointdiff.models.loading", __all__)

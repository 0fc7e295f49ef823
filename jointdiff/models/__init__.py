"""The model layer: model families (:mod:`jointdiff.models.families`), loading any model
(:mod:`jointdiff.models.loading`), LoRAs, the offline tiny models and tiled VAE decoding.

``load_model``, ``load_pipeline`` and ``as_model`` are importable from here.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["as_model", "load_model", "load_pipeline"]


def __getattr__(name: str) -> Any:
    # lazy: `jointdiff.models.loading` pulls in the registry; importing the package stays light
    loading = importlib.import_module("jointdiff.models.loading")  # not `from . import`: that would call this hook again
    # lazy: `import jointdiff` stays light (plugins import it for hookimpl)
    from jointdiff.utils.moved import moved_attribute

    if name in __all__:
        return getattr(loading, name)
    return moved_attribute("jointdiff.models", name, loading)

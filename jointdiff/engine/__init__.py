"""The joint-diffusion engine: the denoising loop (:mod:`jointdiff.engine.loop`), one
batched model call (:mod:`jointdiff.engine.denoiser`), fusion (:mod:`jointdiff.engine.fusion`,
fast modes in :mod:`jointdiff.engine.shifted` and :mod:`jointdiff.engine.fewstep`), job
checkpoints and window parallelism (:mod:`jointdiff.engine.distributed`).

``JointDiffusion``, ``JointResult`` and ``StopJob`` are importable from here.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["JointDiffusion", "JointResult", "StopJob"]


def __getattr__(name: str) -> Any:
    # lazy: the loop needs torch; `import jointdiff.engine.<module>` must not pull in all of it
    loop = importlib.import_module("jointdiff.engine.loop")  # not `from . import`: that would call this hook again
    # lazy: `import jointdiff` stays light (plugins import it for hookimpl)
    from jointdiff.utils.moved import moved_attribute

    if name in __all__:
        return getattr(loop, name)
    return moved_attribute("jointdiff.engine", name, loop)

"""The joint-diffusion engine: the denoising loop (:mod:`jointdiff.engine.loop`), one
batched model call (:mod:`jointdiff.engine.denoiser`), fusion (:mod:`jointdiff.engine.fusion`,
fast modes in :mod:`jointdiff.engine.shifted` and :mod:`jointdiff.engine.fewstep`), job
checkpoints and window parallelism (:mod:`jointdiff.engine.distributed`).

``JointDiffusion``, ``JointResult`` and ``StopJob`` are importable from here.
"""

from __future__ import annotations

from jointdiff.utils.moved import package_getattr

__all__ = ["JointDiffusion", "JointResult", "StopJob"]

# Imported on first use: jointdiff.engine.loop needs torch, and importing one module of this
# package must not pull in all of it.
__getattr__ = package_getattr("jointdiff.engine", "jointdiff.engine.loop", __all__)

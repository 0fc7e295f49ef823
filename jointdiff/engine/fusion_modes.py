"""The fusion of a job by its name (``fusion = "latent" | "x0" | "x0_renoise"``):
:mod:`jointdiff.engine.fusion` holds MultiDiffusion's and SyncTweedies' fusions,
:mod:`jointdiff.engine.fewstep` the few-step re-noising one."""

from __future__ import annotations

from jointdiff.engine.fewstep import RenoiseFusion
from jointdiff.engine.fusion import FusionMode, GeneratorFor, LatentFusion, TweedieFusion


def make_fusion(mode: FusionMode, geometry, canvas, batches, weights_of, step_kwargs, reduce=None, noise_sigma=1.0,
                generator_for: GeneratorFor | None = None, scheduler=None) -> LatentFusion:
    """The fusion of ``batches``. ``reduce`` (window parallelism) sums a canvas-sized buffer
    over ranks in place: the weights once, the numerator every step; ``batches`` are then
    this rank's share. ``noise_sigma`` scales the fresh noise of resampled views (the
    model's initial noise level). ``generator_for`` keys the noise (default: seed 0).
    ``scheduler``: the job's, after ``set_timesteps`` (``x0_renoise`` needs its timesteps)."""
    if mode == "latent":
        return LatentFusion(geometry, canvas, batches, weights_of, step_kwargs, reduce, noise_sigma, generator_for)
    if mode == "x0":
        steps = len(scheduler.timesteps) if scheduler is not None and getattr(scheduler, "timesteps", None) is not None else None
        return TweedieFusion(geometry, canvas, batches, weights_of, step_kwargs, reduce, noise_sigma, generator_for,
                             num_steps=steps)
    if mode == "x0_renoise":  # few-step sampling: fused x̂0 re-noised (jointdiff.engine.fewstep)
        if scheduler is None:
            raise ValueError("fusion = 'x0_renoise' needs the job's scheduler (after set_timesteps)")
        return RenoiseFusion(geometry, canvas, batches, weights_of, step_kwargs, reduce, noise_sigma, generator_for,
                             scheduler=scheduler)
    raise ValueError(f"fusion must be 'latent', 'x0' or 'x0_renoise', got {mode!r}")

"""Few-step sampling over the canvas: fuse x̂0, then re-noise (``fusion = "x0_renoise"``).

Few-step models (LCM, Luo et al. 2023; SDXL-Turbo / SD-Turbo; SDXL-Lightning; FLUX.1
schnell) are distilled to jump from noise to a clean image in 1–8 steps. Their multistep
sampler (LCM's Algorithm 1, diffusers' ``LCMScheduler``) alternates *predict x̂0* and
*re-noise x̂0 to the next, lower level with fresh noise*. StreamMultiDiffusion (Kodaira
et al. 2024) runs that sampler on a canvas of overlapping windows: every step the windows'
x̂0 are fused on the canvas, and the fused x̂0 is re-noised. Here, at step ``i`` (timestep
``t_i``):

1. every window predicts ``x̂0`` from its crop of the noisy canvas
   (:meth:`~jointdiff.core.family.ModelFamily.predicted_x0`);
2. the ``x̂0`` are fused with the windows' weights (MultiDiffusion's average, Bar-Tal et al.
   2023, Eq. 5, on clean latents): ``X̂0 = Σ_i insert_i(w_i ⊙ x̂0_i) / Σ_i insert_i(w_i)``;
3. if a step follows, the canvas becomes ``family.add_noise(X̂0, ε_i, t_{i+1})`` with unit
   noise ``ε_i`` ``(S, C, H, W)`` drawn from ``generator_for("renoise", i)`` (one draw for the
   whole canvas: the same whatever the batching, the batch order, the ranks or a resume);
   after the last step the canvas is ``X̂0``.

Everything model-specific goes through the family (``predicted_x0``, ``add_noise``), so it
works with every family and scheduler that the family can noise with (VP: DDIM, DDPM, LCM,
Euler; flow matching: ``x_t = (1 − σ) x̂0 + σ ε``). No scheduler ``step`` is taken, so
``eta`` has no meaning (refused); scheduler copies are made fresh every step, positioned by
the timestep, as a σ-scheduler's ``scale_model_input`` needs.

What it gives up: the sampler is LCM's, whatever the model. For an LCM model with diffusers'
``LCMScheduler`` one window equals the stock sampler but for LCM's boundary-condition
scalings, left out (``c_skip = 0.25 / ((10 t)² + 0.25)``: 1.3e-7 at ``t = 139``, the last of 8
steps; on one window of the tiny model, 2–8 steps, within 4e-6 of ``LCMScheduler`` for
latents up to 70, tests/test_fast_modes.py); for a flow model (FLUX.1 schnell) it replaces
the stock deterministic Euler steps with stochastic re-noising (the last step is the same:
``x̂0``). It needs a few-step model: an ordinary model at 4 steps gives what a 4-step
sampler gives. Cutting noisy windows out of
the canvas needs crops, so geometries that resample views (``equirect``, ``cubemap``) are
refused (their interpolated noise loses variance; use ``fusion = "x0"`` there).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Sequence

import torch

from jointdiff.engine.fusion import LatentFusion
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    from jointdiff.core.context import WindowBatch
    from jointdiff.engine.denoiser import Denoiser

RENOISE_PURPOSE = "renoise"
"""The key purpose of the re-noising noise: ``generator_for("renoise", step_index)``."""


def check_fewstep(geometry: Any, eta: float) -> None:
    """ConfigError, naming the option, where ``fusion = "x0_renoise"`` cannot apply: a geometry
    that resamples its views, or a non-zero ``eta`` (no scheduler step is taken)."""
    if getattr(geometry, "resamples", False):
        raise ConfigError(
            f"fusion = 'x0_renoise' cuts noisy windows out of the canvas, but geometry {geometry.name!r} resamples "
            "its views (interpolated noise loses variance); use fusion = 'x0' with this geometry"
        )
    if eta:
        raise ConfigError(
            f"eta = {eta!r} has no effect with fusion = 'x0_renoise' (it re-noises with fresh noise every step, "
            "no scheduler step is taken); remove it"
        )


def renoise(x0: torch.Tensor, step_index: int, timesteps: torch.Tensor, scheduler: Any, model: Any,
            generator_for: Any) -> torch.Tensor:
    """The canvas after step ``step_index``: the fused clean latents ``x0`` ``(S, C, H, W)``
    noised to the next timestep with unit noise keyed ``(RENOISE_PURPOSE, step_index)``
    (``model.add_noise``), or ``x0`` itself after the last step."""
    if step_index + 1 >= len(timesteps):
        return x0
    noise = torch.randn(x0.shape, generator=generator_for(RENOISE_PURPOSE, step_index), dtype=torch.float32)
    return model.add_noise(x0, noise.to(x0.device), timesteps[step_index + 1], scheduler).float()


class RenoiseFusion(LatentFusion):
    """Fuse every window's x̂0 on the canvas, then re-noise it to the next step's level.

    The canvas holds the noisy latents at the start of a step (as with ``latent`` fusion)
    and, after the last step, the fused clean latents. ``scheduler`` is the job's scheduler
    after ``set_timesteps``: its timesteps and a fresh copy per step (shared by all batches,
    never stepped) for the family's x̂0 and noise math."""

    def __init__(self, geometry, canvas, batches, weights_of, step_kwargs, reduce=None, noise_sigma=1.0,
                 generator_for=None, *, scheduler: Any) -> None:
        super().__init__(geometry, canvas, batches, weights_of, step_kwargs, reduce, noise_sigma, generator_for)
        self.template = scheduler
        self.timesteps = scheduler.timesteps
        self.scheduler = copy.deepcopy(scheduler)

    def step_batches(self, step_index: int, batches: Sequence[WindowBatch]) -> Sequence[WindowBatch]:
        """The same batches, all given one fresh scheduler copy for step ``step_index`` (a
        σ-scheduler finds its step from the timestep: nothing steps it here)."""
        self.scheduler = copy.deepcopy(self.template)
        for batch in batches:
            batch.scheduler = self.scheduler
        return batches

    def saved_states(self) -> dict:
        """Nothing beyond the canvas: the scheduler copies are fresh every step."""
        return {}

    def restore_states(self, states: dict, device: torch.device) -> bool:
        return True

    def add(self, batch: WindowBatch, latents: torch.Tensor, output: torch.Tensor, t: torch.Tensor,
            denoiser: Denoiser) -> None:
        x0 = denoiser.predicted_x0(latents, output, t, batch.scheduler)
        self.geometry.insert(self._fused, x0 * self.weights_of(batch), batch.window_ids)

    def end_step(self, t: torch.Tensor, denoiser: Denoiser) -> torch.Tensor:
        fused_x0 = self._reduced() / self.weight_sum
        self.canvas = renoise(fused_x0, self.step_index, self.timesteps, self.template, denoiser.model, self.generator_for)
        if getattr(self, "keep", None) is not None:
            self.canvas = self.keep(self.canvas, self.step_index)
        return self.canvas

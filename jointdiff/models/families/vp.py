"""Variance-preserving diffusion math (DDPM/DDIM, Ho et al. 2020; Song et al. 2021) for UNet
families (SD 1.x/2.x, SDXL): x̂0 from ε, v or sample predictions and its inverse."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jointdiff.core.family import ModelFamily

if TYPE_CHECKING:
    import torch


class VPFamily(ModelFamily):
    """A family whose scheduler has ``alphas_cumprod`` and a ``prediction_type``."""

    def prediction_type(self, scheduler: Any) -> str:
        return scheduler.config.get("prediction_type", "epsilon")

    def _vp_sample(self, latents: torch.Tensor, timestep: torch.Tensor, scheduler: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t`` in variance-preserving form and ``ᾱ_t`` (timesteps live on the CPU)."""
        sample = self.scale_model_input(latents, timestep, scheduler).float()
        alpha_bar = scheduler.alphas_cumprod[timestep.long().cpu()].to(sample.device).float()
        return sample, alpha_bar

    def predicted_x0(self, latents, output, timestep, scheduler):
        """Tweedie's / DDIM's x̂0 (Song et al. 2021, Eq. 12): ``(x_t − √(1−ᾱ) ε) / √ᾱ`` for ε,
        ``√ᾱ x_t − √(1−ᾱ) v`` for v-prediction; ``x_t`` after ``scale_model_input``."""
        kind = self.prediction_type(scheduler)
        sample, alpha_bar = self._vp_sample(latents, timestep, scheduler)
        if kind == "epsilon":
            return (sample - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
        if kind == "v_prediction":
            return alpha_bar.sqrt() * sample - (1 - alpha_bar).sqrt() * output
        if kind == "sample":
            return output
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {kind!r}")

    def output_from_x0(self, latents, x0, timestep, scheduler):
        kind = self.prediction_type(scheduler)
        sample, alpha_bar = self._vp_sample(latents, timestep, scheduler)
        epsilon = (sample - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        if kind == "epsilon":
            return epsilon
        if kind == "v_prediction":
            return alpha_bar.sqrt() * epsilon - (1 - alpha_bar).sqrt() * x0
        if kind == "sample":
            return x0
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {kind!r}")

    def add_noise(self, x0, noise, timestep, scheduler):
        """``√ᾱ x0 + √(1−ᾱ) ε`` scaled into the scheduler's own latent (``add_noise``)."""
        return scheduler.add_noise(x0, noise, timestep.reshape(1))

    def to_vae_latents(self, latents):
        vae = self.pipeline.vae
        shift = vae.config.get("shift_factor", None) or 0.0
        return latents / vae.config.scaling_factor + shift

    def from_vae_latents(self, latents):
        vae = self.pipeline.vae
        shift = vae.config.get("shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

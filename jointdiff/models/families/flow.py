"""Rectified-flow / flow-matching math (Lipman et al. 2023; Esser et al. 2024, SD3) shared by
the transformer families (SD3, FLUX.1, FLUX.2, Qwen-Image), and 2×2 token packing.

``x_t = (1 − σ_t) x0 + σ_t ε``; the model predicts the velocity ``v = ε − x0``, so
``x̂0 = x_t − σ_t v`` and, inversely, ``v = (x_t − x̂0) / σ_t``. Timesteps are ``1000 σ``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from einops import rearrange

from jointdiff.core.family import ModelFamily

if TYPE_CHECKING:
    import numpy as np
    import torch


def pack_patches(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``(B, C, h, w)`` → tokens ``(B, (h/p)(w/p), C·p·p)``, row-major over patches, channels
    then patch rows then patch columns within a token (FLUX's and Qwen-Image's packing)."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch, pw=patch)


def unpack_patches(tokens: torch.Tensor, size: tuple[int, int], patch: int = 2) -> torch.Tensor:
    """The inverse of :func:`pack_patches` for latents of spatial ``size`` ``(h, w)``."""
    h, w = size
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // patch, w=w // patch, ph=patch, pw=patch)


def linear_shift_mu(seq_len: int, config: Any) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the image token count between
    ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)`` (scheduler config)."""
    x1, x2 = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    y1, y2 = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (y2 - y1) / (x2 - x1)
    return seq_len * slope + (y1 - slope * x1)


class FlowMatchFamily(ModelFamily):
    """A family sampled with diffusers' ``FlowMatchEulerDiscreteScheduler`` (velocity output)."""

    flow_matching = True
    guidance = "cfg"
    supports_offsets = True
    cuda_dtype = "bfloat16"

    def window_tokens(self, window_size_latent: tuple[int, int]) -> int:
        """Image tokens of one window: ``(h / patch) · (w / patch)``."""
        patch = self.latent_format.patch
        return (window_size_latent[0] // patch) * (window_size_latent[1] // patch)

    def timestep_mu(self, seq_len: int, num_steps: int, scheduler: Any) -> float:
        """The dynamic shift for a window of ``seq_len`` tokens (when the scheduler uses it)."""
        return linear_shift_mu(seq_len, scheduler.config)

    def default_sigmas(self, num_steps: int) -> np.ndarray | None:
        """The sigmas the stock pipeline passes to ``set_timesteps`` (None: the scheduler's own)."""
        import numpy as np

        return np.linspace(1.0, 1 / num_steps, num_steps)

    def set_timesteps(self, scheduler, num_steps, window_size_latent) -> None:
        """As the stock pipeline does, with ``mu`` from the *window's* token count."""
        kwargs: dict[str, Any] = {}
        sigmas = self.default_sigmas(num_steps)
        if sigmas is not None:
            kwargs["sigmas"] = sigmas
        else:
            kwargs["num_inference_steps"] = num_steps
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self.timestep_mu(self.window_tokens(window_size_latent), num_steps, scheduler)
        scheduler.set_timesteps(device="cpu", **kwargs)

    def start_step(self, num_steps: int, strength: float) -> int:
        """As diffusers' flow image-to-image pipelines (e.g. ``FluxImg2ImgPipeline``):
        ``int(n − n·s)``, one step more than SD's rule when ``n·s`` is not whole."""
        return int(max(num_steps - num_steps * strength, 0))

    def initial_noise_sigma(self, scheduler) -> float:
        return 1.0

    @staticmethod
    def sigma_of(timestep: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """``σ_t`` of a timestep from the scheduler's own table (``t / N`` off the table)."""
        timesteps = scheduler.timesteps
        if timesteps is not None:
            match = (timesteps.cpu() == timestep.cpu()).nonzero()
            if len(match):
                return scheduler.sigmas[int(match[0, 0])].float()
        return timestep.float().cpu() / scheduler.config.num_train_timesteps

    def predicted_x0(self, latents, output, timestep, scheduler):
        """``x̂0 = x_t − σ_t v``."""
        sigma = self.sigma_of(timestep, scheduler).to(latents.device)
        return latents.float() - sigma * output

    def output_from_x0(self, latents, x0, timestep, scheduler):
        """``v = (x_t − x̂0) / σ_t``."""
        sigma = self.sigma_of(timestep, scheduler).to(latents.device)
        return (latents.float() - x0) / sigma

    def add_noise(self, x0, noise, timestep, scheduler):
        """``(1 − σ_t) x0 + σ_t ε`` (the scheduler's ``scale_noise``)."""
        sigma = self.sigma_of(timestep, scheduler).to(x0.device)
        return (1 - sigma) * x0 + sigma * noise

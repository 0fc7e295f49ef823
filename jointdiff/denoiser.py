"""One batched model evaluation for a group of windows: guidance, conditioners, x̂0.

The canvas is kept in float32 (fusion sums many windows); the UNet runs in the job's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .conditioner import Conditioner, Prompt
    from .context import JobContext


class Denoiser:
    """Evaluates the UNet on a window batch with classifier-free guidance batched in.

    The guidance batch is ``[uncond_1..uncond_B, cond_1..cond_B]`` (diffusers' order for a
    single prompt), so one UNet call serves all windows of the batch and both branches.
    """

    def __init__(self, context: JobContext, prompt: Prompt, conditioners: Sequence[Conditioner]) -> None:
        self.context = context
        self.unet = context.pipeline.unet
        self.prompt = prompt
        self.conditioners = list(conditioners)
        self.prediction_type = context.pipeline.scheduler.config.get("prediction_type", "epsilon")
        self._embeds = prompt.embeds.to(device=context.device, dtype=context.dtype)
        self._negative = prompt.negative_embeds.to(device=context.device, dtype=context.dtype)
        self._states_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _prompt_indices(self, window_ids: Sequence[int], prompt_index: int | None) -> list[int]:
        if prompt_index is not None:
            return [prompt_index] * len(window_ids)
        return self.prompt.indices(window_ids)

    def _encoder_states(self, window_ids: Sequence[int], prompt_index: int | None = None) -> torch.Tensor:
        """``(B', L, D)`` text states for the batch, guidance branches first-uncond (cached:
        batches are fixed for the whole job)."""
        key = (tuple(window_ids), prompt_index)
        if key not in self._states_cache:
            index = torch.tensor(self._prompt_indices(window_ids, prompt_index), device=self._embeds.device)
            states = self._embeds.index_select(0, index)
            if self.prompt.uses_guidance:
                states = torch.cat([self._negative.index_select(0, index), states])
            self._states_cache[key] = states
        return self._states_cache[key]

    def model_output(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        window_ids: Sequence[int],
        scheduler,
        prompt_index: int | None = None,
    ) -> torch.Tensor:
        """Guided model output (ε, v or x0 per the scheduler's ``prediction_type``) for
        window latents ``(B, C, h, w)``; returns float32 ``(B, C, h, w)``. ``prompt_index``
        forces one prompt for all windows (a region branch)."""
        guided = self.prompt.uses_guidance
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, timestep).to(self.context.dtype)
        states = self._encoder_states(window_ids, prompt_index)
        extra = {}
        for conditioner in self.conditioners:
            extra.update(conditioner.unet_kwargs(model_input, timestep, states, window_ids, self.context))
        output = self.unet(model_input, timestep, encoder_hidden_states=states, return_dict=False, **extra)[0]
        output = output.float()
        if guided:
            uncond, cond = output.chunk(2)
            scale = self.prompt.scales(self._prompt_indices(window_ids, prompt_index))
            if isinstance(scale, torch.Tensor):
                scale = scale.to(output.device)
            output = uncond + scale * (cond - uncond)
        return output

    def predicted_x0(
        self, latents: torch.Tensor, model_output: torch.Tensor, timestep: torch.Tensor, scheduler
    ) -> torch.Tensor:
        """Tweedie's / DDIM's predicted clean latent x̂0 (Song et al. 2021, Eq. 12).

        ``x̂0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t`` for ε-prediction, ``√ᾱ_t x_t − √(1−ᾱ_t) v`` for
        v-prediction; ``x_t`` is taken in variance-preserving form (after
        ``scale_model_input``, which is the identity for DDIM).
        """
        sample, alpha_bar = self._vp_sample(latents, timestep, scheduler)
        if self.prediction_type == "epsilon":
            return (sample - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
        if self.prediction_type == "v_prediction":
            return alpha_bar.sqrt() * sample - (1 - alpha_bar).sqrt() * model_output
        if self.prediction_type == "sample":
            return model_output
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}")

    def output_from_x0(
        self, latents: torch.Tensor, x0: torch.Tensor, timestep: torch.Tensor, scheduler
    ) -> torch.Tensor:
        """The model output (in the scheduler's ``prediction_type``) that would have predicted
        ``x0`` from ``latents``: the inverse of :meth:`predicted_x0`. Lets any scheduler step
        with a clean-latent estimate fused across windows (SyncTweedies)."""
        sample, alpha_bar = self._vp_sample(latents, timestep, scheduler)
        epsilon = (sample - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        if self.prediction_type == "epsilon":
            return epsilon
        if self.prediction_type == "v_prediction":
            return alpha_bar.sqrt() * epsilon - (1 - alpha_bar).sqrt() * x0
        if self.prediction_type == "sample":
            return x0
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}")

    @staticmethod
    def _vp_sample(latents: torch.Tensor, timestep: torch.Tensor, scheduler) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t`` in variance-preserving form and ``ᾱ_t`` (timesteps live on the CPU)."""
        sample = scheduler.scale_model_input(latents, timestep).float()
        alpha_bar = scheduler.alphas_cumprod[timestep.long().cpu()].to(sample.device).float()
        return sample, alpha_bar

"""One batched model evaluation for a group of windows: guidance, conditioners, x̂0.

The canvas is kept in float32 (fusion sums many windows); the model runs in the job's dtype.
Everything model-specific is asked of the job's :class:`~jointdiff.families.base.ModelFamily`.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Sequence

import torch

from .families.base import Embeddings

if TYPE_CHECKING:
    from .conditioner import Conditioner, Prompt
    from .context import JobContext


class Denoiser:
    """Evaluates the model on a window batch with guidance batched in.

    With classifier-free guidance the batch is ``[uncond_1..uncond_B, cond_1..cond_B]``
    (diffusers' order for a single prompt), so one model call serves all windows of the batch
    and both branches. Guidance-distilled families get the scale as a model input instead.
    """

    def __init__(self, context: JobContext, prompt: Prompt, conditioners: Sequence[Conditioner], offsets=None) -> None:
        self.context = context
        self.model = context.model
        self.prompt = prompt
        self.conditioners = list(conditioners)
        self.offsets = offsets
        self._embeds = prompt.embeds.to(device=context.device, dtype=context.dtype)
        negative = prompt.negative_embeds
        self._negative = negative.to(device=context.device, dtype=context.dtype) if negative is not None else None
        self._distilled = self.model.guidance_mode == "distilled"
        self._rows_cache: dict[tuple, tuple[Embeddings, torch.Tensor | None, torch.Tensor | None]] = {}

    def _prompt_indices(self, window_ids: Sequence[int], prompt_index: int | None) -> list[int]:
        if prompt_index is not None:
            return [prompt_index] * len(window_ids)
        return self.prompt.indices(window_ids)

    def _rows(self, window_ids: Sequence[int], prompt_index: int | None = None):
        """Embedding rows (guidance branches first-uncond), embedded guidance ``(B,)`` and
        window offsets for the batch (cached: batches are fixed for the whole job)."""
        key = (tuple(window_ids), prompt_index)
        if key not in self._rows_cache:
            index = self._prompt_indices(window_ids, prompt_index)
            rows = self._embeds.select(index)
            if self.prompt.uses_guidance:
                rows = Embeddings.cat([self._negative.select(index), rows])
            scale = None
            if self._distilled:
                scale = torch.as_tensor(self.prompt.guidance_scale, dtype=torch.float32)
                scale = scale[torch.tensor(index)] if scale.ndim else scale.expand(len(index))
                scale = scale.to(self.context.device)
            offsets = None
            if self.offsets is not None:
                offsets = self.offsets[list(window_ids)]  # on the CPU: families read them without a sync
                if self.prompt.uses_guidance:
                    offsets = torch.cat([offsets, offsets])
            self._rows_cache[key] = (rows, scale, offsets)
        return self._rows_cache[key]

    def model_output(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        window_ids: Sequence[int],
        scheduler,
        prompt_index: int | None = None,
    ) -> torch.Tensor:
        """Guided model output (ε, v or flow velocity) for window latents ``(B, C, h, w)``;
        returns float32 ``(B, C, h, w)``. ``prompt_index`` forces one prompt for all windows
        (a region branch)."""
        guided = self.prompt.uses_guidance
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = self.model.scale_model_input(model_input, timestep, scheduler)
        rows, scale, offsets = self._rows(window_ids, prompt_index)
        extra = {}
        for conditioner in self.conditioners:
            call = {"guidance_scale": scale, "offsets": offsets} if _takes_call_inputs(conditioner) else {}
            extra.update(conditioner.model_kwargs(model_input, timestep, rows, window_ids, self.context, **call))
        output = self.model.forward(model_input, timestep, rows, guidance_scale=scale, offsets=offsets, extra=extra)
        if guided:
            uncond, cond = output.chunk(2)
            weights = self.prompt.scales(self._prompt_indices(window_ids, prompt_index))
            if isinstance(weights, torch.Tensor):
                weights = weights.to(output.device)
            output = self.model.combine_guidance(uncond, cond, weights)
        return output

    def predicted_x0(self, latents: torch.Tensor, model_output: torch.Tensor, timestep: torch.Tensor, scheduler) -> torch.Tensor:
        """The clean latent x̂0 predicted from ``latents`` (see the family's ``predicted_x0``)."""
        return self.model.predicted_x0(latents, model_output, timestep, scheduler)

    def output_from_x0(self, latents: torch.Tensor, x0: torch.Tensor, timestep: torch.Tensor, scheduler) -> torch.Tensor:
        """The model output that would have predicted ``x0`` from ``latents`` (the inverse of
        :meth:`predicted_x0`): lets any scheduler step with an x̂0 fused across windows."""
        return self.model.output_from_x0(latents, x0, timestep, scheduler)


@functools.lru_cache(maxsize=None)
def _takes_call_inputs_of(cls: type) -> bool:
    parameters = inspect.signature(cls.model_kwargs).parameters
    return {"guidance_scale", "offsets"} <= set(parameters) or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _takes_call_inputs(conditioner) -> bool:
    """Whether ``conditioner.model_kwargs`` takes ``guidance_scale`` and ``offsets`` (an
    override written before they existed may not)."""
    return _takes_call_inputs_of(type(conditioner))

"""The Conditioner interface: per-window model conditioning.

A conditioner is set up once per job (encode prompts, load a ControlNet, ...). It contributes
either *prompts* (text embeddings with a guidance scale; the text conditioner) or extra
keyword arguments for the UNet call of a window batch (e.g. ControlNet residuals), or both.
The engine batches windows and classifier-free guidance together; a conditioner receives the
batch's window ids and must return tensors whose batch dimension matches.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .options import Configurable

if TYPE_CHECKING:
    from .context import JobContext, StepState, WindowBatch


@dataclass
class Prompt:
    """Encoded text conditioning.

    ``embeds`` and ``negative_embeds`` are ``(P, L, D)``: ``P`` prompts. By default every
    window uses prompt 0; ``window_prompt`` maps a window id to its prompt index (e.g. one
    prompt per texture tile). With ``region_masks`` ``(P, S, 1, H, W)`` (latent resolution,
    values in [0, 1]), every window is denoised once per prompt and each result enters the
    fusion weighted by its prompt's mask (MultiDiffusion, Bar-Tal et al. 2023, Sec. 4.2).
    ``guidance_scale`` as in classifier-free guidance (Ho & Salimans 2022):
    ``eps = eps_u + g (eps_c - eps_u)``; no unconditional batch when ``g <= 1`` (as
    diffusers). A tensor ``(P,)`` gives each prompt its own scale.
    """

    embeds: torch.Tensor
    negative_embeds: torch.Tensor
    guidance_scale: float | torch.Tensor
    window_prompt: Callable[[int], int] | None = None
    region_masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.region_masks is not None:
            if self.window_prompt is not None:
                raise ValueError("a Prompt takes either window_prompt or region_masks, not both")
            if self.region_masks.ndim != 5 or self.region_masks.shape[0] != self.embeds.shape[0]:
                raise ValueError(
                    f"region_masks must be (P, S, 1, H, W) with P = {self.embeds.shape[0]} prompts, "
                    f"got {tuple(self.region_masks.shape)}"
                )

    @property
    def branches(self) -> list[int | None]:
        """Prompt index of each branch: every window is denoised once per region prompt
        (MultiDiffusion's region-based generation), or once with its own prompt."""
        return list(range(self.embeds.shape[0])) if self.region_masks is not None else [None]

    @property
    def uses_guidance(self) -> bool:
        return bool(torch.as_tensor(self.guidance_scale).max() > 1.0)

    def scales(self, indices: Sequence[int]) -> float | torch.Tensor:
        """Guidance scale per window ``(B, 1, 1, 1)``, or one float for all."""
        if not isinstance(self.guidance_scale, torch.Tensor):
            return self.guidance_scale
        return self.guidance_scale[torch.tensor(indices)].view(-1, 1, 1, 1).float()

    def indices(self, window_ids: Sequence[int]) -> list[int]:
        """Prompt index of each window."""
        if self.window_prompt is None:
            return [0] * len(window_ids)
        return [self.window_prompt(i) for i in window_ids]


class Conditioner(Configurable, ABC):
    """Base class of every conditioner plugin."""

    def setup(self, context: JobContext) -> None:
        """Called once per job after the model is loaded (encode prompts, move models)."""

    def prompt(self) -> Prompt | None:
        """The prompt this conditioner provides, or None. Exactly one per job provides one."""
        return None

    def modify_latents(self, latents: torch.Tensor, batch: WindowBatch, state: StepState) -> torch.Tensor:
        """Change a batch's window latents before the UNet (e.g. MultiDiffusion's
        bootstrapping of region branches). Default: unchanged."""
        return latents

    def unet_kwargs(
        self,
        latent_model_input: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        window_ids: Sequence[int],
        context: JobContext,
    ) -> dict[str, Any]:
        """Extra UNet keyword arguments for one window batch (``(B', C, h, w)`` input,
        ``B'`` = windows × guidance branches). Default: none."""
        return {}

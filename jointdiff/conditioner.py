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
    from .context import JobContext


@dataclass
class Prompt:
    """Encoded text conditioning.

    ``embeds`` and ``negative_embeds`` are ``(P, L, D)``: ``P`` prompts. By default every
    window uses prompt 0; ``window_prompt`` maps a window id to its prompt index (e.g. one
    prompt per texture tile). ``guidance_scale`` as in classifier-free guidance (Ho &
    Salimans 2022): ``eps = eps_u + g (eps_c - eps_u)``; no unconditional batch when
    ``g <= 1`` (as diffusers).
    """

    embeds: torch.Tensor
    negative_embeds: torch.Tensor
    guidance_scale: float
    window_prompt: Callable[[int], int] | None = None

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0

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

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
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .options import Configurable

if TYPE_CHECKING:
    from .context import JobContext


@dataclass
class Prompt:
    """Encoded text conditioning shared by all windows.

    ``embeds`` and ``negative_embeds`` are ``(1, L, D)``; ``guidance_scale`` as in
    classifier-free guidance (Ho & Salimans 2022): ``eps = eps_u + g (eps_c - eps_u)``,
    no guidance batch when ``g <= 1`` (as diffusers).
    """

    embeds: torch.Tensor
    negative_embeds: torch.Tensor
    guidance_scale: float

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0


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

"""The Synchronizer interface: modify window latents before each denoising step.

SyncDiffusion (Lee et al., NeurIPS 2023) moves every window's noisy latent along the gradient
of a perceptual loss to an anchor window before the denoising step; the ``none`` synchronizer
leaves latents untouched (plain MultiDiffusion).
"""

from __future__ import annotations

from abc import ABC
from typing import TYPE_CHECKING

import torch

from .options import Configurable

if TYPE_CHECKING:
    from .context import JobContext, StepState, WindowBatch


class Synchronizer(Configurable, ABC):
    """Base class of every synchronizer plugin."""

    def setup(self, context: JobContext) -> None:
        """Called once per job after the model is loaded."""

    def begin_step(self, state: StepState) -> None:
        """Called once per denoising step before any window batch (e.g. compute an anchor)."""

    def update(self, latents: torch.Tensor, batch: WindowBatch, state: StepState) -> torch.Tensor:
        """Return the batch's window latents ``(B, C, h, w)`` to denoise at this step."""
        return latents

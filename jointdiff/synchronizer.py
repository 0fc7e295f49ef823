"""The Synchronizer interface: modify window latents before each denoising step.

SyncDiffusion (Lee et al., NeurIPS 2023) moves every window's noisy latent along the gradient
of a perceptual loss to an anchor window before the denoising step; the ``none`` synchronizer
leaves latents untouched (plain MultiDiffusion).
"""

from __future__ import annotations

from abc import ABC
from typing import TYPE_CHECKING, Any, Sequence

from .options import Configurable

if TYPE_CHECKING:
    import torch

    from .context import JobContext, StepState, WindowBatch


class Synchronizer(Configurable, ABC):
    """Base class of every synchronizer plugin.

    Results must not depend on how windows are batched, in which order batches run, on how
    many ranks run them, or on an interruption and resume: draw noise from
    :meth:`~jointdiff.context.StepState.generator_for` keyed by what it belongs to, and
    expose any state that outlives a step with :meth:`state_dict` /
    :meth:`load_state_dict` (:mod:`jointdiff.testing.invariance` checks all of this).
    """

    def setup(self, context: JobContext) -> None:
        """Called once per job after the model is loaded."""

    def begin_step(self, state: StepState) -> None:
        """Called once per denoising step before any window batch (e.g. compute an anchor)."""

    def update(self, latents: torch.Tensor, batch: WindowBatch, state: StepState) -> torch.Tensor:
        """Return the batch's window latents ``(B, C, h, w)`` to denoise at this step."""
        return latents

    def synchronizes(self, step_index: int) -> bool:
        """Whether :meth:`update` does extra work at step ``step_index`` (0-based); used only
        to balance window parallelism. Default: False."""
        return False

    def anchor_windows(self) -> Sequence[int]:
        """Windows whose extra work differs from the others' (e.g. SyncDiffusion's anchor,
        which gets no gradient pass); used only to balance window parallelism. Default: none."""
        return ()

    def state_dict(self) -> dict[str, Any]:
        """State that outlives a step, saved in checkpoints: tensors and plain containers
        (dicts, lists, numbers, strings, None) only. Default: none (stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, after :meth:`setup`, on resume."""

"""The Synchronizer interface: modify window latents before each denoising step.

SyncDiffusion (Lee et al., NeurIPS 2023) moves every window's noisy latent along the gradient
of a perceptual loss to an anchor window before the denoising step; the ``none`` synchronizer
leaves latents untouched (plain MultiDiffusion).
"""

from __future__ import annotations

from abc import ABC
from typing import TYPE_CHECKING, Any, Sequence

from jointdiff.core.options import Configurable

if TYPE_CHECKING:
    import torch

    from jointdiff.core.context import JobContext, StepState, WindowBatch


class Synchronizer(Configurable, ABC):
    """Base class of every synchronizer plugin.

    Results must not depend on how windows are batched, in which order batches run, on how
    many ranks run them, or on an interruption and resume: draw noise from
    :meth:`~jointdiff.core.context.StepState.generator_for` keyed by what it belongs to, and
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

    def evaluations_per_step(self, windows: int, branches: int, rows: int) -> dict[str, int] | None:
        """Network rows :meth:`update` adds in one synchronized step, per
        ``"network.direction"`` (``denoiser.forward``, ``decoder.backward``,
        ``perceptual.forward``, ...), for ``windows`` windows, ``branches`` prompt branches and
        ``rows`` guidance rows per window; used by the cost estimate (``--estimate``). Default:
        None (not known: the estimate says the synchronizer's own work is not counted)."""
        return None

    def price_per_row(self, model: Any, window: tuple[int, int]) -> tuple[dict[str, float], list[str]]:
        """FLOPs of one row of each network this synchronizer runs that the core does not price
        itself (the core prices ``denoiser.*`` and the VAE's ``decoder.*``), for windows of
        ``window`` (h, w) latent cells, and notes on what could not be priced. Measure with
        :func:`jointdiff.cost.profiling.count_flops`. Default: nothing extra."""
        return {}, []

    def reuses_anchor_output(self) -> bool:
        """Whether the anchor window's denoising step takes its model output from this
        synchronizer's anchor pass (:meth:`~jointdiff.core.context.StepState.remember_output`),
        saving one denoiser row per synchronized step. Default: False."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """State that outlives a step, saved in checkpoints: tensors and plain containers
        (dicts, lists, numbers, strings, None) only. Default: none (stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, after :meth:`setup`, on resume."""

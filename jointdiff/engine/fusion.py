"""How window results become one canvas each step.

``latent`` (MultiDiffusion, Bar-Tal et al. 2023, Eq. 5): the canvas holds the noisy latent
x_t; every window is cut from it, stepped, and the stepped windows are averaged back with
their weights.

``x0`` (SyncTweedies, Kim et al., NeurIPS 2024): every window keeps its own noisy latent in
window space; only the predicted clean latents x̂0 (Tweedie's formula) are averaged on the
canvas, and each window then steps with the fused x̂0 cut back out of it. Resampled windows
(perspective views of a sphere) keep the statistics of their noise this way, where
interpolating noisy latents would blur them. The canvas returned each step is the fused x̂0.

``x0_renoise`` (few-step models; StreamMultiDiffusion, Kodaira et al. 2024): the windows'
x̂0 are fused on the canvas and the fused x̂0 is re-noised to the next step's level, LCM's
multistep sampler over the canvas (:mod:`jointdiff.engine.fewstep`). Shifted non-overlapping
windows (``windows = "shifted"``, SpotDiffusion) are fusions too (:mod:`jointdiff.engine.shifted`).

Noise is keyed per window, never per batch, so no result depends on how windows are batched,
on the order batches run, or on the rank that runs them: a stochastic scheduler's step noise
for window ``w`` at step ``i`` comes from the generator keyed ``("scheduler_step", i, w)``
(diffusers' ``step`` takes one generator per batch row; every region branch of a window gets
the same noise, so fusing branches by their masks keeps its variance), the fresh noise of a
resampled view from ``("initial_view", w)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch

from jointdiff.core.context import keyed_generator

if TYPE_CHECKING:
    from jointdiff.core.context import WindowBatch
    from jointdiff.core.geometry import Geometry
    from jointdiff.engine.denoiser import Denoiser

FusionMode = Literal["latent", "x0", "x0_renoise"]
WeightsFn = Callable[["WindowBatch"], torch.Tensor]
Reduce = Callable[[torch.Tensor], torch.Tensor]
GeneratorFor = Callable[..., torch.Generator]
"""``generator_for(purpose, *keys)``: a fresh generator keyed by the job's seed (see
:meth:`jointdiff.core.context.JobContext.generator_for`)."""


def weight_sum(geometry: Geometry, batches: Sequence[WindowBatch], weights_of: WeightsFn, like: torch.Tensor) -> torch.Tensor:
    """``Σ_i insert_i(w_i)`` ``(S, 1, H, W)``: the denominator of the fusion, fixed per job."""
    total = torch.zeros(like.shape[0], 1, *like.shape[2:], device=like.device)
    for batch in batches:
        geometry.insert(total, weights_of(batch), batch.window_ids)
    return total


class LatentFusion:
    """MultiDiffusion: average the stepped noisy windows on the canvas."""

    def __init__(self, geometry: Geometry, canvas: torch.Tensor, batches: Sequence[WindowBatch],
                 weights_of: WeightsFn, step_kwargs: dict, reduce: Reduce | None = None, noise_sigma: float = 1.0,
                 generator_for: GeneratorFor | None = None) -> None:
        self.geometry = geometry
        self.noise_sigma = noise_sigma
        self.generator_for = generator_for or (lambda purpose, *keys: keyed_generator(0, purpose, *keys))
        self.step_index = 0
        self.canvas = canvas
        self.weights_of = weights_of
        self.step_kwargs = step_kwargs
        self.reduce = reduce
        self.weight_sum = weight_sum(geometry, batches, weights_of, canvas)
        if reduce is not None:
            reduce(self.weight_sum)
        self._fused = torch.empty_like(canvas)
        self.keep: Callable[[torch.Tensor, int], torch.Tensor] | None = None
        """``keep(canvas, step_index) -> canvas``: applied to the fused canvas at the end of
        every step (the noisy latents; with ``x0`` fusion the fused x̂0, before the windows
        step), e.g. an init image's keep mask (:class:`jointdiff.image.init_image.KeepBlend`)."""

    def _reduced(self) -> torch.Tensor:
        """The numerator summed over all ranks (window parallelism), or as it is."""
        if self.reduce is not None:
            self.reduce(self._fused)
        return self._fused

    def begin_step(self, step_index: int = 0) -> None:
        """Start step ``step_index`` (0-based; keys the scheduler noise): clear the numerator."""
        self.step_index = step_index
        self._fused.zero_()

    def _step(self, batch: WindowBatch, output: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The batch's scheduler step ``(B, C, h, w)`` → ``(B, C, h, w)`` float32, with one
        noise generator per window (stochastic schedulers: DDPM, Euler ancestral, DDIM η > 0)."""
        kwargs = dict(self.step_kwargs)
        if "generator" in kwargs:
            kwargs["generator"] = [self.generator_for("scheduler_step", self.step_index, w) for w in batch.window_ids]
        return batch.scheduler.step(output, t, latents, **kwargs, return_dict=False)[0].float()

    def window_latents(self, batch: WindowBatch) -> torch.Tensor:
        return self.geometry.extract(self.canvas, batch.window_ids)

    def latents_of(self, window_ids: Sequence[int]) -> torch.Tensor:
        """Current noisy latents ``(B, C, h, w)`` of any windows (e.g. a synchronizer's anchor)."""
        return self.geometry.extract(self.canvas, window_ids)

    def view_of(self, batch: WindowBatch) -> torch.Tensor | None:
        """The batch's own noisy latents ``(B, C, h, w)`` kept between steps (``x0`` fusion),
        or None (``latent`` fusion: windows are cut from the canvas)."""
        return None

    def set_view(self, batch: WindowBatch, latents: torch.Tensor) -> None:
        """Replace what :meth:`view_of` gives (on resume)."""
        raise ValueError("latent fusion keeps no window views")

    def set_canvas(self, canvas: torch.Tensor) -> None:
        """Replace the canvas the next step starts from (a step-end callback's latents)."""
        self.canvas = canvas

    def step_batches(self, step_index: int, batches: Sequence[WindowBatch]) -> Sequence[WindowBatch]:
        """The window batches of step ``step_index``, called before the step: ``batches`` (the
        job's fixed ones) here; a fusion whose windows move (``windows = "shifted"``,
        :mod:`jointdiff.engine.shifted`) returns its own."""
        return batches

    def saved_states(self) -> dict | None:
        """A checkpoint's per-window states, when this fusion keeps them itself (a canvas
        scheduler); None: every batch's scheduler state (:func:`jointdiff.engine.distributed.window_states`)."""
        return None

    def restore_states(self, states: dict, device: torch.device) -> bool:
        """Restore what :meth:`saved_states` gave; False: restore the batches' states instead."""
        return False

    def close(self) -> None:
        """The job's loop is over (e.g. give the geometry its own windows back)."""

    def hand_over_windows(self) -> None:
        """The job finished: show the geometry every window's own final latents
        (:meth:`~jointdiff.core.geometry.Geometry.final_windows`) where this fusion keeps them."""

    def add(self, batch: WindowBatch, latents: torch.Tensor, output: torch.Tensor, t: torch.Tensor, denoiser: Denoiser) -> None:
        stepped = self._step(batch, output, t, latents)
        self.geometry.insert(self._fused, stepped * self.weights_of(batch), batch.window_ids)

    def end_step(self, t: torch.Tensor, denoiser: Denoiser) -> torch.Tensor:
        self.canvas = self._reduced() / self.weight_sum
        if self.keep is not None:
            self.canvas = self.keep(self.canvas, self.step_index)
        return self.canvas


class TweedieFusion(LatentFusion):
    """SyncTweedies: windows keep their noisy latents; x̂0 is fused on the canvas."""

    def __init__(self, geometry, canvas, batches, weights_of, step_kwargs, reduce=None, noise_sigma=1.0,
                 generator_for=None, num_steps: int | None = None) -> None:
        super().__init__(geometry, canvas, batches, weights_of, step_kwargs, reduce, noise_sigma, generator_for)
        fraction = float(getattr(geometry, "fuse_until", 1.0))
        self.fused_steps = num_steps if num_steps is None or fraction >= 1 else round(fraction * num_steps)
        """Steps (from the first) whose windows step with the fused x̂0; later ones with their own
        (the geometry's ``fuse_until``; None: all)."""
        self.views = {batch.index: self._initial_view(batch, canvas) for batch in batches}
        self._batches = {batch.index: batch for batch in batches}
        self._where = {}
        for batch in batches:
            for k, window_id in enumerate(batch.window_ids):
                self._where.setdefault(window_id, (batch.index, k))
        self._pending: list[tuple[WindowBatch, torch.Tensor, torch.Tensor]] = []

    def _initial_view(self, batch: WindowBatch, canvas: torch.Tensor) -> torch.Tensor:
        """Crops start from the canvas noise; resampled views start from fresh noise of
        their own (each window's, keyed by its id): interpolated noise has lost part of its
        variance, and the views are synchronized through x̂0 anyway."""
        crop = self.geometry.extract(canvas, batch.window_ids)
        if not getattr(self.geometry, "resamples", False):
            return crop
        return self._view_noise(batch, crop) * self.noise_sigma

    def _view_noise(self, batch: WindowBatch, like: torch.Tensor) -> torch.Tensor:
        """Unit noise ``(B, C, h, w)`` of a batch's resampled views, keyed by window id."""
        shape = (1, *like.shape[1:])
        noise = [torch.randn(shape, generator=self.generator_for("initial_view", w)) for w in batch.window_ids]
        return torch.cat(noise).to(like.device)

    def start_from(self, x0: torch.Tensor, add_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Start resampled views from clean canvas latents ``x0`` ``(S, C, H, W)`` (an init
        image, :mod:`jointdiff.image.init_image`): each view is ``add_noise(x0 resampled into it,
        its own unit noise)``. Crops keep their start, cut from the canvas (already noised)."""
        if not getattr(self.geometry, "resamples", False):
            return
        for index, view in self.views.items():
            batch = self._batches[index]
            self.views[index] = add_noise(self.geometry.extract(x0, batch.window_ids), self._view_noise(batch, view))

    def window_latents(self, batch: WindowBatch) -> torch.Tensor:
        return self.views[batch.index]

    def view_of(self, batch: WindowBatch) -> torch.Tensor:
        return self.views[batch.index]

    def set_view(self, batch: WindowBatch, latents: torch.Tensor) -> None:
        self.views[batch.index] = latents

    def set_canvas(self, canvas: torch.Tensor) -> None:
        raise ValueError(
            "fusion = 'x0' keeps every window's own noisy latents; the canvas is their fused x̂0 "
            "and cannot be replaced by a step-end callback (use fusion = 'latent')"
        )

    def latents_of(self, window_ids: Sequence[int]) -> torch.Tensor:
        missing = [i for i in window_ids if i not in self._where]
        if missing:
            raise KeyError(f"windows {missing} are run by another rank; their latents live there")
        return torch.stack([self.views[b][k] for b, k in (self._where[i] for i in window_ids)])

    def add(self, batch, latents, output, t, denoiser) -> None:
        x0 = denoiser.predicted_x0(latents, output, t, batch.scheduler)
        self.geometry.insert(self._fused, x0 * self.weights_of(batch), batch.window_ids)
        self._pending.append((batch, latents, x0))

    def end_step(self, t, denoiser) -> torch.Tensor:
        fused_x0 = self._reduced() / self.weight_sum
        if self.keep is not None:
            fused_x0 = self.keep(fused_x0, self.step_index)
        for batch, latents, own_x0 in self._pending:
            x0 = self._window_x0(batch, fused_x0, own_x0)
            output = denoiser.output_from_x0(latents, x0, t, batch.scheduler)
            self.views[batch.index] = self._step(batch, output, t, latents)
        self._pending.clear()
        self.canvas = fused_x0
        return fused_x0

    def hand_over_windows(self) -> None:
        for index, batch in self._batches.items():
            self.geometry.final_windows(batch.window_ids, self.views[index])

    def _window_x0(self, batch: WindowBatch, fused_x0: torch.Tensor, own_x0: torch.Tensor) -> torch.Tensor:
        """The x̂0 a batch steps with ``(B, C, h, w)``: the fused canvas cut back out, its own
        where the geometry's :meth:`~jointdiff.core.geometry.Geometry.window_coverage` is 0
        (a view's background), and its own altogether once the fused steps are over."""
        if self.fused_steps is not None and self.step_index >= self.fused_steps:
            return own_x0
        x0 = self.geometry.extract(fused_x0, batch.window_ids)
        coverage = self.geometry.window_coverage(batch.window_ids, x0.device)
        if coverage is None:
            return x0
        return coverage * x0 + (1 - coverage) * own_x0.to(x0.dtype)

"""Shifted non-overlapping windows (``windows = "shifted"``): SpotDiffusion (Frolov et al.,
WACV 2025).

MultiDiffusion denoises overlapping windows (stride 8 of a 64-cell window: every cell 8
times per step along a strip) and averages them. SpotDiffusion denoises *non-overlapping*
windows — every cell exactly once per step — and offsets the window grid by a random shift
every step, so a seam left at one step lies inside a window at the next and is repaired
there. Per step (index ``i``):

1. the shift ``(dy, dx)``, each in ``[0, window)`` latent cells (whole model patches), is
   drawn from ``generator_for("shift", i)``: the same layout whatever the batching;
2. the geometry lays out one sheet's non-overlapping windows from it
   (:meth:`~jointdiff.core.tiling.TiledGeometry.shifted_tiling`; every sheet the same): on a
   wrapped axis the grid wraps with the shift; on an axis that does not wrap the windows at
   the two ends are clamped into the canvas and *own* only the part no other window owns
   (:func:`~jointdiff.core.tiling.shifted_segments`); each window's fusion weight is 1 on the
   cells it owns and 0 elsewhere, so the owned parts cover the canvas exactly once;
3. the windows' model outputs (and the latents they saw, after synchronizer and
   conditioners) are put on the canvas by ownership, and **one scheduler, for the whole
   canvas**, steps it (with ``fusion = "x0_renoise"``: their x̂0 are fused and re-noised,
   :mod:`jointdiff.engine.fewstep`).

One canvas scheduler instead of one per window batch: windows move every step, so a
per-window history would belong to no fixed cells; a canvas scheduler's history is per cell,
which every scheduler's math is (multistep solvers included), and with one owner per cell
stepping the fused output equals stepping each window. Stochastic schedulers draw their
step noise for the whole canvas from ``generator_for("shifted_step", i)``.

What it gives up: no averaging of overlapping predictions within a step; coherence across
window borders comes only from the shifts across steps (so very few steps leave seams
that are not repaired), and the clamped end windows of an axis that does not wrap evaluate
cells they do not own. Geometries that cannot shift: ``equirect`` and ``cubemap`` (their
windows are perspective views resampled through the sphere: no regular tiling without
overlap exists), ``cube_texture`` (windows that straddle a cube edge see two faces unfolded:
the faces cannot be tiled as one plane). Not combined (ConfigError): ``fusion = "x0"`` (it
keeps each window's own latents, which a moving window cannot), a synchronizer that
synchronizes (SyncDiffusion's anchor is a window id of the overlapping layout), window
parallelism over several ranks.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch

from jointdiff.core.context import WindowBatch, keyed_generator
from jointdiff.core.tiling import TiledGeometry
from jointdiff.engine.distributed import load_scheduler_rows, scheduler_rows
from jointdiff.engine.fewstep import RenoiseFusion
from jointdiff.engine.fusion import LatentFusion, weight_sum
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    from jointdiff.engine.denoiser import Denoiser

WindowsMode = Literal["overlap", "shifted"]
"""``"overlap"`` (MultiDiffusion's fixed overlapping windows) or ``"shifted"`` (this module)."""
WINDOWS_MODES = ("overlap", "shifted")
SHIFT_PURPOSE = "shift"
STEP_PURPOSE = "shifted_step"


def check_windows_option(windows: Any, geometry: Any, fusion: Any) -> None:
    """ConfigError naming ``windows`` (and the geometry or fusion) where it cannot apply."""
    if windows not in WINDOWS_MODES:
        raise ConfigError(f"windows must be 'overlap' (MultiDiffusion) or 'shifted' (SpotDiffusion), got {windows!r}")
    if windows == "overlap":
        return
    if not isinstance(geometry, TiledGeometry):
        if getattr(geometry, "resamples", False):
            why = "its windows are views resampled or rendered from the canvas, which no regular tiling covers once"
        else:
            why = "its windows are not crops of one plane per sheet (e.g. cube_texture's windows cross cube edges)"
        raise ConfigError(
            f"windows = 'shifted' needs a geometry of axis-aligned crops (strip, grid, torus, atlas); "
            f"geometry {getattr(geometry, 'name', geometry)!r} cannot shift: {why}"
        )
    if fusion == "x0":
        raise ConfigError(
            "windows = 'shifted' cannot use fusion = 'x0' (SyncTweedies keeps each window's own latents; shifted "
            "windows move every step); use fusion = 'latent' or 'x0_renoise'"
        )


def draw_shift(geometry: TiledGeometry, step_index: int, generator_for: Callable[..., torch.Generator]) -> tuple[int, int]:
    """Step ``step_index``'s shift ``(dy, dx)`` in latent cells: uniform over whole patches in
    ``[0, window)`` along each axis, keyed ``(SHIFT_PURPOSE, step_index)``."""
    patch = geometry.latent_format.patch
    generator = generator_for(SHIFT_PURPOSE, step_index)
    sides = geometry.window_size_latent
    return tuple(patch * int(torch.randint(0, side // patch, (1,), generator=generator)) for side in sides)


class ShiftedLayout:
    """A geometry's window layout that changes every step (engine internals).

    :meth:`batches` draws step ``i``'s shift, makes the geometry's windows the shifted ones
    (:meth:`~jointdiff.core.tiling.TiledGeometry.use_sheet_origins`: plugins that cut windows by
    id see them) and groups them ``view_batch_size`` at a time per prompt branch;
    :meth:`weights_of` is the job's weights times the cells each window owns;
    :meth:`restore` gives the geometry its overlapping windows back."""

    def __init__(self, geometry: TiledGeometry, branches: Sequence[int | None], view_batch_size: int,
                 weights_of: Callable[[WindowBatch], torch.Tensor], generator_for: Callable[..., torch.Generator]) -> None:
        self.geometry = geometry
        self.branches = list(branches)
        self.view_batch_size = view_batch_size
        self.base_weights = weights_of
        self.generator_for = generator_for
        self.saved = (list(geometry.origins), list(getattr(geometry, "tile_origins", []) or []) or None)
        self.owned: list[tuple[int, int, int, int]] = []
        self.step_index: int | None = None

    def batches(self, step_index: int, scheduler: Any) -> list[WindowBatch]:
        """Step ``step_index``'s window batches, every one with ``scheduler``."""
        tiling = self.geometry.shifted_tiling(draw_shift(self.geometry, step_index, self.generator_for))
        self.geometry.use_sheet_origins(tiling.origins)
        self.owned = tiling.owned * self.geometry.canvas_shape_latent[0]
        self.step_index = step_index
        ids = list(range(self.geometry.num_windows))
        size = self.view_batch_size
        groups = [tuple(ids[k : k + size]) for k in range(0, len(ids), size)]
        pairs = [(branch, group) for branch in self.branches for group in groups]
        return [WindowBatch(j, group, scheduler, branch) for j, (branch, group) in enumerate(pairs)]

    def owned_masks(self, window_ids: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """``(B, 1, h, w)``: 1 on the cells each window owns at this step, 0 elsewhere."""
        h, w = self.geometry.window_size_latent
        masks = torch.zeros(len(window_ids), 1, h, w, device=device)
        for k, window_id in enumerate(window_ids):
            y0, y1, x0, x1 = self.owned[window_id]
            masks[k, :, y0:y1, x0:x1] = 1.0
        return masks

    def weights_of(self, batch: WindowBatch) -> torch.Tensor:
        weights = self.base_weights(batch)
        return weights * self.owned_masks(batch.window_ids, weights.device)

    def restore(self) -> None:
        origins, tile_origins = self.saved
        self.geometry.origins = origins
        if tile_origins is not None:
            self.geometry.tile_origins = tile_origins


def _use_layout(fusion: LatentFusion, layout: ShiftedLayout, step_index: int, scheduler: Any) -> list[WindowBatch]:
    """Give ``fusion`` step ``step_index``'s windows: batches, weights and their sum."""
    if layout.step_index == step_index and fusion.batches_now:
        return fusion.batches_now
    batches = layout.batches(step_index, scheduler)
    fusion.weights_of = layout.weights_of
    fusion.weight_sum = weight_sum(layout.geometry, batches, layout.weights_of, fusion.canvas)
    if not bool((fusion.weight_sum > 0).all()):
        raise ConfigError(
            f"windows = 'shifted': geometry {layout.geometry.name!r} (with its window weights or region masks) "
            f"leaves canvas cells without weight at step {step_index}; shifted windows need positive weights"
        )
    fusion.batches_now = batches
    return batches


class ShiftedFusion(LatentFusion):
    """Shifted windows fused by ownership, stepped by one canvas scheduler (see the module)."""

    def __init__(self, layout: ShiftedLayout, canvas: torch.Tensor, step_kwargs: dict, scheduler: Any,
                 generator_for: Callable[..., torch.Generator]) -> None:
        super().__init__(layout.geometry, canvas, [], layout.weights_of, step_kwargs, None, 1.0, generator_for)
        self.layout = layout
        self.scheduler = copy.deepcopy(scheduler)
        self.batches_now: list[WindowBatch] = []
        self._inputs = torch.empty_like(canvas)

    def step_batches(self, step_index: int, batches: Sequence[WindowBatch]) -> list[WindowBatch]:
        return _use_layout(self, self.layout, step_index, self.scheduler)

    def begin_step(self, step_index: int = 0) -> None:
        super().begin_step(step_index)
        self._inputs.zero_()

    def add(self, batch: WindowBatch, latents: torch.Tensor, output: torch.Tensor, t: torch.Tensor,
            denoiser: Denoiser) -> None:
        weights = self.weights_of(batch)
        self.geometry.insert(self._inputs, latents.float() * weights, batch.window_ids)
        self.geometry.insert(self._fused, output.float() * weights, batch.window_ids)

    def end_step(self, t: torch.Tensor, denoiser: Denoiser) -> torch.Tensor:
        """One scheduler step of the whole canvas from the fused inputs and outputs."""
        latents, output = self._inputs / self.weight_sum, self._fused / self.weight_sum
        kwargs = dict(self.step_kwargs)
        if "generator" in kwargs:
            kwargs["generator"] = self.generator_for(STEP_PURPOSE, self.step_index)
        self.canvas = self.scheduler.step(output, t, latents, **kwargs, return_dict=False)[0].float()
        if getattr(self, "keep", None) is not None:
            self.canvas = self.keep(self.canvas, self.step_index)
        return self.canvas

    def saved_states(self) -> dict[str, dict[str, Any]]:
        """The checkpoint's state beyond the canvas: the canvas scheduler's (multistep history)."""
        return {"canvas": {"scheduler": scheduler_rows(self.scheduler, 1)[0]}}

    def restore_states(self, states: dict[str, dict[str, Any]], device: torch.device) -> bool:
        if "canvas" not in states:
            raise ConfigError("checkpoint has no canvas scheduler state (written by a job without shifted windows)")
        load_scheduler_rows(self.scheduler, [states["canvas"]["scheduler"]], device)
        return True

    def close(self) -> None:
        self.layout.restore()


class ShiftedRenoiseFusion(RenoiseFusion):
    """Shifted windows with few-step sampling: x̂0 fused by ownership, then re-noised."""

    def __init__(self, layout: ShiftedLayout, canvas: torch.Tensor, step_kwargs: dict, scheduler: Any,
                 generator_for: Callable[..., torch.Generator]) -> None:
        super().__init__(layout.geometry, canvas, [], layout.weights_of, step_kwargs, None, 1.0, generator_for,
                         scheduler=scheduler)
        self.layout = layout
        self.batches_now: list[WindowBatch] = []

    def step_batches(self, step_index: int, batches: Sequence[WindowBatch]) -> list[WindowBatch]:
        if self.layout.step_index != step_index:
            self.scheduler = copy.deepcopy(self.template)
        return _use_layout(self, self.layout, step_index, self.scheduler)

    def close(self) -> None:
        self.layout.restore()


def make_shifted_fusion(engine: Any, run: Any) -> tuple[list[WindowBatch], LatentFusion]:
    """The first step's batches and the fusion of a ``windows = "shifted"`` job (called by
    :class:`~jointdiff.engine.loop.JointDiffusion` after setup, with its run state)."""
    steps = len(run.timesteps)
    sync = engine.synchronizer
    if sync is not None and any(sync.synchronizes(i) for i in range(steps)):
        raise ConfigError(
            f"windows = 'shifted' does not combine with synchronizer {getattr(sync, 'name', sync)!r} "
            "(its anchor is a window of the overlapping layout); use synchronizer 'none' or windows = 'overlap'"
        )
    if run.comm is not None:
        raise ConfigError("windows = 'shifted' does not run with window parallelism (distributed); use distributed=False")
    layout = ShiftedLayout(engine.geometry, run.prompt.branches, engine.view_batch_size,
                           engine._weights_fn(run.prompt, run.canvas.device), run.context.generator_for)
    kind = ShiftedRenoiseFusion if run.fusion_mode == "x0_renoise" else ShiftedFusion
    fusion = kind(layout, run.canvas, engine._step_kwargs(run.scheduler), run.scheduler, run.context.generator_for)
    return list(fusion.step_batches(0, [])), fusion  # a copy: the engine refreshes the denoiser at step 0


def evaluation_counts(geometry: TiledGeometry, steps: int, seed: int = 0) -> list[int]:
    """Windows evaluated at each of ``steps`` steps with shifted windows (one prompt branch)
    for a set-up ``geometry`` and the job's ``seed`` (the geometry is not changed).
    MultiDiffusion evaluates ``geometry.num_windows`` windows at every step."""
    def generator_for(purpose: str, *keys: Any) -> torch.Generator:
        return keyed_generator(seed, purpose, *keys)

    sheets = geometry.canvas_shape_latent[0]
    return [len(geometry.shifted_tiling(draw_shift(geometry, i, generator_for)).origins) * sheets for i in range(steps)]

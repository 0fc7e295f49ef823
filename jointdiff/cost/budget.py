"""What a job will cost, known before it runs: windows, model calls and evaluations, FLOPs,
memory; and its limits (model evaluations and FLOPs: :mod:`jointdiff.cost.profiling`).

:func:`estimate` counts, from a set-up geometry and a loaded model (no prompt encoding, no
denoising), the windows, the model calls per step, the bytes of the canvas and its fusion
buffers, of the final VAE decode (whole and tiled, :mod:`jointdiff.models.tiled_decode`) and,
roughly, of one window batch's activations. :func:`check` refuses a job above
``max_megapixels`` or ``memory_limit_gb`` with one :class:`~jointdiff.utils.errors.ConfigError`
line that says what to change. :class:`LoopProgress` is the denoising loop's progress bar,
which on big jobs moves with every window batch instead of every step.

What is exact and what is not: windows, model calls, canvas bytes and decode tile counts are
exact; decode and activation bytes come from per-pixel (per-cell) constants calibrated on
SD-like architectures and are meant as an order of magnitude (within a factor of about 2;
the final decode's on the tiny model on the CPU: ``docs/benchmarks.md``). Model weights are
counted apart (:attr:`Estimate.weight_bytes`) and not in :attr:`Estimate.peak_bytes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as SequenceABC
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from jointdiff.core.geometry import DEFAULT_MAX_MEGAPIXELS  # re-exported: the limit is the canvas's
from jointdiff.cost.profiling import count_evaluations, format_flops, job_flops
from jointdiff.models.tiled_decode import decode_plan, default_overlap, tile_starts
from jointdiff.utils.errors import ConfigError


PER_BATCH_PROGRESS = 16
"""From this many window batches per step on, the progress bar ticks per batch."""

DECODER_BYTES_PER_PIXEL_CHANNEL = 3
"""Live full-resolution decoder activations, in tensors of the decoder's two widest
full-resolution widths (SD's VAE: 256 and 128 channels): ``dtype × 3 × (c1 + c0)`` bytes per
output pixel (192 B/px for the tiny VAE in float32, as measured)."""

UNET_ACTIVATION_FACTOR = 32
"""A UNet's live activations for one window row, in tensors of ``h × w × block_out_channels[0]``
per layer of a block (``layers_per_block``: 2 for SD; the tiny UNet's 1 gives 128 MiB for
view batch 4 with guidance, where 118 MiB was measured)."""

TRANSFORMER_ACTIVATION_FACTOR = 16
"""A transformer's live activations for one window row, in tensors of ``tokens × inner_dim``."""


@dataclass(frozen=True)
class Estimate:
    """The cost of one job, before it runs (see the module docstring for what is exact)."""

    canvas_shape: tuple[int, int, int, int]
    """``(S, C, H, W)`` of the canvas latents."""
    megapixels: float
    """Output pixels of all sheets, in millions."""
    windows: int
    window_size: tuple[int, int]
    view_batch_size: int
    branches: int
    """Times each window is denoised per step (region prompts: one per prompt)."""
    guidance_rows: int
    """Model input rows per window (2 with classifier-free guidance)."""
    batches_per_step: int
    """Model calls per step in the denoising loop (window batches × branches)."""
    window_evaluations_per_step: int
    """Windows evaluated per step (windows × branches); each is ``guidance_rows`` rows."""
    steps: int
    synchronized_steps: int
    """Steps a synchronizer (SyncDiffusion) adds a gradient pass to, per window."""
    fusion: str
    latent_bytes: int
    """One float32 canvas."""
    canvas_bytes: int
    """The loop's canvas state: canvas, fusion numerator and weights, the next canvas,
    every window's own latents with ``x0`` fusion, multistep scheduler history, region masks."""
    activation_bytes: int | None
    """One window batch's denoiser activations (rough; None: unknown architecture)."""
    decode_calls: int
    """Decoder passes of the final decode (tiles; twice with shared GroupNorm statistics)."""
    decode_tile_latent: int | None
    """Tile side of the final decode in latent cells; None: one piece."""
    decode_bytes: int
    """Peak of the final decode as it will run (rough), output pixels included."""
    decode_whole_bytes: int
    """Peak of a one-piece final decode (rough), for comparison."""
    weight_bytes: int | None
    """Parameters of the pipeline's modules (exact; not part of :attr:`peak_bytes`)."""
    evaluations: Any = None
    """Rows through each network per phase (:class:`jointdiff.cost.profiling.Evaluations`; exact)."""
    flops: Any = None
    """FLOPs per phase (:class:`jointdiff.cost.profiling.Flops`), when asked for (``flops=True``)."""
    geometry_work: dict[str, int] = field(default_factory=dict)
    """Work the geometry does once per job outside the model, by kind (exact counts; the
    ``mesh`` geometry: ``rays`` cast for its view and texel maps, ``bake_samples`` texel ×
    view look-ups of the final bake); empty for most geometries
    (:meth:`jointdiff.core.geometry.Geometry.setup_work`)."""

    @property
    def model_calls(self) -> int:
        """Model calls of the denoising loop over the whole job (synchronizer passes apart)."""
        return self.steps * self.batches_per_step

    @property
    def peak_bytes(self) -> int:
        """Working memory at the job's peak, model weights not included: the canvas state
        plus the larger of one window batch's activations and the final decode."""
        return self.canvas_bytes + max(self.activation_bytes or 0, self.decode_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_calls": self.model_calls, "peak_bytes": self.peak_bytes}

    def summary(self) -> str:
        """A few lines for people (the CLI prints them)."""
        s, c, h, w = self.canvas_shape
        decode = (
            f"{self.decode_calls} tile passes of {self.decode_tile_latent} latent cells"
            if self.decode_tile_latent is not None else "one piece"
        )
        lines = [
            f"canvas: {s} × {c} × {h} × {w} latent cells ({self.megapixels:.2f} megapixels)",
            f"windows: {self.windows:,} of {self.window_size[0]}×{self.window_size[1]} cells; "
            f"{self.batches_per_step:,} model calls per step (up to {min(self.view_batch_size, self.windows)} windows × "
            f"{self.guidance_rows} rows each), "
            f"{self.model_calls:,} over {self.steps} steps"
            + (f"; {self.synchronized_steps} synchronized steps" if self.synchronized_steps else ""),
            f"memory: canvas state {format_bytes(self.canvas_bytes)} ({self.fusion} fusion), "
            f"one window batch ~{format_bytes(self.activation_bytes)}, "
            f"final decode ~{format_bytes(self.decode_bytes)} ({decode}; whole: ~{format_bytes(self.decode_whole_bytes)}), "
            f"peak ~{format_bytes(self.peak_bytes)} + weights {format_bytes(self.weight_bytes)}",
        ]
        if self.geometry_work:
            lines.append("geometry, once per job: " + ", ".join(f"{count:,} {kind.replace('_', ' ')}" for kind, count in self.geometry_work.items()))
        return "\n".join(lines + self._cost_lines())

    def _cost_lines(self) -> list[str]:
        """Model evaluations and FLOPs (:mod:`jointdiff.cost.profiling`), when counted."""
        lines = []
        if self.evaluations is not None:
            total = self.evaluations.total()
            networks = dict.fromkeys(key.split(".")[0] for key in total)
            text = "; ".join(
                f"{net} {total.get(net + '.forward', 0):,} forward"
                + (f" + {total[net + '.backward']:,} backward" if total.get(net + ".backward") else "")
                for net in networks
            )
            lines.append(f"model evaluations (rows; a guided window is {self.guidance_rows}): {text}")
        if self.flops is not None:
            f = self.flops
            sync = f"synchronization {format_flops(f.synchronize)}, " if self.synchronized_steps else ""
            lines.append(
                f"FLOPs: {format_flops(f.total if f.synchronize is not None else None)} (denoising {format_flops(f.denoise)}, "
                f"{sync}final decode {format_flops(f.decode)}, prompts {format_flops(f.text)})"
            )
        notes = (self.flops.notes if self.flops is not None else ()) or (self.evaluations.notes if self.evaluations else ())
        lines += [f"note: {note}" for note in notes]
        return lines


def format_bytes(count: int | None) -> str:
    """``1536`` → ``"1.5 KiB"``; None → ``"unknown"``."""
    if count is None:
        return "unknown"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- the estimate --------------------------------------------------------------------------


def estimate(
    geometry,
    model,
    view_batch_size: int = 4,
    steps: int = 50,
    synchronizer=None,
    *,
    conditioners: Sequence[Any] = (),
    fusion: str | None = None,
    decode_tile_latent: int | None = None,
    shared_norms: bool = True,
    flops: bool = False,
    loop: Sequence[tuple[int, int]] | None = None,
) -> Estimate:
    """The cost of a job with ``geometry`` (set up here for ``model``'s latent format unless it
    already is) and ``model`` (a :class:`~jointdiff.core.family.ModelFamily`).

    ``conditioners`` (not set up) tell the prompt branches and classifier-free guidance from
    their options (``regions``, ``guidance_scale``, ``negative_prompt``); without them one
    branch is assumed, with guidance when the model has it. ``fusion`` None is the geometry's
    preferred one; ``decode_tile_latent`` as :class:`~jointdiff.engine.loop.JointDiffusion`'s.
    The model evaluations are always counted; ``flops`` also prices them (runs the networks
    once per window shape: :func:`jointdiff.cost.profiling.job_flops`). ``loop``: ``(step index,
    windows evaluated)`` of each step run (:func:`jointdiff.engine.plan.loop_plan`); None: every
    window at each of ``steps`` steps.
    """
    latent_format = model.latent_format
    if getattr(geometry, "latent_format", None) != latent_format:
        geometry.setup(latent_format)
    sheets, height, width = geometry.canvas_shape_latent
    channels, scale = latent_format.channels, latent_format.scale_factor
    window_h, window_w = geometry.window_size_latent
    windows = geometry.num_windows
    branches, rows_per_window = prompt_shape(conditioners, model)
    batches = math.ceil(windows / view_batch_size) * branches
    fusion = fusion or getattr(geometry, "preferred_fusion", "latent")

    latent = 4 * sheets * channels * height * width
    window = 4 * channels * window_h * window_w
    canvas = 3 * latent + latent // channels  # canvas, numerator, next canvas; weight sum
    if fusion == "x0":
        canvas += windows * branches * window  # every window keeps its own noisy latents
    canvas += windows * branches * window * scheduler_history(model)
    if branches > 1:
        canvas += branches * latent // channels  # region masks

    calls = decode_calls(geometry, (sheets, channels, height, width), scale)
    per_pixel = decoder_bytes_per_pixel(model)
    output = sum(12 * b * scale * scale * h * w for b, h, w in calls)  # float32 RGB
    whole = max(per_pixel * b * scale * scale * h * w for b, h, w in calls) + 2 * output
    tiled_peak, passes, tile_side, decode_rows, decode_cells = 0, 0, None, 0, 0
    for b, h, w in calls:
        tile = decode_plan((b, channels, h, w), scale, latent_format.native_window, decode_tile_latent)
        if tile is None:
            tiled_peak, passes = max(tiled_peak, per_pixel * b * scale * scale * h * w), passes + 1
            decode_rows, decode_cells = decode_rows + b, decode_cells + b * h * w
            continue
        tile_side = tile
        overlap = default_overlap(tile)
        count = len(tile_starts(h, tile, overlap)) * len(tile_starts(w, tile, overlap))
        count *= 2 if shared_norms and count > 1 else 1
        passes += count
        decode_rows, decode_cells = decode_rows + b * count, decode_cells + b * count * min(h, tile) * min(w, tile)
        tiled_peak = max(tiled_peak, per_pixel * b * scale * scale * min(h, tile) * min(w, tile))
    loop = [(i, windows) for i in range(steps)] if loop is None else list(loop)
    synced = synchronized_steps(synchronizer, [i for i, _ in loop])
    evaluations = count_evaluations(windows, branches, rows_per_window, sum(n for _, n in loop), synchronizer, synced,
                                    decode_rows)
    priced = None
    if flops:
        try:
            priced = job_flops(model, (window_h, window_w), rows_per_window, evaluations, decode_cells,
                               branches * rows_per_window, synchronizer)
        except Exception as error:  # a network the counter cannot run on one window: no FLOPs, said so
            reason = f"FLOPs not counted ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            evaluations = replace(evaluations, notes=evaluations.notes + (reason[:200],))
    return Estimate(
        canvas_shape=(sheets, channels, height, width),
        megapixels=sheets * height * width * scale * scale / 1e6,
        windows=windows,
        window_size=(window_h, window_w),
        view_batch_size=view_batch_size,
        branches=branches,
        guidance_rows=rows_per_window,
        batches_per_step=batches,
        window_evaluations_per_step=windows * branches,
        steps=steps,
        synchronized_steps=synced,
        fusion=fusion,
        latent_bytes=latent,
        canvas_bytes=canvas,
        activation_bytes=activation_bytes(model, (window_h, window_w), min(view_batch_size, windows) * rows_per_window),
        decode_calls=passes,
        decode_tile_latent=tile_side,
        decode_bytes=tiled_peak + 2 * output,
        decode_whole_bytes=whole,
        weight_bytes=weight_bytes(model),
        evaluations=evaluations,
        flops=priced,
        geometry_work=dict(geometry.setup_work()) if hasattr(geometry, "setup_work") else {},
    )


def prompt_shape(conditioners: Sequence[Any], model) -> tuple[int, int]:
    """``(branches, rows per window)`` from the conditioners' options: one branch per region
    prompt plus the background (``regions``), two rows with classifier-free guidance."""
    branches, scales = 1, []
    for conditioner in conditioners:
        options = getattr(conditioner, "options", None)
        regions = getattr(options, "regions", None)
        if regions:
            branches = max(branches, 1 + len(regions))
        if options is not None and hasattr(options, "guidance_scale"):
            scale = options.guidance_scale
            scales.append((model.default_guidance_scale if scale is None else scale, getattr(options, "negative_prompt", None)))
    if not scales:
        return branches, 2 if model.guidance_mode == "cfg" else 1
    cfg = any(model.uses_cfg(scale, negative) for scale, negative in scales)
    return branches, 2 if cfg else 1


def synchronized_steps(synchronizer, steps: int | Sequence[int]) -> int:
    """How many of the steps (``range(steps)``, or these step indices) the synchronizer
    synchronizes."""
    if synchronizer is None or not hasattr(synchronizer, "synchronizes"):
        return 0
    indices = range(steps) if isinstance(steps, int) else steps
    return sum(1 for i in indices if synchronizer.synchronizes(i))


def scheduler_history(model) -> int:
    """Window-sized tensors a multistep scheduler keeps per window (its solver order)."""
    config = getattr(model.scheduler, "config", {}) or {}
    order = config.get("solver_order", 0) if hasattr(config, "get") else 0
    return int(order or 0)


def decode_calls(geometry, shape: tuple[int, int, int, int], scale: int) -> list[tuple[int, int, int]]:
    """``(B, h, w)`` latents of every call the geometry's :meth:`decode` makes, found by
    running it on meta tensors (nothing is allocated); the sheets one by one if that fails."""
    calls: list[tuple[int, int, int]] = []

    def record(latents: torch.Tensor) -> torch.Tensor:
        calls.append((latents.shape[0], latents.shape[-2], latents.shape[-1]))
        return torch.empty(latents.shape[0], 3, scale * latents.shape[-2], scale * latents.shape[-1], device="meta")

    try:
        geometry.decode(torch.empty(shape, device="meta"), record)
    except Exception:  # a geometry whose decode needs real values
        calls = [(1, shape[2], shape[3])] * shape[0]
    return calls or [(1, shape[2], shape[3])] * shape[0]


def _dtype_bytes(module: Any, default: int = 4) -> int:
    dtype = getattr(module, "dtype", None)
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else default


def decoder_bytes_per_pixel(model) -> int:
    """Peak decoder activations per output pixel (see :data:`DECODER_BYTES_PER_PIXEL_CHANNEL`);
    SD's VAE widths when the VAE has no ``block_out_channels``."""
    vae = getattr(getattr(model, "pipeline", None), "vae", None)
    widths = list(getattr(getattr(vae, "config", None), "block_out_channels", None) or (128, 256))
    c0, c1 = widths[0], widths[1] if len(widths) > 1 else widths[0]
    return _dtype_bytes(vae) * DECODER_BYTES_PER_PIXEL_CHANNEL * (c0 + c1)


def activation_bytes(model, window: tuple[int, int], rows: int) -> int | None:
    """Rough denoiser activations of one call on ``rows`` windows (None: unknown)."""
    module = getattr(model, "denoiser_module", None)
    config = getattr(module, "config", None)
    if config is None:
        return None
    size = _dtype_bytes(module)
    cells = window[0] * window[1]
    widths = config.get("block_out_channels") if hasattr(config, "get") else None
    if widths:
        layers = config.get("layers_per_block", 2)
        layers = max(layers) if isinstance(layers, (list, tuple)) else int(layers or 2)
        return rows * cells * widths[0] * size * UNET_ACTIVATION_FACTOR * layers
    heads = config.get("num_attention_heads") if hasattr(config, "get") else None
    head_dim = config.get("attention_head_dim") if hasattr(config, "get") else None
    if isinstance(heads, int) and isinstance(head_dim, int):
        patch = model.latent_format.patch
        return rows * (cells // (patch * patch)) * heads * head_dim * size * TRANSFORMER_ACTIVATION_FACTOR
    return None


def weight_bytes(model) -> int | None:
    """Bytes of every parameter and buffer of the pipeline's modules (None: no pipeline)."""
    components = getattr(getattr(model, "pipeline", None), "components", None)
    if not isinstance(components, dict):
        return None
    seen, total = set(), 0
    for component in components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in list(component.parameters()) + list(component.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


# -- limits --------------------------------------------------------------------------------


def check(estimate: Estimate, max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
          memory_limit_gb: float | None = None, geometry_name: str = "geometry") -> None:
    """Refuse a job above the limits with one ConfigError line that says what it would cost
    and what to change (None: no limit)."""
    if max_megapixels is not None and estimate.megapixels > max_megapixels:
        s, _, h, w = estimate.canvas_shape
        scale = math.sqrt(estimate.megapixels * 1e6 / (s * h * w))
        size = f"{round(scale * h)}×{round(scale * w)} px" + (f" × {s} sheets" if s > 1 else "")
        raise ConfigError(
            f"{geometry_name}: the canvas is {estimate.megapixels:.1f} megapixels ({size}; {estimate.windows:,} windows, "
            f"{estimate.batches_per_step:,} model calls per step, canvas state {format_bytes(estimate.canvas_bytes)}, "
            f"final decode ~{format_bytes(estimate.decode_bytes)}), above max_megapixels = {max_megapixels:g}; "
            "if you mean it, raise max_megapixels (JointDiffusion(max_megapixels=...) or the job's max_megapixels), "
            "else make the canvas smaller"
        )
    if memory_limit_gb is not None and estimate.peak_bytes > memory_limit_gb * 2**30:
        parts = {
            "canvas state": estimate.canvas_bytes,
            "one window batch": estimate.activation_bytes or 0,
            "final decode": estimate.decode_bytes,
        }
        largest = max(parts, key=parts.get)
        if largest == "one window batch":
            hint = f"use a smaller view_batch_size (now {estimate.view_batch_size})"
        elif largest == "final decode":
            hint = ("decode in smaller tiles (decode_tile_latent)" if estimate.decode_tile_latent is not None
                    else "decode in tiles (decode_tile_latent, e.g. the model's native window)")
        else:
            hint = "use a larger stride_latent (fewer windows) or a smaller canvas"
            if estimate.fusion == "x0":
                hint += "; x0 fusion keeps every window's latents (latent fusion does not)"
        details = ", ".join(f"{name} ~{format_bytes(size)}" for name, size in parts.items())
        raise ConfigError(
            f"{geometry_name}: estimated peak working memory ~{format_bytes(estimate.peak_bytes)} ({details}; "
            f"model weights not included) is above memory_limit_gb = {memory_limit_gb:g}; {hint}, "
            "or raise memory_limit_gb"
        )


def check_limit_options(max_megapixels: float | None, memory_limit_gb: float | None) -> None:
    """ConfigError unless each limit is None or a positive number."""
    for name, value in (("max_megapixels", max_megapixels), ("memory_limit_gb", memory_limit_gb)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{name} must be a positive number or None (no limit), got {value!r}")


# -- progress ------------------------------------------------------------------------------


class LoopProgress:
    """The denoising loop's progress bar. Small jobs: one tick per step (as before). Jobs with
    at least ``per_batch_from`` window batches per step: total = steps × batches, one tick per
    batch (unit ``batch``, the step in the postfix), so a step of many minutes shows motion."""

    def __init__(self, steps: int, batches_per_step: int, start: int = 0, *, disable: bool = False,
                 desc: str = "jointdiff", per_batch_from: int | None = None) -> None:
        self.steps_total = steps
        self.per_batch = batches_per_step >= (PER_BATCH_PROGRESS if per_batch_from is None else per_batch_from)
        factor = batches_per_step if self.per_batch else 1
        self.bar = tqdm(
            total=steps * factor, initial=start * factor, disable=disable, desc=desc,
            unit="batch" if self.per_batch else "it",
        )

    def steps(self, start: int = 0) -> Iterator[int]:
        """Step indices from ``start``; the bar ticks (or shows the step) after each and is
        closed at the end (or when the loop is left early and the iterator dropped)."""
        try:
            for index in range(start, self.steps_total):
                if self.per_batch:
                    self.bar.set_postfix_str(f"step {index + 1}/{self.steps_total}", refresh=False)
                yield index
                self.step_done(index)
        finally:
            self.close()

    def batches(self, batches: Sequence[Any]) -> Sequence[Any]:
        """``batches`` for one step's loop; iterating it ticks per batch (big jobs)."""
        return _Ticking(batches, self.bar) if self.per_batch else batches

    def step_done(self, step_index: int) -> None:
        """Step ``step_index`` is done: one tick when the bar counts steps."""
        if not self.per_batch:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _Ticking(SequenceABC):
    def __init__(self, items: Sequence[Any], bar) -> None:
        self.items, self.bar = items, bar

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            yield item
            self.bar.update(1)

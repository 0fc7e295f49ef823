"""Cost accounting of a job: model evaluations and FLOPs before it runs, time per phase after.

Before a job runs (:func:`jointdiff.cost.budget.estimate`, :meth:`JointDiffusion.estimate`):

- :func:`count_evaluations` counts the **rows** every network evaluates, by phase. A row is one
  image through a network: a window with classifier-free guidance is 2 denoiser rows, region
  prompts evaluate every window once per branch (MultiDiffusion, Bar-Tal et al. 2023, Sec. 4.2),
  a decoder row is one window (or one tile of the final decode). SyncDiffusion (Lee et al.
  2023, Alg. 1) adds per synchronized step the anchor's guided forward, decode and LPIPS
  features (no gradient), and for the ``N − 1`` other windows of every branch a forward and
  backward of the denoiser, the loss decoder and LPIPS (:func:`syncdiffusion_step`).
- :func:`job_flops` prices those rows in floating-point operations, measured once per
  (model, window shape, rows) with :class:`torch.utils.flop_counter.FlopCounterMode` on the
  actual networks (a denoiser call on one window with its guidance rows, a decode of one window,
  their input gradients; LPIPS on the meta device) and cached. FlopCounterMode counts matrix
  products, convolutions and attention, not elementwise work. The final decode is priced by
  area from one window (the VAE's attention grows faster than its area on one-piece decodes
  of large canvases); ControlNet residuals are not priced.

While it runs: :class:`PhaseTimer` adds ``time.perf_counter`` intervals per phase (setup,
the engine's model calls, synchronization, fusion incl. the scheduler step, final decode;
the rest is ``other``). With profiling on (``profile=True`` or inside :func:`session`) each phase
boundary waits for the device (``torch.cuda.synchronize``), so the times belong to their
phase, and :class:`EvaluationCounter` counts the rows that really ran.
"""

from __future__ import annotations

import contextvars
import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from jointdiff.core.family import Embeddings
from jointdiff.utils.fingerprint import model_identity

PHASES = ("setup", "model", "synchronization", "fusion", "decode")
"""Timed phases (``setup``: plugins' setup, prompt encoding, the estimate and, when
profiling, its FLOP count); ``other`` is the wall time outside them (the initial canvas,
finite checks, callbacks, checkpoints, images)."""

NETWORKS = ("denoiser", "decoder", "perceptual")

_FLOPS_CACHE: dict[tuple, float] = {}


# -- model evaluations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluations:
    """Rows per ``"network.direction"`` (``denoiser.forward``, ``decoder.backward``, ...) of
    each phase of a job: the denoising loop, the synchronizer, the final decode."""

    denoise: dict[str, int]
    synchronize: dict[str, int]
    decode: dict[str, int]
    notes: tuple[str, ...] = ()

    def total(self) -> dict[str, int]:
        """Rows per network and direction over the whole job."""
        out: dict[str, int] = {}
        for phase in (self.denoise, self.synchronize, self.decode):
            for key, rows in phase.items():
                out[key] = out.get(key, 0) + rows
        return {key: out[key] for key in sorted(out, key=_key_order)}


def _key_order(key: str) -> tuple[int, int, str]:
    network, _, direction = key.partition(".")
    return (NETWORKS.index(network) if network in NETWORKS else len(NETWORKS), direction != "forward", key)


def synchronizer_step(synchronizer: Any, windows: int, branches: int, rows: int) -> dict[str, int] | None:
    """Rows a synchronizer adds per synchronized step (its
    :meth:`~jointdiff.core.synchronizer.Synchronizer.evaluations_per_step`); ``{}`` without a
    synchronizer; None: unknown."""
    if synchronizer is None:
        return {}
    own = getattr(synchronizer, "evaluations_per_step", None)
    counted = own(windows, branches, rows) if callable(own) else None
    return None if counted is None else dict(counted)


def reuses_anchor_output(synchronizer: Any) -> bool:
    """Whether the anchor's denoising step reuses the synchronizer's anchor forward."""
    own = getattr(synchronizer, "reuses_anchor_output", None)
    return bool(own()) if callable(own) else False


def count_evaluations(windows: int, branches: int, rows: int, window_steps: int, synchronizer: Any,
                      synchronized_steps: int, decode_rows: int) -> Evaluations:
    """The rows of a whole job (see the module docstring): ``window_steps × branches × rows``
    denoiser rows in the loop (``window_steps``: windows evaluated, summed over the steps run;
    ``steps × windows`` for MultiDiffusion), the synchronizer's per synchronized step for
    ``windows`` windows, ``decode_rows`` decoder rows in the final decode (tiles × passes)."""
    notes = []
    per_step = synchronizer_step(synchronizer, windows, branches, rows)
    if per_step is None:
        per_step = {}
        if synchronized_steps:
            notes.append(f"synchronizer {getattr(synchronizer, 'name', type(synchronizer).__name__)!r}: its own evaluations are not counted")
    loop = window_steps * branches * rows
    if synchronized_steps and windows > 1 and reuses_anchor_output(synchronizer):
        loop -= rows * synchronized_steps  # the anchor's denoising step takes its output from the synchronizer
    return Evaluations(
        denoise={"denoiser.forward": loop},
        synchronize={key: value * synchronized_steps for key, value in per_step.items() if value * synchronized_steps},
        decode={"decoder.forward": decode_rows},
        notes=tuple(notes),
    )


# -- FLOPs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flops:
    """Floating-point operations of a job by phase (None: not priced), and the measured price
    per row of each ``"network.direction"`` (``unit``; the final decode's per latent cell)."""

    denoise: float
    synchronize: float | None
    decode: float
    text: float
    unit: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return self.denoise + (self.synchronize or 0.0) + self.decode + self.text


def count_flops(action: Callable[[], Any]) -> int:
    """FLOPs of ``action()`` as :class:`~torch.utils.flop_counter.FlopCounterMode` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        action()
    return int(counter.get_total_flops())


def _cached(key: tuple, measure: Callable[[], float]) -> float:
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = float(measure())
    return _FLOPS_CACHE[key]


def _identity(model: Any) -> str:
    try:
        return model_identity(model)
    except Exception:  # a stand-in model without a pipeline config
        return f"{type(model).__name__}@{id(model)}"


def _denoiser_inputs(model: Any, window: tuple[int, int], rows: int):
    """Embeddings of ``rows`` empty prompts (negative first, as the Denoiser lays them out), a
    timestep, the embedded guidance; and the FLOPs of encoding them."""
    encoded: dict[str, Any] = {}

    def encode() -> None:
        encoded["pair"] = model.encode_prompts([""], [""] if rows > 1 else None)

    with torch.no_grad():
        text = count_flops(encode)
    embeds, negative = encoded["pair"]
    if rows > 1:
        embeds = Embeddings.cat([negative, embeds] + [embeds] * (rows - 2))
    scheduler = copy.deepcopy(model.scheduler)
    model.set_timesteps(scheduler, 2, window)
    guidance = None
    if model.guidance_mode == "distilled":
        guidance = torch.full((rows,), float(model.default_guidance_scale), device=model.device)
    return embeds.to(device=model.device, dtype=model.dtype), scheduler.timesteps[0], guidance, text


def denoiser_unit(model: Any, window: tuple[int, int], rows: int, gradient: bool) -> dict[str, float]:
    """Per-row FLOPs of the denoiser on one window of ``window`` cells with ``rows`` guidance
    rows: ``denoiser.forward``, ``text.forward`` (one prompt encoded) and, with ``gradient``,
    ``denoiser.backward`` (the input gradient, as SyncDiffusion takes it). Cached."""
    key = (_identity(model), tuple(window), rows)
    shape = (1, model.latent_format.channels, *window)
    state: dict[str, Any] = {}

    def inputs():
        if "inputs" not in state:
            state["inputs"] = _denoiser_inputs(model, tuple(window), rows)
        return state["inputs"]

    def forward() -> float:
        embeds, t, guidance, _ = inputs()
        x = torch.zeros(rows, *shape[1:], device=model.device)
        with torch.no_grad():
            return count_flops(lambda: model.forward(x, t, embeds, guidance_scale=guidance, extra={}))

    def both() -> float:
        embeds, t, guidance, _ = inputs()
        x = torch.zeros(shape, device=model.device, requires_grad=True)
        with torch.enable_grad():
            return count_flops(lambda: torch.autograd.grad(
                model.forward(torch.cat([x] * rows), t, embeds, guidance_scale=guidance, extra={}).sum(), x))

    unit = {"denoiser.forward": _cached(key + ("forward",), forward) / rows,
            "text.forward": _cached(key + ("text",), lambda: inputs()[3]) / rows}
    if gradient:
        unit["denoiser.backward"] = _cached(key + ("both",), both) / rows - unit["denoiser.forward"]
    return unit


def decoder_unit(model: Any, window: tuple[int, int], gradient: bool, decode: Callable | None = None,
                 name: str = "vae") -> dict[str, float]:
    """FLOPs of ``decode`` (default: the family's VAE decode) on one window, and with
    ``gradient`` of its input gradient. Cached per model, decoder ``name`` and window."""
    decode = decode or model.decode
    shape = (1, model.latent_format.channels, *window)
    key = (_identity(model), name, tuple(window))

    def forward() -> float:
        with torch.no_grad():
            return count_flops(lambda: decode(torch.zeros(shape, device=model.device)))

    def both() -> float:
        x = torch.zeros(shape, device=model.device, requires_grad=True)
        with torch.enable_grad():
            return count_flops(lambda: torch.autograd.grad(decode(x.clone()).float().sum(), x))

    unit = {"decoder.forward": _cached(key + ("forward",), forward)}
    if gradient:
        unit["decoder.backward"] = _cached(key + ("both",), both) - unit["decoder.forward"]
    return unit


def job_flops(model: Any, window: tuple[int, int], rows: int, evaluations: Evaluations, decode_cells: int,
              prompts: int, synchronizer: Any = None) -> Flops:
    """Price a job's :class:`Evaluations` (see the module docstring). ``decode_cells``: latent
    cells through the decoder in the final decode (tiles × passes); ``prompts``: prompts
    encoded (branches × guidance rows)."""
    notes = list(evaluations.notes)
    synced = evaluations.synchronize
    unit = denoiser_unit(model, window, rows, gradient=bool(synced))
    unit.update(decoder_unit(model, window, gradient=False))
    cells = window[0] * window[1]
    decode = unit["decoder.forward"] / cells * decode_cells
    synchronize: float | None = 0.0
    if synced:
        sync_unit = dict(unit)
        extra, missing = _sync_units(model, window, synchronizer)
        sync_unit.update(extra)
        notes += missing
        unknown = [key for key in synced if key not in sync_unit]
        synchronize = None if unknown else sum(rows_ * sync_unit[key] for key, rows_ in synced.items())
        if unknown:
            notes.append(f"not priced: {', '.join(unknown)}")
    return Flops(
        denoise=evaluations.denoise.get("denoiser.forward", 0) * unit["denoiser.forward"],
        synchronize=synchronize, decode=decode, text=prompts * unit["text.forward"],
        unit={**unit, "decoder.forward_per_cell": unit["decoder.forward"] / cells}, notes=tuple(notes),
    )


def _sync_units(model: Any, window: tuple[int, int], synchronizer: Any) -> tuple[dict[str, float], list[str]]:
    """The synchronizer's own networks' prices per row (its ``price_per_row``)."""
    own = getattr(synchronizer, "price_per_row", None)
    if not callable(own):
        return {}, []
    unit, notes = own(model, window)
    return dict(unit), list(notes)


def cached_flops(key: tuple, measure: Callable[[], float]) -> float:
    """``measure()`` once per ``key`` (a window shape, a network's identity), then remembered:
    FLOPs depend on shapes, not values, so a job prices each network once."""
    return _cached(key, measure)


def format_flops(count: float | None) -> str:
    """``2.5e12`` → ``"2.50 TFLOP"``; None → ``"unknown"``."""
    if count is None:
        return "unknown"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f} FLOP"


# -- counting what runs ----------------------------------------------------------------------


class EvaluationCounter:
    """Counts the rows through named networks with forward pre-hooks: every call adds its
    batch size to ``"name.forward"``, and to ``"name.backward"`` when it runs with autograd on
    and an input that requires a gradient (a pass that will be differentiated). Use as a
    context manager; the hooks are removed on exit."""

    def __init__(self, modules: Mapping[str, torch.nn.Module]) -> None:
        self.modules = {name: module for name, module in modules.items() if isinstance(module, torch.nn.Module)}
        self.counts: dict[str, int] = {}
        self._handles: list[Any] = []

    @classmethod
    def for_model(cls, model: Any, **extra: torch.nn.Module) -> EvaluationCounter:
        """The family's denoiser and VAE decoder, and ``extra`` networks (e.g. ``perceptual``)."""
        vae = getattr(model.pipeline, "vae", None)
        return cls({"denoiser": model.denoiser_module, "decoder": getattr(vae, "decoder", vae), **extra})

    def _hook(self, name: str):
        def count(module, args, kwargs) -> None:
            tensor = _first_tensor(args, kwargs)
            if tensor is None:
                return
            rows = int(tensor.shape[0])
            self.counts[f"{name}.forward"] = self.counts.get(f"{name}.forward", 0) + rows
            if torch.is_grad_enabled() and tensor.requires_grad:
                self.counts[f"{name}.backward"] = self.counts.get(f"{name}.backward", 0) + rows

        return count

    def __enter__(self) -> EvaluationCounter:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def sorted_counts(self) -> dict[str, int]:
        return {key: self.counts[key] for key in sorted(self.counts, key=_key_order)}


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, kwargs.get("sample"), kwargs.get("hidden_states"), *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return value
    return None


# -- time per phase ------------------------------------------------------------------------


class _Phase:
    __slots__ = ("timer", "name", "start")

    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.timer.wait()
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timer.wait()
        self.timer.seconds[self.name] += time.perf_counter() - self.start


class PhaseTimer:
    """Wall time of a job and the seconds spent in each of :data:`PHASES` (not nested).
    ``synchronize``: wait for the device at every phase boundary (CUDA, MPS), so that
    asynchronous kernels are charged to the phase that launched them; without it a phase's
    GPU time lands wherever the host next waits (the engine's finite check: ``fusion``)."""

    def __init__(self, device: torch.device | str | None = None, synchronize: bool = False) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.synchronized = synchronize and device.type in ("cuda", "mps")
        self._device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.started = time.perf_counter()

    def wait(self) -> None:
        if not self.synchronized:
            return
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        else:
            torch.mps.synchronize()

    def phase(self, name: str) -> _Phase:
        """A context that adds its duration to phase ``name``."""
        return _Phase(self, name)

    def report(self) -> dict[str, Any]:
        """``{"wall_s", "seconds": {phase: s, ..., "other": s}, "synchronized"}``: ``other`` is
        the wall time outside the phases, so the seconds add up to the wall time."""
        self.wait()
        wall = time.perf_counter() - self.started
        seconds = {name: round(value, 6) for name, value in self.seconds.items()}
        seconds["other"] = round(max(0.0, wall - sum(self.seconds.values())), 6)
        return {"wall_s": round(wall, 6), "seconds": seconds, "synchronized": self.synchronized}


# -- profiling sessions --------------------------------------------------------------------


@dataclass
class Session:
    """Profiling asked for by a caller that does not build the engine itself (the CLI):
    every job run inside :func:`session` profiles; before anything is denoised its estimate
    (with FLOPs) goes to ``on_estimate(estimate, engine)`` (which may raise to stop the job),
    then, with ``count``, an :class:`EvaluationCounter` counts the denoiser's and decoder's
    rows into the profile. ``profiles``: every finished job's ``metadata["profile"]``."""

    on_estimate: Callable[[Any, Any], None] | None = None
    count: bool = True
    profiles: list[dict[str, Any]] = field(default_factory=list)
    _counter: EvaluationCounter | None = None

    def announce(self, estimate: Any, engine: Any) -> None:
        if self.on_estimate is not None:
            self.on_estimate(estimate, engine)
        if self.count:
            self.close()
            self._counter = EvaluationCounter.for_model(engine.model).__enter__()

    def finished(self, profile: dict[str, Any]) -> None:
        if self._counter is not None:
            profile["evaluations"] = self._counter.sorted_counts()
            self.close()
        self.profiles.append(profile)

    def close(self) -> None:
        """Remove the counter's hooks (a job that failed leaves none behind)."""
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None


_SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar("jointdiff_profiling", default=None)


@contextmanager
def session(on_estimate: Callable[[Any, Any], None] | None = None, count: bool = True) -> Iterator[Session]:
    """Profile every job run inside (see :class:`Session`)."""
    current = Session(on_estimate, count)
    token = _SESSION.set(current)
    try:
        yield current
    finally:
        current.close()
        _SESSION.reset(token)


def enabled(profile: bool | None) -> bool:
    """A job's ``profile`` argument: True or False as given; None follows :func:`session`."""
    return bool(profile) if profile is not None else _SESSION.get() is not None


def announce(estimate: Any, engine: Any) -> None:
    """A profiled job's estimate, before it denoises: to the session, if any."""
    current = _SESSION.get()
    if current is not None:
        current.announce(estimate, engine)


def finished(profile: dict[str, Any]) -> None:
    """A profiled job's ``metadata["profile"]``: to the session, if any (which adds the rows
    it counted)."""
    current = _SESSION.get()
    if current is not None:
        current.finished(profile)


def format_profile(profile: Mapping[str, Any]) -> str:
    """Lines for people from ``result.metadata["profile"]``: time per phase, model rows
    estimated and measured, and FLOP/s over the model phases when the FLOPs are known."""
    wall = profile["wall_s"]
    parts = [f"{name} {seconds:.2f} s ({100 * seconds / wall if wall else 0:.0f}%)" for name, seconds in profile["seconds"].items()]
    lines = [f"time: {wall:.2f} s wall" + ("" if profile.get("synchronized") else " (device not synchronized)")
             + ": " + ", ".join(parts)]
    measured = profile.get("evaluations")
    estimate = profile.get("estimate") or {}
    expected = (estimate.get("evaluations") or {})
    if measured is not None:
        total = Evaluations(**{k: expected[k] for k in ("denoise", "synchronize", "decode")}).total() if expected else {}
        hooked = {key.split(".")[0] for key in measured} | {"denoiser", "decoder"}
        keys = sorted(set(total) | set(measured), key=_key_order)
        rows = [f"{key.replace('.', ' ')} {total.get(key, '?')} → {measured.get(key, 0) if key.split('.')[0] in hooked else '(not hooked)'}"
                for key in keys]
        lines.append("model evaluations, rows (estimated → measured): " + "; ".join(rows))
    flops = estimate.get("flops")
    busy = profile["seconds"]["model"] + profile["seconds"]["synchronization"]
    if flops and flops.get("synchronize") is not None and busy > 0:
        done = flops["denoise"] + flops["synchronize"]
        lines.append(f"throughput: {format_flops(done / busy)}/s over model and synchronization time "
                     f"({format_flops(done)} estimated)")
    return "\n".join(lines)

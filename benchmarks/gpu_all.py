"""Every GPU measurement of jointdiff in one prepared call (one H200, at most 8 minutes, offline).

Full-size architectures from the real configs in ``benchmarks/configs/``, random weights,
bfloat16, fixed seeds; each timed run follows an untimed one-step warm-up, is timed with CUDA
events between ``torch.cuda.synchronize`` calls, and reports ``torch.cuda.max_memory_allocated``
(reset before the run). Cases, run in the order 1, 3, 4, 2 (2 fills the time left):

1. MultiDiffusion (Bar-Tal et al. 2023), SD 2-base 512×3072 px, stride 8, 50 DDIM steps, CFG
   7.5: jointdiff vs diffusers' ``StableDiffusionPanoramaPipeline`` on the same components,
   the largest difference of their final latents; then jointdiff with ``view_batch_size="auto"``.
2. Exact SyncDiffusion (Lee et al. 2023): ``syncdiffusion`` (VAE decoder, LPIPS ``vgg`` with a
   random backbone: its ImageNet weights are not available offline), stride 16, beside no
   synchronization; the steps are cut to what fits the time left, and the report says so.
3. Shifted windows (``windows="shifted"``) at case 1's settings, if this jointdiff has them.
4. FLUX.1-dev-sized transformer (``configs/flux1-dev``), 1024×4096 px, window 128, stride 32,
   4 steps; random text ``Embeddings`` of FLUX's shapes from a conditioner defined here (no
   text encoder); and the stock ``FluxPipeline`` on one 1024×1024 window.

Past ``--budget-s`` (450 s from the start, imports included) cases are skipped and a running
one stops at its step's end ("aborted"). ``results.json``, ``results.md`` and ``gpu_all.log``
go to ``--out`` (default ``$OUT``) after every case. ``--smoke``: every case on the CPU,
float32, tiny models, small canvases, 2 steps. How to run it: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import inspect
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

START = time.monotonic()  # the budget counts the imports that follow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "benchmarks", ROOT / "plugins", ROOT):  # runs uninstalled (the GPU machine)
    sys.path.insert(0, str(_path))

import torch  # noqa: E402

FLUX_CONFIGS = ROOT / "benchmarks" / "configs" / "flux1-dev"
PROMPT = "a photo of the dolomites"
SD_GUIDANCE, FLUX_GUIDANCE = 7.5, 3.5
# Largest |jointdiff − diffusers| final-latent difference accepted, relative to max |latent| (in
# half precision diffusers keeps its canvas in that dtype between steps, jointdiff in float32).
LATENT_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}

FULL = SimpleNamespace(
    dtype="bfloat16", sd_model="sd2-base",
    md=SimpleNamespace(width_px=3072, stride=8, steps=50, view_batch=8),
    sync=SimpleNamespace(width_px=3072, window=64, stride=16, steps=50, view_batch=8),
    flux=SimpleNamespace(width_px=4096, window=128, stride=32, steps=4, view_batch=4, text_len=512),
)
SMOKE = SimpleNamespace(
    dtype="float32", sd_model="tiny",
    # diffusers' panorama pipeline has a fixed 64-cell window: case 1 needs a 512 px high canvas.
    md=SimpleNamespace(width_px=768, stride=16, steps=2, view_batch=4),
    sync=SimpleNamespace(width_px=256, window=8, stride=4, steps=2, view_batch=4),
    flux=SimpleNamespace(width_px=256, window=8, stride=4, steps=2, view_batch=4, text_len=16),
)


class OverBudget(Exception):
    """Raised from a step callback once a run passes the time budget."""


class Skip(Exception):
    """A case that cannot run here (the reason is its message)."""


class Clock:
    """Time since the script's start, the budget, and the log (stdout and ``gpu_all.log``)."""

    def __init__(self, budget_s: float, log_path: Path) -> None:
        self.budget_s, self.log_path = budget_s, log_path

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - START)

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - START:6.1f} s | {datetime.datetime.now():%H:%M:%S}] {message}"
        print(line, flush=True)
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def guard(self, *_: Any) -> None:
        """jointdiff's step-end callback: stop past the budget (diffusers': :meth:`diffusers_guard`)."""
        if self.remaining() <= 0:
            raise OverBudget(f"stopped mid-run: past the time budget of {self.budget_s:.0f} s")

    def diffusers_guard(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        self.guard()
        return {}


class Bench:
    """What every case reads: options, settings, device, dtype, the clock, the SD pipeline."""

    def __init__(self, args: argparse.Namespace, settings: SimpleNamespace, clock: Clock) -> None:
        self.args, self.settings, self.clock = args, settings, clock
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.dtype = getattr(torch, settings.dtype)
        self._sd: Any = None

    def sd_pipeline(self) -> Any:
        """The Stable Diffusion pipeline of cases 1–3, built once by bench_core (seed 0)."""
        if self._sd is None:
            import bench_core

            self.clock.log(f"building {self.settings.sd_model} ({self.settings.dtype}, {self.device})")
            torch.manual_seed(0)
            self._sd = bench_core.build_pipeline(self.settings.sd_model, self.device, self.dtype)
            self._sd.set_progress_bar_config(disable=True)
            self.clock.log(f"built: {gib(weight_bytes(self._sd))} of weights")
        return self._sd

    def measure(self, run: Callable[[], Any]) -> dict:
        """``run()``'s value, seconds (CUDA events on CUDA), peak allocated bytes and the bytes
        allocated before it (the resident weights and tensors)."""
        if self.device.type != "cuda":
            start = time.perf_counter()
            return {"value": run(), "seconds": time.perf_counter() - start, "peak": None, "resident": None}
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        resident = torch.cuda.memory_allocated(self.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        value = run()
        end.record()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return {"value": value, "seconds": begin.elapsed_time(end) / 1000, "peak": peak, "resident": resident}

    def timed_row(self, case: dict, name: str, run: Callable[[int], Any], steps: int, canvas: str,
                  windows: int | str, notes: str, warmup: bool = True) -> Any:
        """Warm up ``run`` one step, time ``run(steps)``, add the row to ``case``; its value."""
        if warmup:
            run(1)
        measured = self.measure(lambda: run(steps))
        case["rows"].append(row(name, canvas, windows, steps, measured, notes))
        self.clock.log(f"case {case['case']}: {name}: {steps} steps {measured['seconds']:.2f} s, "
                       f"peak {gib(measured['peak'])}")
        return measured["value"]


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def weight_bytes(pipeline: Any) -> int:
    modules = [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def row(name: str, canvas: str, windows: int | str, steps: int, measured: dict, notes: str) -> dict:
    """A table row: seconds, per step, peak memory and its growth over the resident memory."""
    peak, resident = measured["peak"], measured["resident"]
    growth = None if peak is None else peak - resident
    in_gib = lambda value: None if value is None else value / 2**30  # noqa: E731
    return {"implementation": name, "canvas_px": canvas, "windows": windows, "steps": steps,
            "seconds": measured["seconds"], "s_per_step": measured["seconds"] / steps, "peak_gib": in_gib(peak),
            "resident_gib": in_gib(resident), "peak_over_resident_gib": in_gib(growth), "notes": notes}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside are created in ``dtype`` (no float32 copy of 12 B parameters first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def ensure_plugins(clock: Clock) -> None:
    """Register the built-in plugins listed in ``pyproject.toml`` when jointdiff is not
    installed (no entry points: a bare copy of the repository on the GPU machine)."""
    import tomllib

    from jointdiff.core.registry import get_registry, register_plugin

    if "strip" in get_registry().entries["geometry"]:
        return
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["jointdiff"]
    for name, module in table.items():
        try:
            register_plugin(importlib.import_module(module), name)
        except Exception as error:  # a plugin this benchmark does not use may lack a package
            clock.log(f"plugin {name!r} not registered: {type(error).__name__}: {error}")


def jointdiff_job(model: Any, geometry: dict, conditioner: Any, synchronizer: Any, view_batch: int | str, **kw: Any):
    """A ``JointDiffusion`` job on a horizontal ``strip`` with one conditioner (None: ``text``
    with the SD prompt and classifier-free guidance 7.5)."""
    from jointdiff import JointDiffusion
    from jointdiff.core.registry import create

    strip = create("geometry", "strip", **geometry)
    if conditioner is None:
        conditioner = create("conditioner", "text", prompt=PROMPT, guidance_scale=SD_GUIDANCE)
    return JointDiffusion(model, strip, [conditioner], synchronizer, view_batch_size=view_batch, **kw)


def runner(job: Any, clock: Clock, latents: torch.Tensor | None = None) -> Callable[[int], torch.Tensor]:
    """``run(steps)`` → the job's final canvas latents (float32, CPU); stops past the budget."""

    def run(steps: int) -> torch.Tensor:
        result = job(num_inference_steps=steps, seed=0, latents=latents, progress=False, output_type="latent",
                     callback_on_step_end=clock.guard)
        return result.latents.float().cpu()

    return run


def case_multidiffusion(bench: Bench, case: dict) -> None:
    """jointdiff vs StableDiffusionPanoramaPipeline at equal settings, the latent difference,
    then jointdiff with ``view_batch_size="auto"`` when the engine has it and time allows."""
    import bench_core

    s, pipe = bench.settings.md, bench.sd_pipeline()
    ours, theirs = bench_core.window_layouts(s.width_px, s.stride)
    if ours != theirs:
        raise RuntimeError(f"window layouts differ: jointdiff {len(ours)}, diffusers {len(theirs)} windows")
    height_px = 64 * pipe.vae_scale_factor
    canvas, notes = f"{height_px}×{s.width_px}", f"stride {s.stride}, view batch {s.view_batch}"
    geometry = {"length_px": s.width_px, "window_latent": 64, "stride_latent": s.stride}
    pano = bench_core.panorama_pipeline(pipe, s.stride)
    shape = (1, pipe.unet.config.in_channels, height_px // 8, s.width_px // 8)
    # diffusers keeps its latents in the model dtype: both start from the same rounded noise.
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(bench.dtype).float()

    def diffusers(steps: int) -> torch.Tensor:
        return pano(PROMPT, height=height_px, width=s.width_px, num_inference_steps=steps, guidance_scale=SD_GUIDANCE,
                    view_batch_size=s.view_batch, latents=noise.to(bench.device, bench.dtype), output_type="latent",
                    callback_on_step_end=bench.clock.diffusers_guard).images.float().cpu()

    job = jointdiff_job(pipe, geometry, None, None, s.view_batch)
    ours_latents = bench.timed_row(case, "jointdiff", runner(job, bench.clock, noise), s.steps, canvas, len(ours),
                                   notes)
    theirs_latents = bench.timed_row(case, "diffusers StableDiffusionPanoramaPipeline", diffusers, s.steps, canvas,
                                     len(ours), notes)
    case["checks"].update(latent_check(ours_latents, theirs_latents, bench.settings.dtype))
    if bench.clock.remaining() < 240:
        bench.clock.log("case 1: under 4 minutes left, no view_batch_size='auto' run")
        return
    try:
        auto = jointdiff_job(pipe, geometry, None, None, "auto")
    except Exception as error:  # an engine without "auto"
        bench.clock.log(f"case 1: no view_batch_size='auto' run ({type(error).__name__}: {error})")
        return
    latents = bench.timed_row(case, "jointdiff, view_batch_size='auto'", runner(auto, bench.clock, noise), s.steps,
                              canvas, len(ours), f"stride {s.stride}, window batches sized from free memory")
    case["checks"]["auto_batch_max_abs_diff_vs_jointdiff"] = float((latents - ours_latents).abs().max())


def latent_check(ours: torch.Tensor, theirs: torch.Tensor, dtype: str) -> dict:
    """Largest |ours − theirs|, relative to max |theirs|, against :data:`LATENT_TOLERANCE`."""
    diff, scale = float((ours - theirs).abs().max()), float(theirs.abs().max())
    relative = diff / max(scale, 1e-12)
    return {"max_abs_latent_diff": diff, "max_abs_latent": scale, "relative_diff": relative,
            "relative_tolerance": LATENT_TOLERANCE[dtype], "within_tolerance": relative <= LATENT_TOLERANCE[dtype]}


def shifted_knob() -> tuple[str, str, Any] | None:
    """Where this jointdiff turns shifted windows on, as ``(where, option, value)``: an option
    of ``JointDiffusion`` or of the ``strip`` geometry that takes the choice "shifted" (or a
    bool option named "*shift*", set True); None when there is none."""
    from jointdiff import JointDiffusion, engine
    from jointdiff.core.registry import get_registry

    found = [("engine", name, resolved(p.annotation, vars(engine)))
             for name, p in inspect.signature(JointDiffusion.__init__).parameters.items()]
    strip = get_registry().get("geometry", "strip")
    found += [("geometry", name, field.annotation) for name, field in strip.Options.model_fields.items()]
    for where, name, annotation in found:
        if "shifted" in typing.get_args(annotation):
            return where, name, "shifted"
        if "shift" in name and (annotation is bool or str(annotation) in ("bool", "bool | None")):
            return where, name, True
        if "shift" in name:
            raise RuntimeError(f"found {where} option {name!r} ({annotation}) but not how to turn shifted windows on")
    return None


def resolved(annotation: Any, namespace: dict) -> Any:
    """A string annotation evaluated in its module (the string when it names a type-checking-only import)."""
    try:
        return eval(annotation, dict(namespace)) if isinstance(annotation, str) else annotation  # noqa: S307
    except Exception:
        return annotation


def case_shifted(bench: Bench, case: dict, multidiffusion: dict | None) -> None:
    """jointdiff with shifted windows at case 1's canvas, steps and batching."""
    knob = shifted_knob()
    if knob is None:
        module = "exists" if importlib.util.find_spec("jointdiff.engine.shifted") else "absent"
        raise Skip("shifted windows not found in this jointdiff (no option of JointDiffusion or of the strip "
                   f"geometry takes 'shifted' or is named '*shift*'; jointdiff/engine/shifted.py {module})")
    where, option, value = knob
    s, pipe = bench.settings.md, bench.sd_pipeline()
    geometry = {"length_px": s.width_px, "window_latent": 64, "stride_latent": s.stride}
    geometry.update({option: value} if where == "geometry" else {})
    job = jointdiff_job(pipe, geometry, None, None, s.view_batch, **({option: value} if where == "engine" else {}))
    tiles = -(-s.width_px // (64 * pipe.vae_scale_factor))  # non-overlapping windows along the strip
    notes = f"{where} option {option}={value!r}: non-overlapping 64-cell windows, a new random shift every step"
    bench.timed_row(case, "jointdiff, shifted windows", runner(job, bench.clock), s.steps,
                    f"{64 * pipe.vae_scale_factor}×{s.width_px}", f"{tiles}–{tiles + 1} per step", notes)
    if multidiffusion and multidiffusion["rows"]:  # its first row: jointdiff at the same view batch
        reference = multidiffusion["rows"][0]["seconds"]
        case["checks"]["speedup_vs_case_1_jointdiff"] = reference / case["rows"][0]["seconds"]


def case_syncdiffusion(bench: Bench, case: dict) -> None:
    """Exact SyncDiffusion beside no synchronization, as many steps (≤ asked) as fit the time."""
    from jointdiff.core.registry import create

    s, pipe = bench.settings.sync, bench.sd_pipeline()
    geometry = {"length_px": s.width_px, "window_latent": s.window, "stride_latent": s.stride}
    autocast = "bfloat16" if bench.device.type == "cuda" and bench.dtype == torch.bfloat16 else "none"
    sync = create("synchronizer", "syncdiffusion", lpips_random_backbone=True, net="vgg", autocast=autocast)
    synced = runner(jointdiff_job(pipe, geometry, None, sync, s.view_batch), bench.clock)
    plain = runner(jointdiff_job(pipe, geometry, None, None, s.view_batch), bench.clock)
    synced(1)  # warm-ups: kernels, LPIPS, the synchronizer's micro-batch sizing
    plain(1)
    one_step = bench.measure(lambda: synced(1))["seconds"] + bench.measure(lambda: plain(1))["seconds"]
    margin = 10.0 if bench.device.type == "cuda" else 0.0
    steps = min(s.steps, int((bench.clock.remaining() - margin) // one_step))
    bench.clock.log(f"case 2: one step of both runs {one_step:.2f} s; {steps} of {s.steps} steps fit")
    if steps < 1:
        raise Skip(f"not one step of both runs ({one_step:.1f} s) fits the {bench.clock.remaining():.0f} s left")
    canvas = f"{s.window * pipe.vae_scale_factor}×{s.width_px}"
    windows = (s.width_px // pipe.vae_scale_factor - s.window) // s.stride + 1
    notes = f"stride {s.stride}, view batch {s.view_batch}, autocast {autocast}"
    notes += f"; {steps} of {s.steps} steps (cut to fit the time budget)" if steps < s.steps else ""
    for name, run in (("jointdiff, no synchronization", plain), ("jointdiff + syncdiffusion (exact)", synced)):
        bench.timed_row(case, name, run, steps, canvas, windows, notes, warmup=False)  # warmed up above
    seconds = [r["seconds"] for r in case["rows"]]
    case["checks"].update(steps_asked=s.steps, steps_run=steps, sync_cost_ratio=seconds[1] / seconds[0],
                          sync_s_per_step=seconds[1] / steps, sync_50_steps_s_extrapolated=seconds[1] / steps * 50,
                          micro_batch=getattr(sync, "_auto_micro", None))


def flux_embeddings(config: Any, length: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Random FLUX text conditioning from a fixed key: T5 ``prompt_embeds`` ``(1, length,
    joint_attention_dim)`` and CLIP ``pooled_prompt_embeds`` ``(1, pooled_projection_dim)``."""
    from jointdiff.core.context import keyed_generator

    generator = keyed_generator(0, "gpu_all.flux_embeddings")
    embeds = torch.randn(1, length, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    return {"prompt_embeds": embeds.to(device, dtype), "pooled_prompt_embeds": pooled.to(device, dtype)}


def random_embeddings(length: int) -> Any:
    """A conditioner (local to this benchmark, no plugin) whose prompt is :func:`flux_embeddings`
    with FLUX.1-dev's embedded guidance 3.5: no text encoder is needed."""
    from jointdiff.core.conditioner import Conditioner, Prompt
    from jointdiff.core.family import Embeddings

    class RandomEmbeddings(Conditioner):
        name = "random_embeddings"

        def setup(self, context) -> None:
            tensors = flux_embeddings(context.model.pipeline.transformer.config, length, context.device, context.dtype)
            self._prompt = Prompt(Embeddings(tensors), None, FLUX_GUIDANCE)

        def prompt(self) -> Prompt:
            return self._prompt

    return RandomEmbeddings()


def build_flux(bench: Bench) -> Any:
    """A ``FluxPipeline`` without text encoders or tokenizers: FLUX.1-dev's transformer and VAE
    (``benchmarks/configs/flux1-dev``; smoke: jointdiff's tiny FLUX configs) with random
    weights made on the device in the benchmark dtype, and FLUX.1-dev's scheduler config."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if bench.args.smoke:
        from jointdiff.models.families import flux

        transformer_config, vae_config = dict(flux.tiny_transformer().config), dict(flux.tiny_vae().config)
    else:
        transformer_config = FluxTransformer2DModel.load_config(FLUX_CONFIGS / "transformer")
        vae_config = AutoencoderKL.load_config(FLUX_CONFIGS / "vae")
    scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(FLUX_CONFIGS / "scheduler")
    torch.manual_seed(0)
    with torch.device(bench.device), default_dtype(bench.dtype):
        transformer = FluxTransformer2DModel.from_config(transformer_config).eval()
        vae = AutoencoderKL.from_config(vae_config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def case_flux(bench: Bench, case: dict) -> None:
    """The FLUX.1-dev-sized strip (seconds per step, peak memory), then the stock pipeline on
    one window with the same embeddings (the model is freed when the case returns)."""
    from jointdiff.models.loading import load_model

    s = bench.settings.flux
    pipe = build_flux(bench)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    case["checks"].update(transformer_parameters=params, weights_gib=weight_bytes(pipe) / 2**30)
    bench.clock.log(f"case 4: built: transformer {params / 1e9:.2f} B parameters, {gib(weight_bytes(pipe))} of weights")
    model = load_model(pipe, device=bench.device, dtype=bench.dtype)
    window_px = s.window * model.latent_format.scale_factor
    geometry = {"length_px": s.width_px, "window_latent": s.window, "stride_latent": s.stride}
    job = jointdiff_job(model, geometry, random_embeddings(s.text_len), None, s.view_batch, check_finite=False)
    windows = (s.width_px // model.latent_format.scale_factor - s.window) // s.stride + 1
    notes = f"stride {s.stride}, view batch {s.view_batch}, {s.text_len} text tokens"
    latents = bench.timed_row(case, "jointdiff (flux family)", runner(job, bench.clock), s.steps,
                              f"{window_px}×{s.width_px}", windows, notes)
    case["checks"]["latents_finite"] = bool(torch.isfinite(latents).all())
    embeds = flux_embeddings(pipe.transformer.config, s.text_len, bench.device, bench.dtype)

    def stock(steps: int) -> torch.Tensor:
        return pipe(**embeds, height=window_px, width=window_px, num_inference_steps=steps,
                    guidance_scale=FLUX_GUIDANCE, generator=torch.Generator("cpu").manual_seed(0),
                    output_type="latent", max_sequence_length=s.text_len,
                    callback_on_step_end=bench.clock.diffusers_guard).images

    bench.timed_row(case, "diffusers FluxPipeline, one window", stock, s.steps, f"{window_px}×{window_px}", 1,
                    "prompt_embeds given, no text encoders")
    per_window_step = case["rows"][0]["s_per_step"] / windows
    case["checks"].update(jointdiff_s_per_window_step=per_window_step,
                          per_window_step_over_stock_step=per_window_step / case["rows"][1]["s_per_step"])


CASES = {
    "1": "MultiDiffusion, SD 2-base: jointdiff vs diffusers panorama",
    "2": "Exact SyncDiffusion (SD 2-base)",
    "3": "Shifted windows (SD 2-base)",
    "4": "FLUX.1-dev-sized transformer strip",
}


def run_case(bench: Bench, key: str, function: Callable[[dict], None]) -> dict:
    """One case and its status: ok, skipped (time budget, unsupported), aborted or error;
    rows measured before an abort or error are kept."""
    case = {"case": key, "title": CASES[key], "status": "ok", "reason": None, "rows": [], "checks": {}}
    if bench.clock.remaining() <= 0:
        case.update(status="skipped", reason=f"past the time budget ({bench.clock.budget_s:.0f} s) before it started")
        bench.clock.log(f"case {key}: skipped, past the time budget")
        return case
    bench.clock.log(f"case {key}: {CASES[key]}")
    started = time.monotonic()
    try:
        function(case)
    except Skip as skip:
        case.update(status="skipped", reason=str(skip))
    except OverBudget as stop:
        case.update(status="aborted", reason=str(stop))
    except Exception as error:  # one broken case must not lose the others
        case.update(status="error", reason=f"{type(error).__name__}: {error}".splitlines()[0])
        case["traceback"] = traceback.format_exc()
        bench.clock.log(case["traceback"])
    gc.collect()  # the case's models are gone with its frame: give their memory back
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    case["case_seconds"] = time.monotonic() - started
    bench.clock.log(f"case {key}: {case['status']}{': ' + case['reason'] if case['reason'] else ''} "
                    f"({case['case_seconds']:.1f} s)")
    return case


def revision() -> str:
    """The repository's commit, with "+changes" when the working tree differs from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        changes = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (head.stdout.strip() or "unknown") + ("+changes" if changes.stdout.strip() else "")


def environment(bench: Bench) -> dict:
    import diffusers
    import transformers

    device = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else platform.processor() or "cpu"
    settings = {k: vars(v) if isinstance(v, SimpleNamespace) else v for k, v in vars(bench.settings).items()}
    return {
        "device": device, "device_type": bench.device.type, "dtype": bench.settings.dtype, "smoke": bench.args.smoke,
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "jointdiff_revision": revision(),
        "command": "python " + shlex.join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "budget_s": bench.clock.budget_s, "settings": settings,
    }


def markdown(report: dict) -> str:
    """The environment, one table row per measured run (or per case that did not run), checks."""
    env = report["environment"]
    smoke = " — SMOKE RUN (CPU, tiny models, not a benchmark)" if env["smoke"] else ""
    lines = [
        f"- device: {env['device']} ({env['device_type']}, {env['dtype']}){smoke}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), diffusers {env['diffusers']}, transformers "
        f"{env['transformers']}, Python {env['python']}, jointdiff {env['jointdiff_revision']}",
        f"- command: `{env['command']}`; {env['date']}; {report['total_seconds']:.0f} s "
        f"of a {env['budget_s']:.0f} s budget",
        "- random weights: these numbers are cost (time, memory), nothing about image quality",
        "",
        "| # | case | implementation | canvas px | windows | steps | seconds | s/step | peak GiB "
        "| peak over resident GiB | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    number = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for case in report["cases"]:
        status = f"**{case['status']}**: {case['reason']}" if case["status"] != "ok" else ""
        if not case["rows"]:
            lines.append(f"| {case['case']} | {case['title']} | — | | | | | | | | {status} |")
        for r in case["rows"]:
            notes = "; ".join(x for x in (r["notes"], status) if x)
            lines.append(f"| {case['case']} | {case['title']} | {r['implementation']} | {r['canvas_px']} "
                         f"| {r['windows']} "
                         f"| {r['steps']} | {r['seconds']:.2f} | {r['s_per_step']:.3f} | {number(r['peak_gib'])} "
                         f"| {number(r['peak_over_resident_gib'])} | {notes} |")
    for case in report["cases"]:
        if case["checks"]:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in case["checks"].items())
            lines += ["", f"Case {case['case']} checks: {shown}"]
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict) -> None:
    report["total_seconds"] = time.monotonic() - START
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(report))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-bench-out"),
                        help="folder for results.json, results.md, gpu_all.log (default: $OUT, else ./gpu-bench-out)")
    parser.add_argument("--smoke", action="store_true", help="every case on the CPU with tiny models (a check)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip cases / stop runs past this (default 450)")
    parser.add_argument("--cases", default="1,3,4,2", help="cases to run, in this order (default 1,3,4,2)")
    parser.add_argument("--sync-steps", type=int, help="case 2: steps asked for (default 50, smoke 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown case(s) {unknown}; the cases are {sorted(CASES)}")
    if args.sync_steps is not None and args.sync_steps < 1:
        parser.error(f"--sync-steps must be >= 1, got {args.sync_steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_all.py: CUDA is not available here; --smoke runs every case on the CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    settings = SMOKE if args.smoke else FULL
    if args.sync_steps:
        settings.sync.steps = args.sync_steps
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args, settings, Clock(args.budget_s, args.out / "gpu_all.log"))
    ensure_plugins(bench.clock)
    report = {"environment": environment(bench), "cases": []}
    bench.clock.log(f"start: {report['environment']['device']}, {settings.dtype}, budget {args.budget_s:.0f} s")
    done: dict[str, dict] = {}
    functions = {"1": lambda case: case_multidiffusion(bench, case), "2": lambda case: case_syncdiffusion(bench, case),
                 "3": lambda case: case_shifted(bench, case, done.get("1")), "4": lambda case: case_flux(bench, case)}
    for key in args.cases.split(","):
        done[key] = run_case(bench, key, functions[key])
        report["cases"].append(done[key])
        write(args.out, report)
    bench.clock.log(f"done in {time.monotonic() - START:.1f} s; results in {args.out}")
    print(markdown(report), flush=True)
    return 0 if all(case["status"] in ("ok", "skipped") for case in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())

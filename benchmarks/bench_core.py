"""Benchmark: jointdiff's core engine versus diffusers' ``StableDiffusionPanoramaPipeline``.

Both run MultiDiffusion (Bar-Tal et al. 2023, Eq. 5) on a horizontal strip at equal settings:
the same UNet, VAE, text encoder, tokenizer and DDIM scheduler objects, the same number of
steps, window (64 latent cells), stride, window batching (``view_batch_size``), guidance scale
(7.5), prompt and initial latents. jointdiff runs with the ``none`` synchronizer.

What is timed: one call of each pipeline with ``output_type="latent"``: prompt encoding plus
the whole denoising loop, *no* VAE decode on either side. Repetitions are interleaved in ABBA
order (jointdiff, diffusers, diffusers, jointdiff, ...) and medians are reported; on the CPU
also the process's CPU time and the time spent outside the UNet, which a busy shared machine
disturbs less than wall time. The final latents of the two
are compared (max abs difference) and the window layouts are checked to be identical.

Modes:

- ``--model tiny`` (default): the built-in tiny model (random weights) on the CPU;
- ``--model sd2-base``: the full-size SD 2-base architectures with random weights, built from
  ``benchmarks/configs/sd21`` (UNet ``sample_size`` 64, ε-prediction), fp16 on CUDA.

Random weights say nothing about image quality; the full-size runs measure the speed and memory
of the real architecture. Everything is offline.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` around each timed run (the weights
included); on the CPU the peak resident set size (``VmHWM``, the kernel's max RSS) of separate
subprocesses that each build the model, reset the high-water mark, and run one pipeline for
``--memory-steps`` steps (the peak does not grow with steps); the growth over the RSS before the
run is the pipeline's working memory.

    python benchmarks/bench_core.py --model tiny
    python benchmarks/bench_core.py --model sd2-base --json sd2.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd21"
PROMPT = "a photo of the dolomites"
GUIDANCE_SCALE = 7.5
IMPLEMENTATIONS = ("jointdiff", "diffusers")
MODES: dict[str, dict[str, Any]] = {
    "tiny": {
        "device": "cpu",
        "dtype": "float32",
        "width_px": 2048,
        "steps": 10,
        "strides": [8],
        "view_batch_sizes": [4, 8],
        "repeats": 3,
    },
    "sd2-base": {
        "device": "cuda",
        "dtype": "float16",
        "width_px": 3072,
        "steps": 50,
        "strides": [8, 16],
        "view_batch_sizes": [8],
        "repeats": 3,
    },
}


# ---------------------------------------------------------------------------- models


def build_sd2_base(device: torch.device) -> Any:
    """SD 2-base (SD 2.1's architectures, 64-cell latent window, ε-prediction), random weights.

    Weights are initialised directly on ``device`` (fast on a GPU) from a fixed seed.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from jointdiff.models.tiny import tokenizer

    unet_config = dict(UNet2DConditionModel.load_config(CONFIG_DIR / "unet"), sample_size=64)
    scheduler = DDIMScheduler.from_config(
        DDIMScheduler.load_config(CONFIG_DIR / "scheduler"), prediction_type="epsilon"
    )
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(CONFIG_DIR / "text_encoder" / "config.json"))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer(),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_pipeline(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The Stable Diffusion pipeline both implementations share, on ``device`` in ``dtype``."""
    from jointdiff.models.loading import load_pipeline

    if model == "tiny":
        return load_pipeline("tiny", device=device, dtype=dtype)
    return load_pipeline(build_sd2_base(device), device=device, dtype=dtype)


def stub_unet(unet: torch.nn.Module) -> None:
    """Replace the UNet's forward by a cheap per-sample stand-in (``0.1 · sample``) so that a run
    times only what the two pipelines do *around* the model (``--stub-unet``)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    def forward(sample, timestep, encoder_hidden_states, *args: Any, return_dict: bool = True, **kwargs: Any):
        out = sample[:, : unet.config.out_channels] * 0.1
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    unet.forward = forward


def panorama_pipeline(pipeline: Any, stride: int) -> Any:
    """diffusers' panorama pipeline over the *same* component objects.

    Its ``__call__`` always asks ``get_views`` for stride 8; the stride is bound here so that
    other strides can be compared too (the window stays its hard-coded 64 latent cells).
    """
    from diffusers import StableDiffusionPanoramaPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the class is deprecated and says so on every build
    pano = StableDiffusionPanoramaPipeline(
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        unet=pipeline.unet,
        scheduler=pipeline.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pano.set_progress_bar_config(disable=True)
    pano.get_views = functools.partial(StableDiffusionPanoramaPipeline.get_views, pano, stride=stride)
    return pano


def jointdiff_job(pipeline: Any, width_px: int, stride: int, view_batch_size: int) -> Any:
    """The jointdiff job: horizontal ``strip``, ``text`` conditioner, ``none`` synchronizer."""
    from jointdiff import JointDiffusion
    from jointdiff.core.registry import create

    geometry = create("geometry", "strip", length_px=width_px, window_latent=64, stride_latent=stride)
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=GUIDANCE_SCALE)
    synchronizer = create("synchronizer", "none")
    return JointDiffusion(pipeline, geometry, [text], synchronizer, view_batch_size=view_batch_size)


def window_layouts(width_px: int, stride: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """``(h_start, h_end, w_start, w_end)`` latent windows of a 512 px high strip: jointdiff's
    and diffusers'. No model is needed (VAE factor 8, as diffusers hard-codes)."""
    from diffusers import StableDiffusionPanoramaPipeline

    from jointdiff.core.registry import create

    geometry = create("geometry", "strip", length_px=width_px, window_latent=64, stride_latent=stride)
    geometry.setup(8)
    win_h, win_w = geometry.window_size_latent
    ours = [(top, top + win_h, left, left + win_w) for top, left in geometry.origins]
    # get_views never reads the pipeline's state.
    theirs = StableDiffusionPanoramaPipeline.get_views(None, 512, width_px, stride=stride)
    return ours, [tuple(view) for view in theirs]


def check_same_windows(width_px: int, strides: list[int]) -> None:
    """Both must denoise exactly the same windows: fail before any model is built if not.

    diffusers drops the last partial window when the stride does not divide
    ``width_px / 8 - 64``, where jointdiff adds one flush with the edge."""
    for stride in strides:
        ours, theirs = window_layouts(width_px, stride)
        if ours != theirs:
            raise SystemExit(
                f"--width-px {width_px} with stride {stride}: jointdiff has {len(ours)} windows, "
                f"diffusers {len(theirs)}; pick a width where width_px / 8 - 64 is a multiple of the stride"
            )


# ---------------------------------------------------------------------------- runners


def make_runners(
    pipeline: Any, width_px: int, stride: int, view_batch_size: int, dtype: torch.dtype
) -> tuple[dict[str, Callable[[int], torch.Tensor]], int]:
    """``{name: run(steps) -> final latents (1, 4, H, W) float32 on the CPU}`` and the number
    of windows. Both start from the same noise (seed 0)."""
    height_px = 64 * pipeline.vae_scale_factor
    job = jointdiff_job(pipeline, width_px, stride, view_batch_size)
    pano = panorama_pipeline(pipeline, stride)
    windows = len(window_layouts(width_px, stride)[0])
    shape = (1, pipeline.unet.config.in_channels, height_px // 8, width_px // 8)
    # diffusers keeps its latents in the UNet's dtype: start both from the same rounded noise.
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype).float()
    device = pipeline.unet.device

    def run_jointdiff(steps: int) -> torch.Tensor:
        result = job(num_inference_steps=steps, latents=noise, progress=False, output_type="latent")
        return result.latents.float().cpu()

    def run_diffusers(steps: int) -> torch.Tensor:
        output = pano(
            PROMPT,
            height=height_px,
            width=width_px,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            view_batch_size=view_batch_size,
            latents=noise.to(device, dtype),
            output_type="latent",
        )
        return output.images.float().cpu()

    return {"jointdiff": run_jointdiff, "diffusers": run_diffusers}, windows


class UNetClock:
    """Accumulates wall time spent inside ``unet.forward`` (CPU only: no device syncs)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        unet.register_forward_pre_hook(self._enter)
        unet.register_forward_hook(self._exit)

    def _enter(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _exit(self, *_: Any) -> None:
        self.total += time.perf_counter() - self._start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(run: Callable[[int], torch.Tensor], steps: int, device: torch.device, clock: UNetClock | None) -> dict:
    """One run: wall seconds, CPU seconds of this process (all threads), seconds inside the UNet
    (CPU), peak and pre-run allocated bytes (CUDA), and the final latents."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    allocated = torch.cuda.memory_allocated(device) if cuda else None
    unet_before = clock.total if clock else 0.0
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    latents = run(steps)
    synchronize(device)
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "unet_seconds": clock.total - unet_before if clock else None,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "allocated_before_bytes": allocated,
        "latents": latents,
    }


# ---------------------------------------------------------------------------- one configuration


def bench_config(args: argparse.Namespace, pipeline: Any, stride: int, view_batch_size: int, clock) -> dict:
    """Interleaved timed repetitions of both implementations at one stride and batching."""
    device, dtype = pipeline.unet.device, pipeline.unet.dtype
    runners, windows = make_runners(pipeline, args.width_px, stride, view_batch_size, dtype)
    if args.warmup_steps:
        for name in IMPLEMENTATIONS:
            runners[name](args.warmup_steps)
    runs: dict[str, list] = {name: [] for name in IMPLEMENTATIONS}
    for repeat in range(args.repeats):
        # ABBA order: a machine getting busier or quieter over time favours neither side.
        for name in IMPLEMENTATIONS[:: 1 if repeat % 2 == 0 else -1]:
            runs[name].append(timed_run(runners[name], args.steps, device, clock))
            log(f"stride {stride}, view batch {view_batch_size}, run {repeat + 1}/{args.repeats}: "
                f"{name} {runs[name][-1]['seconds']:.2f} s")
    first = {name: runs[name][0]["latents"] for name in IMPLEMENTATIONS}
    row = {
        "stride_latent": stride,
        "view_batch_size": view_batch_size,
        "windows": windows,
        "max_abs_latent_diff": float((first["jointdiff"] - first["diffusers"]).abs().max()),
        "latent_abs_max": float(first["diffusers"].abs().max()),
    }
    for name in IMPLEMENTATIONS:
        row[name] = summarize(runs[name], args.steps)
    row["speedup"] = row["diffusers"]["median_s"] / row["jointdiff"]["median_s"]
    row["cpu_time_ratio"] = row["diffusers"]["cpu_median_s"] / row["jointdiff"]["cpu_median_s"]
    return row


def summarize(runs: list[dict], steps: int) -> dict:
    """Median seconds (and s/it); on the CPU the median time inside and outside the UNet; on
    CUDA the peak allocated memory and its growth over what was allocated before the run."""
    seconds = [r["seconds"] for r in runs]
    median = statistics.median(seconds)
    summary = {"seconds": seconds, "median_s": median, "s_per_it": median / steps}
    summary["cpu_seconds"] = [r["cpu_seconds"] for r in runs]
    summary["cpu_median_s"] = statistics.median(summary["cpu_seconds"])
    if runs[0]["unet_seconds"] is not None:
        summary["unet_median_s"] = statistics.median(r["unet_seconds"] for r in runs)
        summary["overhead_median_s"] = statistics.median(r["seconds"] - r["unet_seconds"] for r in runs)
    if runs[0]["peak_bytes"] is not None:
        summary["peak_bytes"] = max(r["peak_bytes"] for r in runs)
        summary["peak_growth_bytes"] = max(r["peak_bytes"] - r["allocated_before_bytes"] for r in runs)
    return summary


# ---------------------------------------------------------------------------- CPU memory probes


def rss_kib() -> tuple[int, int]:
    """``(current, peak)`` resident set size in KiB: ``VmRSS`` and ``VmHWM`` from
    ``/proc/self/status`` (Linux); elsewhere ``getrusage`` max RSS for both."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        fields = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}
        return fields["VmRSS"], fields["VmHWM"]
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak, peak


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``, Linux >= 4.0) so that the
    peak measures the run and not the model construction before it. False where not allowed.
    (``getrusage`` is not used after a reset: it also remembers the peaks of exited threads.)"""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def probe_memory(args: argparse.Namespace) -> None:
    """Subprocess entry: build, run one implementation, print RSS (KiB) before and its peak."""
    torch.set_grad_enabled(False)
    pipeline = build_pipeline(args.model, torch.device(args.device), getattr(torch, args.dtype))
    runners, _ = make_runners(
        pipeline, args.width_px, args.strides[0], args.view_batch_sizes[0], pipeline.unet.dtype
    )
    gc.collect()
    reset = reset_peak_rss()
    before, _ = rss_kib()
    runners[args.probe](args.memory_steps)
    _, peak = rss_kib()
    print(json.dumps({"maxrss_before_kib": before, "maxrss_after_kib": peak, "reset": reset}))


def cpu_memory(args: argparse.Namespace, stride: int, view_batch_size: int) -> dict:
    """Peak RSS of each implementation, each in a fresh subprocess."""
    result = {}
    for name in IMPLEMENTATIONS:
        command = [
            sys.executable, __file__, "--probe", name, "--model", args.model, "--device", args.device,
            "--dtype", args.dtype, "--width-px", str(args.width_px), "--strides", str(stride),
            "--view-batch-sizes", str(view_batch_size), "--memory-steps", str(args.memory_steps),
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        result[name] = {
            "peak_rss_bytes": probe["maxrss_after_kib"] * 1024,
            "rss_growth_bytes": (probe["maxrss_after_kib"] - probe["maxrss_before_kib"]) * 1024,
            "high_water_mark_reset": probe["reset"],
        }
        log(f"memory stride {stride}, view batch {view_batch_size}: {name} {result[name]}")
    return result


# ---------------------------------------------------------------------------- report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def environment_lines(report: dict) -> list[str]:
    return [
        f"- device: {report['device_name']} ({report['device']}, {report['dtype']})",
        f"- torch {report['torch']}, diffusers {report['diffusers']}, Python {report['python']}",
        f"- command: `{report['command']}`",
    ]


def markdown(report: dict) -> str:
    """A markdown block: environment lines, the main table and (CPU) a time breakdown."""
    lines = environment_lines(report) + [
        f"- date: {report['date']}; canvas {report['height_px']}×{report['width_px']} px, "
        f"{report['steps']} DDIM steps, guidance {GUIDANCE_SCALE}, {report['repeats']} interleaved "
        f"repetitions (median), no VAE decode"
        + ("; **UNet replaced by a stub** (pipeline overhead only)" if report["stub_unet"] else ""),
        "",
        "| stride | view batch | windows | jointdiff s (s/it) | diffusers s (s/it) | speedup "
        "| peak mem jointdiff | peak mem diffusers | max abs latent diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ours, theirs = row["jointdiff"], row["diffusers"]
        lines.append(
            f"| {row['stride_latent']} | {row['view_batch_size']} | {row['windows']} "
            f"| {ours['median_s']:.2f} ({ours['s_per_it']:.3f}) | {theirs['median_s']:.2f} "
            f"({theirs['s_per_it']:.3f}) | {row['speedup']:.2f}× | {memory(row, 'jointdiff')} "
            f"| {memory(row, 'diffusers')} | {row['max_abs_latent_diff']:.3g} |"
        )
    if report["device"] == "cpu":
        lines += [
            "",
            "| stride | view batch | jointdiff CPU s | diffusers CPU s | CPU-time ratio "
            "| jointdiff non-UNet s | diffusers non-UNet s |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in report["rows"]:
            ours, theirs = row["jointdiff"], row["diffusers"]
            lines.append(
                f"| {row['stride_latent']} | {row['view_batch_size']} | {ours['cpu_median_s']:.2f} "
                f"| {theirs['cpu_median_s']:.2f} | {row['cpu_time_ratio']:.2f}× "
                f"| {ours['overhead_median_s']:.2f} | {theirs['overhead_median_s']:.2f} |"
            )
    return "\n".join(lines)


def memory(row: dict, name: str) -> str:
    if "peak_bytes" in row.get(name, {}):
        return f"{gib(row[name]['peak_bytes'])} (+{row[name]['peak_growth_bytes'] / 2**20:.0f} MiB)"
    if "cpu_memory" in row:
        probe = row["cpu_memory"][name]
        if not probe["high_water_mark_reset"]:
            return f"{gib(probe['peak_rss_bytes'])} RSS, incl. model construction"
        return f"{gib(probe['peak_rss_bytes'])} RSS (+{probe['rss_growth_bytes'] / 2**20:.0f} MiB)"
    return "not measured"


def memory_report(args: argparse.Namespace) -> None:
    """``--memory-only`` (CPU): the peak-RSS subprocesses alone, as a markdown table."""
    if args.device != "cpu":
        raise SystemExit(f"--memory-only measures CPU memory; got --device {args.device}")
    report = environment(args, torch.device("cpu"))
    report["memory_steps"] = args.memory_steps
    report["rows"] = [
        {"stride_latent": stride, "view_batch_size": size, "cpu_memory": cpu_memory(args, stride, size)}
        for stride in args.strides
        for size in args.view_batch_sizes
    ]
    lines = environment_lines(report) + [
        f"- date: {report['date']}; canvas {report['height_px']}×{report['width_px']} px, {args.memory_steps} DDIM steps per "
        "fresh process, peak RSS (growth over the RSS before the run)",
        "",
        "| stride | view batch | jointdiff | diffusers |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['stride_latent']} | {row['view_batch_size']} | {memory(row, 'jointdiff')} "
                     f"| {memory(row, 'diffusers')} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODES), default="tiny")
    parser.add_argument("--device", help="default: cpu for tiny, cuda for sd2-base")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--width-px", type=int, help="strip length (height is one 64-cell window)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--strides", type=int, nargs="+", help="strides in latent cells")
    parser.add_argument("--view-batch-sizes", type=int, nargs="+")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed warm-up run length (0: none)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of each CPU memory probe")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument("--memory-only", action="store_true", help="only the CPU memory subprocesses")
    parser.add_argument("--stub-unet", action="store_true",
                        help="replace the UNet by a cheap stand-in: time only the pipelines' own work")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--probe", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in MODES[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("width_px", "steps", "repeats"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.width_px % 8 or args.width_px < 512:
        raise SystemExit(f"--width-px must be a multiple of 8 and at least 512, got {args.width_px}")
    return args


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    import diffusers

    return {
        "model": args.model,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "height_px": 512,
        "width_px": args.width_px,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup_steps": args.warmup_steps,
        "prompt": PROMPT,
        "stub_unet": args.stub_unet,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        return probe_memory(args)
    torch.set_grad_enabled(False)
    check_same_windows(args.width_px, args.strides)
    if args.memory_only:
        return memory_report(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (use --model tiny on the CPU)")
    pipeline = build_pipeline(args.model, device, getattr(torch, args.dtype))
    if args.stub_unet:
        stub_unet(pipeline.unet)
    clock = UNetClock(pipeline.unet) if device.type == "cpu" else None
    report = environment(args, device)
    report["rows"] = []
    for stride in args.strides:
        for view_batch_size in args.view_batch_sizes:
            row = bench_config(args, pipeline, stride, view_batch_size, clock)
            if device.type == "cpu" and not (args.no_memory or args.stub_unet):
                row["cpu_memory"] = cpu_memory(args, stride, view_batch_size)
            report["rows"].append(row)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark: jointdiff's engine versus each model family's stock diffusers pipeline, one window.

For every built-in tiny model family (SD, SDXL, SD3, FLUX.1, FLUX.2, Qwen-Image; random
weights, CPU, float32) the canvas is exactly **one window** (``--window`` latent cells square,
whole patches), so jointdiff and the stock pipeline do the same work: prompt encoding, then
``--steps`` denoiser calls and scheduler steps. jointdiff runs geometry ``strip`` (one window:
the stride equals the window, the length is the window) with conditioner ``text``; the stock
pipeline (``ModelFamily.pipeline``, the very same components and scheduler) is called with
``latents=`` (packed into tokens where the stock pipeline expects them packed, as in
``tests/test_family_*.py``) and ``output_type="latent"``. Both start from the same unit
Gaussian latents (seed 0), the same prompt and the family's default guidance (no negative
prompt: SD, SDXL and SD3 run classifier-free guidance with an empty/zeroed negative branch;
FLUX.1 and FLUX.2 dev embedded guidance; Qwen-Image no CFG without a negative prompt, as its
stock pipeline).

What is timed: one whole call of each, ``output_type="latent"``: *no* VAE decode on either
side. Repetitions are interleaved in ABBA order (jointdiff, stock, stock, jointdiff, ...) after
one untimed two-step warm-up of each; medians are reported. Beside the wall time, the process
CPU time and the time spent outside the denoiser's ``forward`` (the part the two
implementations can differ in) are reported. The final latents are compared (largest absolute
difference, with the largest absolute stock value for scale). ``--stub-denoiser`` replaces the
denoiser by a cheap stand-in of the same output shape, so that only the work around the model
is timed (the outputs are still compared).

The ratio jointdiff / stock measures the engine's per-call and per-step overhead around the
same model; with random weights it says nothing about image quality. Everything is offline.

    python benchmarks/bench_families.py                     # all families, 10 steps, 5 repeats
    python benchmarks/bench_families.py --families tiny-flux --steps 20 --repeats 7
    python benchmarks/bench_families.py --stub-denoiser --steps 50   # the overhead alone
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

PROMPT = "a photo of the dolomites"
FAMILIES = ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2", "tiny-qwenimage")
IMPLEMENTATIONS = ("jointdiff", "stock")
TARGET_RATIO = 1.05
WARMUP_STEPS = 2
"""Steps of the untimed warm-up run. Not 1: with one step the tiny Qwen-Image scheduler's
``shift_terminal`` stretch divides by zero (the stock pipeline returns NaN latents)."""


# ---------------------------------------------------------------------------- the two runners


def stock_call(model: Any, window: int, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The stock pipeline on one window from ``noise`` ``(1, C, window, window)`` (canvas latent
    space); returns its final latents unpacked to ``(1, C, window, window)`` float32."""
    from jointdiff.models.families.flow import pack_patches, unpack_patches

    pipeline = model.pipeline
    family = model.name
    size_px = window * model.latent_format.scale_factor
    call: dict[str, Any] = {"height": size_px, "width": size_px, "num_inference_steps": steps, "output_type": "latent"}
    if family in ("sd", "sdxl", "sd3"):
        call.update(latents=noise.clone(), guidance_scale=model.default_guidance_scale)
        if family == "sd3":
            call["max_sequence_length"] = model.options.max_sequence_length
        return pipeline(PROMPT, **call).images.float()
    if family == "flux":
        call.update(latents=pack_patches(noise), guidance_scale=model.default_guidance_scale,
                    max_sequence_length=model.max_sequence_length)
        return unpack_patches(pipeline(PROMPT, **call).images, (window, window)).float()
    if family == "flux2":  # takes the canvas latents unpacked, returns patch-1 tokens
        call.update(latents=noise.clone(), guidance_scale=model.default_guidance_scale,
                    max_sequence_length=model.options.max_sequence_length)
        return unpack_patches(pipeline(prompt=PROMPT, **call).images, (window, window), patch=1).float()
    if family == "qwenimage":  # no negative prompt: no true CFG, as the engine
        call.update(latents=pack_patches(noise), true_cfg_scale=model.default_guidance_scale,
                    max_sequence_length=model.options.max_sequence_length)
        return unpack_patches(pipeline(PROMPT, **call).images, (window, window)).float()
    raise SystemExit(f"no stock call known for model family {family!r}")


def make_runners(model: Any, window: int) -> tuple[dict[str, Callable[[int], torch.Tensor]], torch.Tensor]:
    """``{name: run(steps) -> final latents}`` and the shared initial latents (seed 0)."""
    from jointdiff import JointDiffusion
    from jointdiff.core.registry import create

    size_px = window * model.latent_format.scale_factor
    geometry = create("geometry", "strip", length_px=size_px, window_latent=window, stride_latent=window)
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=model.default_guidance_scale)
    job = JointDiffusion(model, geometry, [text])
    shape = (1, model.latent_format.channels, window, window)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    model.pipeline.set_progress_bar_config(disable=True)

    def run_jointdiff(steps: int) -> torch.Tensor:
        result = job(num_inference_steps=steps, latents=noise, progress=False, output_type="latent")
        if job.geometry.num_windows != 1:
            raise SystemExit(f"expected one window, the geometry made {job.geometry.num_windows}")
        return result.latents.float()

    return {"jointdiff": run_jointdiff, "stock": lambda steps: stock_call(model, window, noise, steps)}, noise


def stub_denoiser(module: torch.nn.Module) -> None:
    """Replace the denoiser's forward by a cheap stand-in of the same output shape (``0.1 ·
    input``, UNet outputs cut to ``out_channels``), so that a run times only what the two
    implementations do *around* the model (``--stub-denoiser``)."""
    out_channels = getattr(module.config, "out_channels", None)

    def forward(*args: Any, return_dict: bool = True, **kwargs: Any):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else kwargs.get("sample", args[0] if args else None)
        out = x * 0.1
        if x.dim() == 4 and out_channels:  # UNet: (N, C, h, w)
            out = out[:, :out_channels]
        return (out,) if not return_dict else SimpleNamespace(sample=out)

    module.forward = forward


class DenoiserClock:
    """Wall time inside the denoiser module's ``forward`` (CPU: no device syncs needed)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        self.calls = 0
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._exit)

    def _enter(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _exit(self, *_: Any) -> None:
        self.total += time.perf_counter() - self._start
        self.calls += 1


# ---------------------------------------------------------------------------- one family


def bench_family(name: str, args: argparse.Namespace) -> dict:
    from jointdiff.models.loading import load_model

    model = load_model(name, device="cpu", dtype="float32")
    fmt = model.latent_format
    if args.window % fmt.patch:
        raise SystemExit(f"--window {args.window} is not a whole number of {fmt.patch}×{fmt.patch} patches ({name})")
    runners, _ = make_runners(model, args.window)
    if args.stub_denoiser:
        stub_denoiser(model.denoiser_module)
    clock = DenoiserClock(model.denoiser_module)
    for impl in IMPLEMENTATIONS:  # warm-up: first-call allocations, lazy imports, caches
        runners[impl](WARMUP_STEPS)
    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLEMENTATIONS}
    outputs: dict[str, torch.Tensor] = {}
    for repeat in range(args.repeats):
        for impl in IMPLEMENTATIONS[:: 1 if repeat % 2 == 0 else -1]:  # ABBA
            inside, calls = clock.total, clock.calls
            start, cpu_start = time.perf_counter(), time.process_time()
            latents = runners[impl](args.steps)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            runs[impl].append({"seconds": seconds, "cpu_seconds": cpu, "outside_seconds": seconds - (clock.total - inside),
                               "denoiser_calls": clock.calls - calls})
            outputs.setdefault(impl, latents)
            log(f"{name} run {repeat + 1}/{args.repeats}: {impl} {seconds:.3f} s")
    row = {
        "family": name,
        "family_class": type(model).__name__,
        "pipeline": type(model.pipeline).__name__,
        "scheduler": type(model.scheduler).__name__,
        "window_latent": args.window,
        "window_px": args.window * fmt.scale_factor,
        "guidance": guidance_label(model),
        "max_abs_diff": float((outputs["jointdiff"] - outputs["stock"]).abs().max()),
        "stock_abs_max": float(outputs["stock"].abs().max()),
    }
    for impl in IMPLEMENTATIONS:
        r = runs[impl]
        row[impl] = {
            "seconds": [x["seconds"] for x in r],
            "median_s": statistics.median(x["seconds"] for x in r),
            "cpu_median_s": statistics.median(x["cpu_seconds"] for x in r),
            "outside_median_s": statistics.median(x["outside_seconds"] for x in r),
            "denoiser_calls": r[0]["denoiser_calls"],
        }
    row["ratio"] = row["jointdiff"]["median_s"] / row["stock"]["median_s"]
    row["cpu_ratio"] = row["jointdiff"]["cpu_median_s"] / row["stock"]["cpu_median_s"]
    # ratio of each ABBA pair's runs (same repeat index): how much it moves from run to run
    pairs = [a / b for a, b in zip(row["jointdiff"]["seconds"], row["stock"]["seconds"])]
    row["pair_ratio_range"] = (min(pairs), max(pairs))
    del model, runners
    return row


# ---------------------------------------------------------------------------- report


def guidance_label(model: Any) -> str:
    """What guidance both sides run: CFG (two branches), embedded (distilled) or none."""
    scale = model.default_guidance_scale
    if model.guidance_mode == "cfg":
        return f"CFG {scale:g}" if model.uses_cfg(scale, None) else "none (CFG needs a negative prompt)"
    return f"embedded {scale:g}" if model.guidance_mode == "distilled" else "none"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def revision() -> str:
    """``git describe --always --dirty`` of the checkout the imported ``jointdiff`` comes from
    (``dirty``: uncommitted changes), or its folder when that is not a git checkout."""
    import jointdiff

    where = Path(jointdiff.__file__).resolve().parent
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=where,
                              capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return f"unknown (jointdiff from {where})"
    return done.stdout.strip()


def markdown(report: dict) -> str:
    lines = [
        f"- device: {report['cpu']}, {report['cores']} cores, {report['threads']} PyTorch thread(s); CPU, float32",
        f"- torch {report['torch']}, diffusers {report['diffusers']}, Python {report['python']}",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; one {report['window']}×{report['window']}-cell window, {report['steps']} steps, "
        f"{report['repeats']} interleaved ABBA repetitions (median) after a two-step warm-up, no VAE decode; "
        f"revision {report['revision']}"
        + ("; **denoiser replaced by a stub** (overhead only)" if report["stub_denoiser"] else ""),
        "",
        "| model | stock pipeline | window px | guidance | jointdiff s | stock s | ratio jd/stock | pair ratios "
        "| CPU-time ratio | jointdiff outside denoiser s | stock outside denoiser s | max abs diff (max abs stock) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ours, theirs = row["jointdiff"], row["stock"]
        low, high = row["pair_ratio_range"]
        flag = "" if row["ratio"] <= TARGET_RATIO else " ⚠"
        lines.append(
            f"| {row['family']} | {row['pipeline']} | {row['window_px']} | {row['guidance']} "
            f"| {ours['median_s']:.3f} | {theirs['median_s']:.3f} | {row['ratio']:.3f}{flag} | {low:.2f}–{high:.2f} "
            f"| {row['cpu_ratio']:.3f} | {ours['outside_median_s']:.3f} | {theirs['outside_median_s']:.3f} "
            f"| {row['max_abs_diff']:.3g} ({row['stock_abs_max']:.3g}) |"
        )
    lines += ["", "Single runs (s), in order:", ""]
    for row in report["rows"]:
        runs = {impl: ", ".join(f"{s:.3f}" for s in row[impl]["seconds"]) for impl in IMPLEMENTATIONS}
        lines.append(f"- {row['family']}: jointdiff {runs['jointdiff']}; stock {runs['stock']}")
    return "\n".join(lines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES, metavar="MODEL",
                        help=f"tiny models to run (default: all of {' '.join(FAMILIES)})")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--window", type=int, default=32, help="window side in latent cells (default 32)")
    parser.add_argument("--stub-denoiser", action="store_true",
                        help="replace the denoiser by a cheap stand-in: time only the work around the model")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    for key in ("steps", "repeats", "threads", "window"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} must be >= 1, got {getattr(args, key)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    report = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "revision": revision(),
        "stub_denoiser": args.stub_denoiser,
        "steps": args.steps,
        "repeats": args.repeats,
        "window": args.window,
        "prompt": PROMPT,
        "rows": [],
    }
    started = time.perf_counter()
    for name in args.families:
        report["rows"].append(bench_family(name, args))
    report["total_seconds"] = time.perf_counter() - started
    print(markdown(report))
    log(f"total {report['total_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

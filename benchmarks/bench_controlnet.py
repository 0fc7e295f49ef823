"""Benchmark: the ``controlnet`` conditioner (ControlNet of any size).

Three measurements, each a median of interleaved repetitions of one call with
``output_type="latent"`` (prompt encoding plus the denoising loop, no VAE decode):

1. **one window**: jointdiff (strip of one window, ``text`` + ``controlnet``) against diffusers'
   ``StableDiffusionControlNetPipeline`` on the same components, latents and condition; the
   final latents are compared (max abs difference);
2. **ControlNet overhead on a strip**: the same strip with and without the ControlNet
   (residuals computed in the same window batches as the UNet);
3. **memory against canvas length** (CUDA): peak allocated memory for two strip lengths. The
   condition image is held once at canvas size and windows are cut per batch, so the growth
   is the canvas-sized tensors only, not one condition copy per window.

Modes:

- ``--model tiny`` (default): the built-in tiny model and a tiny ControlNet (random weights)
  on the CPU;
- ``--model sd15``: SD 1.5's full-size UNet, VAE and text encoder built from
  ``benchmarks/configs/sd15`` with random weights, and a full-size ControlNet
  (``ControlNetModel.from_unet``, zero convolutions re-drawn), fp16 on CUDA.

Random weights say nothing about image quality; everything is offline. The condition is the
city edge map of ``examples/assets`` (cropped/tiled to the canvas).

    python benchmarks/bench_controlnet.py --model tiny
    python benchmarks/bench_controlnet.py --model sd15 --json controlnet_sd15.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "benchmarks" / "configs" / "sd15"
CONDITION = ROOT / "examples" / "assets" / "canny_city_512x3072.png"
PROMPT = "a beautiful city on a sunny day"
GUIDANCE_SCALE = 7.5
MODES: dict[str, dict[str, Any]] = {
    "tiny": {"device": "cpu", "dtype": "float32", "length_px": 1024, "memory_lengths": [], "steps": 4, "repeats": 2,
             "stride": 16, "view_batch_size": 4},
    "sd15": {"device": "cuda", "dtype": "float16", "length_px": 3072, "memory_lengths": [1536, 3072], "steps": 50,
             "repeats": 3, "stride": 16, "view_batch_size": 4},
}


def build_sd15(device: torch.device) -> Any:
    """SD 1.5's architectures (random weights, fixed seed), DDIM with SD 1.5's schedule."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from jointdiff.models.tiny import tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(CONFIG_DIR / "text_encoder" / "config.json"))
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(CONFIG_DIR / "scheduler"))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer(), unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build(model: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """The shared pipeline and a ControlNet for its UNet, on ``device`` in ``dtype``."""
    from jointdiff.models.loading import load_pipeline
    from jointdiff.models.tiny import tiny_controlnet

    if model == "tiny":
        pipeline = load_pipeline("tiny", device=device, dtype=dtype)
        return pipeline, tiny_controlnet(pipeline.unet)
    pipeline = load_pipeline(build_sd15(device), device=device, dtype=dtype)
    with torch.device(device):
        controlnet = tiny_controlnet(pipeline.unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    return pipeline, controlnet


def condition(height_px: int, width_px: int) -> Image.Image:
    """The city edge map tiled/cropped to ``height_px × width_px``."""
    with Image.open(CONDITION) as image:
        edges = image.convert("RGB")
    canvas = Image.new("RGB", (width_px, height_px))
    for left in range(0, width_px, edges.width):
        canvas.paste(edges, (left, 0))
    return canvas


def jointdiff_job(pipeline: Any, controlnet: Any | None, length_px: int, stride: int, view_batch_size: int) -> Any:
    from jointdiff import JointDiffusion
    from jointdiff.core.registry import create
    from jointdiff_plugins.controlnet import ControlNetConditioner

    window = pipeline.unet.config.sample_size
    geometry = create("geometry", "strip", length_px=length_px, window_latent=window, stride_latent=stride)
    conditioners = [create("conditioner", "text", prompt=PROMPT, guidance_scale=GUIDANCE_SCALE)]
    if controlnet is not None:
        conditioners.append(ControlNetConditioner(model=controlnet, image=condition(8 * window, length_px)))
    return JointDiffusion(pipeline, geometry, conditioners, view_batch_size=view_batch_size)


def noise_for(pipeline: Any, length_px: int) -> torch.Tensor:
    shape = (1, 4, pipeline.unet.config.sample_size, length_px // 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(pipeline.unet.dtype).float()


def runners(pipeline: Any, controlnet: Any, args: argparse.Namespace) -> dict[str, Callable[[], torch.Tensor]]:
    """Named zero-argument runs returning final latents on the CPU."""
    from diffusers import StableDiffusionControlNetPipeline

    size_px = 8 * pipeline.unet.config.sample_size
    reference = StableDiffusionControlNetPipeline(**pipeline.components, controlnet=controlnet)
    reference.set_progress_bar_config(disable=True)
    one, strip = noise_for(pipeline, size_px), noise_for(pipeline, args.length_px)
    image = condition(size_px, size_px)
    jobs = {
        "one window: jointdiff": (jointdiff_job(pipeline, controlnet, size_px, args.stride, args.view_batch_size), one),
        "strip: jointdiff, no ControlNet": (jointdiff_job(pipeline, None, args.length_px, args.stride, args.view_batch_size), strip),
        "strip: jointdiff + ControlNet": (jointdiff_job(pipeline, controlnet, args.length_px, args.stride, args.view_batch_size), strip),
    }
    out = {name: (lambda j=job, x=latents: j(args.steps, latents=x, progress=False, output_type="latent").latents.cpu())
           for name, (job, latents) in jobs.items()}
    out["one window: diffusers"] = lambda: reference(
        PROMPT, image=image, height=size_px, width=size_px, num_inference_steps=args.steps, guidance_scale=GUIDANCE_SCALE,
        latents=one.to(pipeline.unet.device, pipeline.unet.dtype), output_type="latent",
    ).images.float().cpu()
    return out


def timed(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor, int | None]:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    latents = run()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, latents, torch.cuda.max_memory_allocated(device) if cuda else None


def memory_by_length(pipeline: Any, controlnet: Any, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Peak CUDA memory of 2-step strip jobs of each length, with the ControlNet."""
    rows = []
    for length in args.memory_lengths:
        job = jointdiff_job(pipeline, controlnet, length, args.stride, args.view_batch_size)
        _, _, peak = timed(lambda: job(2, latents=noise_for(pipeline, length), progress=False, output_type="latent").latents, device)
        rows.append({"length_px": length, "windows": job.geometry.num_windows, "peak_bytes": peak})
        log(f"memory: {length} px, {job.geometry.num_windows} windows: {peak / 2**30:.2f} GiB")
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    pipeline, controlnet = build(args.model, device, dtype)
    runs = runners(pipeline, controlnet, args)
    if device.type == "cuda":  # warm-up: kernel selection and allocator caches
        for run in runs.values():
            run()
    results: dict[str, list] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            results[name].append(timed(run, device))
            log(f"run {repeat + 1}/{args.repeats}: {name} {results[name][-1][0]:.2f} s")
    rows = {name: {"median_s": statistics.median(r[0] for r in rs), "seconds": [r[0] for r in rs],
                   "peak_bytes": max(r[2] for r in rs) if rs[0][2] is not None else None} for name, rs in results.items()}
    ours, theirs = results["one window: jointdiff"][0][1], results["one window: diffusers"][0][1]
    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device), "dtype": args.dtype, "steps": args.steps,
        "length_px": args.length_px, "stride_latent": args.stride, "view_batch_size": args.view_batch_size,
        "torch": torch.__version__, "rows": rows,
        "one_window_max_abs_latent_diff": float((ours - theirs).abs().max()),
        "memory_by_length": memory_by_length(pipeline, controlnet, args, device) if device.type == "cuda" else [],
    }
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def markdown(report: dict) -> str:
    lines = [
        f"- device: {report['device_name']} ({report['device']}, {report['dtype']}); torch {report['torch']}",
        f"- command: `{report['command']}`; date {report['date']}",
        f"- {report['steps']} DDIM steps, guidance {GUIDANCE_SCALE}, strip {report['length_px']} px, stride "
        f"{report['stride_latent']}, view batch {report['view_batch_size']}; medians of interleaved runs, no decode",
        f"- one window, jointdiff vs diffusers: max abs latent difference {report['one_window_max_abs_latent_diff']:.3g}",
        "",
        "| run | median s | s/step | peak memory |",
        "|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        peak = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.2f} GiB"
        lines.append(f"| {name} | {row['median_s']:.2f} | {row['median_s'] / report['steps']:.3f} | {peak} |")
    for row in report["memory_by_length"]:
        lines.append(f"| memory, {row['length_px']} px ({row['windows']} windows) | | | {row['peak_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODES), default="tiny")
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--length-px", type=int, help="strip length for the overhead runs")
    parser.add_argument("--memory-lengths", type=int, nargs="*", help="strip lengths for the memory runs (CUDA)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--stride", type=int)
    parser.add_argument("--view-batch-size", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", help="also write the report as JSON")
    args = parser.parse_args(argv)
    for key, value in MODES[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


if __name__ == "__main__":
    main()

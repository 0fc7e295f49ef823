"""Benchmark of the ``syncdiffusion`` synchronizer.

Parts (run ``python benchmarks/bench_sync.py --help``):

- ``tiny`` (CPU is fine): the one-window-at-a-time oracle (``tests/sync_oracle.py``, the
  official sampler's algorithm) against the plugin on the built-in tiny model, at equal
  settings, **interleaved** (per round ``oracle, plugin, before, before, plugin, oracle``:
  a machine getting busier or quieter favours no side), wall and process CPU seconds with
  medians and spread, the speedups and the largest differences of the final latents;
  ``before`` is the plugin with this release's exact speed-ups switched off (anchor output
  reuse, one move per window for all region branches, one window per gradient pass on a
  CPU, LPIPS in channels-last, the deferred finite check). With
  ``--taesd``: the exact (VAE) mode against the fast TAESD mode (seconds, the cosine between
  their synchronization gradients, how far the final latents move) and the cost of one
  window's decoder forward + backward for the full-size SD 2 VAE architecture against TAESD.
- ``sd2`` (CUDA): the full-size SD 2-base architecture (configs in ``benchmarks/configs/sd21``,
  UNet ``sample_size`` 64, ε-prediction, random weights, float16) on a 512×3072 strip, stride
  16, 50 DDIM steps: seconds and peak GPU memory without synchronization and with it for the
  first 10 and for all 50 steps.

All weights are random (the tiny model, the SD 2 architecture, the LPIPS backbone), so the
numbers measure cost only; how far TAESD moves the gradients here says nothing about images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
CONFIGS = Path(__file__).resolve().parent / "configs" / "sd21"
TAESD_DIR = ROOT / "tests" / "fixtures" / "taesd"
PROMPT = "a photo of a city skyline at night"


def timed(fn, device: torch.device):
    """``(result, seconds)`` of ``fn()``, synchronizing CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def run_job(pipeline, geometry_options, synchronizer, steps, view_batch_size):
    """Final canvas latents of a strip job with the text conditioner."""
    from jointdiff import JointDiffusion
    from jointdiff.core.registry import create

    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=7.5)
    geometry = create("geometry", "strip", **geometry_options)
    job = JointDiffusion(pipeline, geometry, [text], synchronizer, view_batch_size=view_batch_size)
    return job(num_inference_steps=steps, seed=0, progress=False, output_type="latent").latents


# -- tiny model ------------------------------------------------------------------------------


ORDER = ("oracle", "plugin", "before", "before", "plugin", "oracle")
"""One round: every arm twice, mirrored, so a linear drift of the machine's load cancels."""


@contextmanager
def speedups_off():
    """The plugin as before this release's exact speed-ups (to measure what they bring)."""
    from jointdiff import JointDiffusion
    from jointdiff_plugins.syncdiffusion import SyncDiffusion

    names = ("reuse_anchor_output", "reuse_region_moves", "cpu_micro_batch", "lpips_channels_last")
    saved = [getattr(SyncDiffusion, name) for name in names], JointDiffusion.finite_check_every
    SyncDiffusion.reuse_anchor_output = SyncDiffusion.reuse_region_moves = SyncDiffusion.lpips_channels_last = False
    SyncDiffusion.cpu_micro_batch = None  # one gradient pass per engine batch, as before
    JointDiffusion.finite_check_every = 1
    try:
        yield
    finally:
        for name, value in zip(names, saved[0]):
            setattr(SyncDiffusion, name, value)
        JointDiffusion.finite_check_every = saved[1]


def oracle_vs_plugin(pipeline, lpips_module, args) -> dict:
    """Interleaved rounds of the oracle, the plugin and the plugin without its speed-ups."""
    from sync_oracle import sync_diffusion_oracle

    from jointdiff.core.registry import create

    geometry_options = {"length_px": args.length_px, "window_latent": 64, "stride_latent": args.stride}
    settings = {"w": 20.0, "decay": 0.95}

    def oracle():
        return sync_diffusion_oracle(pipeline, create("geometry", "strip", **geometry_options), prompt=PROMPT,
                                     guidance_scale=7.5, num_inference_steps=args.steps, seed=0,
                                     lpips_module=lpips_module, **settings)

    def plugin():  # the plugin's own LPIPS: the same random backbone (a fixed seed) as the oracle's module
        sync = create("synchronizer", "syncdiffusion", net=args.net, lpips_random_backbone=True, **settings)
        return run_job(pipeline, geometry_options, sync, args.steps, args.view_batch_size)

    def before():
        with speedups_off():
            return plugin()

    arms = {"oracle": oracle, "plugin": plugin, "before": before}
    runs, latents = [], {}
    for round_index in range(args.rounds):
        for arm in ORDER:
            cpu = time.process_time()
            latents[arm], seconds = timed(arms[arm], torch.device("cpu"))
            runs.append({"round": round_index, "arm": arm, "seconds": seconds, "cpu_seconds": time.process_time() - cpu})
            print(json.dumps(runs[-1]), flush=True)
    none, none_s = timed(lambda: run_job(pipeline, geometry_options, None, args.steps, args.view_batch_size),
                         torch.device("cpu"))
    geometry = create("geometry", "strip", **geometry_options)
    geometry.setup(pipeline.vae_scale_factor)
    return {"windows": geometry.num_windows, "runs": runs, **summarize(runs), "none_s": none_s,
            "max_abs_diff_plugin_oracle": float((latents["plugin"] - latents["oracle"]).abs().max()),
            "max_abs_diff_plugin_before": float((latents["plugin"] - latents["before"]).abs().max()),
            "sync_effect": float((latents["oracle"] - none).abs().max()),
            "latents": {"vae": latents["plugin"], "none": none}}


def summarize(runs: list[dict]) -> dict:
    """Medians and spread per arm; speedups as ratios of medians and per round."""
    import statistics

    out: dict = {}
    for key in ("seconds", "cpu_seconds"):
        values = {arm: [r[key] for r in runs if r["arm"] == arm] for arm in dict.fromkeys(ORDER)}
        medians = {arm: statistics.median(v) for arm, v in values.items()}
        out[key] = {arm: {"median": medians[arm], "min": min(v), "max": max(v)} for arm, v in values.items()}
        out[f"speedup_{key}"] = {"plugin_vs_oracle": medians["oracle"] / medians["plugin"],
                                 "before_vs_oracle": medians["oracle"] / medians["before"],
                                 "plugin_vs_before": medians["before"] / medians["plugin"]}
    for key in ("seconds", "cpu_seconds"):
        per_round = []
        for k in sorted({r["round"] for r in runs}):
            total = {arm: sum(r[key] for r in runs if r["round"] == k and r["arm"] == arm) for arm in ("oracle", "plugin")}
            per_round.append(total["oracle"] / total["plugin"])
        out[f"speedup_per_round_{key}"] = per_round
    return out


def exact_vs_taesd(pipeline, lpips_module, args, exact: dict) -> dict:
    from jointdiff.core.registry import create

    geometry_options = {"length_px": args.length_px, "window_latent": 64, "stride_latent": args.stride}
    sync = create("synchronizer", "syncdiffusion", lpips_module=lpips_module, decoder="taesd", taesd_path=str(TAESD_DIR))
    fast, fast_s = timed(lambda: run_job(pipeline, geometry_options, sync, args.steps, args.view_batch_size),
                         torch.device("cpu"))
    vae, none = exact["latents"]["vae"], exact["latents"]["none"]
    return {
        "taesd_s": fast_s,
        "taesd_vs_exact_over_sync_effect": float((fast - vae).norm() / (vae - none).norm()),
        "gradient_cosine_step0": gradient_cosine(pipeline, lpips_module, geometry_options),
    }


def gradient_cosine(pipeline, lpips_module, geometry_options) -> float:
    """Cosine between the exact and the TAESD synchronization gradients of all non-anchor
    windows at the first step (same canvas, same anchor)."""
    import copy

    from jointdiff.core.context import JobContext, StepState, WindowBatch
    from jointdiff.core.registry import create
    from jointdiff.engine.denoiser import Denoiser
    from jointdiff.models import as_model

    geometry = create("geometry", "strip", **geometry_options)
    geometry.setup(pipeline.vae_scale_factor)
    context = JobContext(as_model(pipeline), geometry, pipeline.unet.device, pipeline.unet.dtype, 50, torch.Generator().manual_seed(0))
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=7.5)
    text.setup(context)
    denoiser = Denoiser(context, text.prompt(), [text])
    scheduler = copy.deepcopy(pipeline.scheduler)
    scheduler.set_timesteps(50, device="cpu")
    canvas = torch.randn((1, 4, *geometry.canvas_shape_latent[1:]), generator=torch.Generator().manual_seed(0))
    state = StepState(0, scheduler.timesteps[0], 50, canvas, denoiser, context)
    grads = []
    for decoder in ("vae", "taesd"):
        sync = create("synchronizer", "syncdiffusion", lpips_module=lpips_module, decoder=decoder, taesd_path=str(TAESD_DIR))
        sync.setup(context)
        batch = WindowBatch(0, tuple(i for i in range(geometry.num_windows) if i != sync.anchor_id), scheduler)
        sync._prepare_anchor(batch, state)
        grads.append(sync.gradient(geometry.extract(canvas, batch.window_ids), batch.window_ids, scheduler, state))
    return float(torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0))


def decoder_costs(device: torch.device, dtype: torch.dtype, size_latent: int, repeats: int = 2) -> dict:
    """Seconds of one window's decoder forward + backward: SD 2 VAE architecture vs TAESD."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    with torch.device(device):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIGS / "vae"))).eval()
    vae = vae if dtype == torch.float32 else vae.to(dtype)
    taesd = AutoencoderTiny.from_pretrained(str(TAESD_DIR), torch_dtype=dtype).to(device).eval()
    out = {}
    for name, module in (("sd2_vae", vae), ("taesd", taesd)):
        latents = torch.randn(1, 4, size_latent, size_latent, device=device, dtype=dtype, requires_grad=True)

        def step():
            return torch.autograd.grad(module.decode(latents).sample.float().square().mean(), latents)

        timed(step, device)  # warm-up
        out[name] = min(timed(step, device)[1] for _ in range(repeats))
    out["size_px"] = size_latent * 8
    return out


def tiny_benchmark(args) -> dict:
    from jointdiff.models.loading import load_pipeline
    from jointdiff_plugins.lpips_loader import load_lpips

    torch.set_num_threads(args.threads or torch.get_num_threads())
    pipeline = load_pipeline("tiny", device="cpu", dtype="float32")
    lpips_module = load_lpips(args.net, random_backbone=True)
    exact = oracle_vs_plugin(pipeline, lpips_module, args)
    fast = exact_vs_taesd(pipeline, lpips_module, args, exact) if args.taesd else {}
    exact.pop("latents")
    costs = {"decoder_fwd_bwd_s": decoder_costs(torch.device("cpu"), torch.float32, args.decoder_latent)} if args.taesd else {}
    return {"device": "cpu", "cpu": cpu_name(), "threads": torch.get_num_threads(), "net": args.net, "steps": args.steps,
            "length_px": args.length_px, "stride": args.stride, "view_batch_size": args.view_batch_size,
            "torch": torch.__version__, **exact, **fast, **costs}


def cpu_name() -> str:
    """The CPU's model name (Linux), or the platform's processor string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- full-size SD 2-base ----------------------------------------------------------------------


def build_sd2_pipeline(device: torch.device, dtype: torch.dtype):
    """SD 2-base with random weights: SD 2.1's configs, UNet sample_size 64, ε-prediction."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from jointdiff.models.tiny import tokenizer

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIGS / "unet")), sample_size=64)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIGS / "vae")))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(CONFIGS / "text_encoder" / "config.json")))
    scheduler_config = DDIMScheduler.load_config(str(CONFIGS / "scheduler"))
    scheduler = DDIMScheduler.from_config(scheduler_config, prediction_type="epsilon")
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        part.to(device=device, dtype=dtype)
    return pipeline


def sd2_benchmark(args) -> dict:
    from jointdiff.core.registry import create
    from jointdiff_plugins.lpips_loader import load_lpips

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    pipeline = build_sd2_pipeline(device, dtype)
    lpips_module = load_lpips(args.net, random_backbone=True).to(device)
    geometry_options = {"length_px": args.length_px, "window_latent": args.window_latent, "stride_latent": args.stride}
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": args.dtype, "steps": args.steps, "geometry": geometry_options, "runs": []}
    autocast = "float16" if device.type == "cuda" and dtype == torch.float16 else "none"
    warm = create("synchronizer", "syncdiffusion", lpips_module=lpips_module, until_step=1, autocast=autocast,
                  micro_batch=1)
    run_job(pipeline, geometry_options, warm, 1, args.view_batch_size)  # kernels, allocator, autotuning
    for until in [0, *args.sync_steps]:
        for decoder in (["vae"] if until == 0 else args.decoders):
            sync = None if until == 0 else create(
                "synchronizer", "syncdiffusion", lpips_module=lpips_module, until_step=until, decoder=decoder,
                taesd_path=str(TAESD_DIR), autocast=autocast, checkpoint_decoder=args.checkpoint_decoder,
                micro_batch=args.micro_batch)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            _, seconds = timed(lambda: run_job(pipeline, geometry_options, sync, args.steps, args.view_batch_size), device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            run = {"sync_steps": until, "decoder": decoder if until else None, "seconds": seconds, "peak_gib": peak,
                   "micro_batch": getattr(sync, "_auto_micro", None) or args.micro_batch if sync else None}
            print(json.dumps(run), flush=True)
            results["runs"].append(run)
    return results


# -- command line -----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["tiny", "sd2", "all"], nargs="?", default="all",
                        help="'all': tiny, then sd2 when CUDA is available")
    parser.add_argument("--net", default=None, choices=["vgg", "alex", "squeeze"], help="LPIPS backbone (random)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (tiny: 2, sd2: 50)")
    parser.add_argument("--length-px", type=int, default=None, help="strip length (tiny: 768, sd2: 3072)")
    parser.add_argument("--stride", type=int, default=16, help="window stride in latent cells")
    parser.add_argument("--view-batch-size", type=int, default=None, help="engine window batch (tiny: 4, sd2: 8)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the tiny part (0: torch default)")
    parser.add_argument("--rounds", type=int, default=1, help="tiny part: interleaved rounds (oracle, plugin, before ×2 each)")
    parser.add_argument("--taesd", action="store_true", help="tiny part: also the TAESD mode and the decoder costs")
    parser.add_argument("--decoder-latent", type=int, default=32, help="tiny part: decoder cost window, latent cells")
    parser.add_argument("--device", default="cuda", help="sd2 part: device")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--window-latent", type=int, default=64, help="sd2 part: window (64 = 512 px)")
    parser.add_argument("--sync-steps", type=int, nargs="+", default=[10, 50], help="sd2 part: until_step values")
    parser.add_argument("--decoders", nargs="+", default=["vae", "taesd"], choices=["vae", "taesd"])
    parser.add_argument("--micro-batch", type=int, default=None, help="sd2 part: windows per gradient pass")
    parser.add_argument("--checkpoint-decoder", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return parser.parse_args(argv)


def with_defaults(args, part: str):
    tiny = part == "tiny"
    defaults = {"net": "vgg", "steps": 2 if tiny else 50, "length_px": 768 if tiny else 3072,
                "view_batch_size": 4 if tiny else 8}
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in defaults.items() if getattr(args, k) is None}})


def main(argv=None) -> None:
    args = parse_args(argv)
    results = {}
    if args.part in ("tiny", "all"):
        results["tiny"] = tiny_benchmark(with_defaults(args, "tiny"))
        print(json.dumps(results["tiny"], indent=2), flush=True)
    if args.part == "sd2" or (args.part == "all" and torch.cuda.is_available()):
        results["sd2"] = sd2_benchmark(with_defaults(args, "sd2"))
    elif args.part == "all":
        print("no CUDA device: skipping the sd2 part", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

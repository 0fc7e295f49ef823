"""Fast modes: what each saves, as counted evaluations and CPU seconds (docs/fast-modes.md).

Two parts:

* ``--counts``: window evaluations of a 512×3072 px strip with SD's 64-cell window (no
  model: the geometry's layout), MultiDiffusion at stride 8 and 16 against shifted windows
  (SpotDiffusion), at 50 steps and at 4 steps (few-step models);
* the runs (default): the built-in ``tiny`` SD model on a scaled copy of that strip
  (128×768 px, 16-cell windows, strides 2 and 4: the same window counts), counting model
  rows (UNet input rows, guidance branches and SyncDiffusion's gradient passes included)
  and the process's CPU seconds per configuration.

Random weights: this measures cost, never image quality.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

TAESD_DIR = str(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "taesd")


def counts(steps: int, seed: int) -> dict:
    """Window evaluations over ``steps`` steps of SD's 512×3072 px strip (64-cell windows)."""
    from jointdiff.core.family import SD_LATENT
    from jointdiff.core.registry import create
    from jointdiff.engine.shifted import evaluation_counts

    out = {}
    for stride in (8, 16):
        strip = create("geometry", "strip", length_px=3072, stride_latent=stride)
        strip.setup(SD_LATENT)
        out[f"overlap stride {stride}"] = strip.num_windows * steps
    out["shifted"] = sum(evaluation_counts(strip, steps, seed))
    return out


def _job(model, windows: str, fusion: str | None, stride: int, sync: dict | None, batch: int):
    from jointdiff import JointDiffusion
    from jointdiff.core.registry import create

    geometry = create("geometry", "strip", length_px=768, window_latent=16, stride_latent=stride)
    text = create("conditioner", "text", prompt="a photo of a city skyline", guidance_scale=7.5)
    synchronizer = None
    if sync is not None:
        options = {"lpips_random_backbone": True, "net": "alex", **sync}
        if options.get("decoder") == "taesd":
            options["taesd_path"] = TAESD_DIR
        synchronizer = create("synchronizer", "syncdiffusion", **options)
    return JointDiffusion(model, geometry, [text], synchronizer, view_batch_size=batch, windows=windows, fusion=fusion)


def run(name: str, model, steps: int, windows="overlap", fusion=None, stride=2, sync=None, batch=8) -> dict:
    """One configuration: model rows evaluated and CPU seconds of the whole call (no decode)."""
    rows = [0]
    forward = model.forward

    def counted(latents, *args, **kwargs):
        rows[0] += latents.shape[0]
        return forward(latents, *args, **kwargs)

    model.forward = counted
    try:
        job = _job(model, windows, fusion, stride, sync, batch)
        start, wall = time.process_time(), time.perf_counter()
        job(steps, seed=0, progress=False, output_type="latent")
        cpu, wall = time.process_time() - start, time.perf_counter() - wall
    finally:
        del model.forward
    return {"name": name, "steps": steps, "model_rows": rows[0], "cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}


def runs(steps: int, few: int) -> list[dict]:
    from diffusers import LCMScheduler

    from jointdiff.models.loading import as_model, load_pipeline

    pipeline = load_pipeline("tiny", device="cpu", dtype="float32")
    ddim = as_model(pipeline)
    lcm = as_model(type(pipeline)(**{**pipeline.components, "scheduler": LCMScheduler.from_config(pipeline.scheduler.config)}))
    sync_steps = max(2, steps // 2)
    configs = [
        ("MultiDiffusion stride 2 (41 windows)", ddim, steps, {}),
        ("MultiDiffusion stride 4 (21 windows)", ddim, steps, {"stride": 4}),
        ("shifted windows", ddim, steps, {"windows": "shifted"}),
        (f"x0_renoise LCM, stride 2, {few} steps", lcm, few, {"fusion": "x0_renoise"}),
        (f"shifted + x0_renoise LCM, {few} steps", lcm, few, {"windows": "shifted", "fusion": "x0_renoise"}),
        ("SyncDiffusion every step, VAE", ddim, sync_steps, {"stride": 4, "sync": {}}),
        ("SyncDiffusion every 2nd step, VAE", ddim, sync_steps, {"stride": 4, "sync": {"every": 2}}),
        ("SyncDiffusion until step 2, VAE", ddim, sync_steps, {"stride": 4, "sync": {"until_step": 2}}),
        ("SyncDiffusion every step, TAESD", ddim, sync_steps, {"stride": 4, "sync": {"decoder": "taesd"}}),
        ("no synchronizer (reference)", ddim, sync_steps, {"stride": 4}),
    ]
    results = []
    for name, model, n, options in configs:
        results.append(run(name, model, n, **options))
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", action="store_true", help="only the window counts of the 512×3072 px strip")
    parser.add_argument("--steps", type=int, default=10, help="steps of the runs (default 10; SyncDiffusion runs half)")
    parser.add_argument("--few", type=int, default=4, help="steps of the few-step runs (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads (default 1)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"counts_50": counts(50, 0), "counts_4": counts(4, 0)}
    print(json.dumps(result))
    if not args.counts:
        result["runs"] = runs(args.steps, args.few)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

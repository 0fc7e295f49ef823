"""Benchmark: latent (MultiDiffusion) vs x̂0 (SyncTweedies) fusion on the ``equirect`` geometry.

Perspective views are resampled out of the equirectangular canvas and back. Latent fusion
(Bar-Tal et al. 2023, Eq. 5) averages the *noisy* views on the canvas, and an average of
interpolated noise has less variance than the noise; x̂0 fusion (Kim et al., NeurIPS 2024)
keeps every view's noisy latent in view space and only averages the predicted clean latents.
What is measured, for each fusion, with the same initial noise, prompt and DDIM schedule:

- ``view variance``: the variance of the noisy latents the UNet sees, per step (recorded by
  a pass-through synchronizer), against the schedule's noise floor ``1 − ᾱ_t`` (for any
  clean latent independent of the noise, ``Var(x_t) = ᾱ_t Var(x0) + 1 − ᾱ_t >= 1 − ᾱ_t``)
  and against the same model run on a single window without any fusion (``native``);
- ``hf ratio``: high-frequency energy of the final latent canvas, the mean squared
  4-neighbour Laplacian over the variance, on the rows within ±45° of the horizon;
- ``seam``: :func:`jointdiff.surfaces.spherical.wrap_seam_ratio` of the decoded panorama (≈ 1: the
  column at yaw ±180° is like any other);
- ``pole``: the smallest fusion weight on the top and bottom latent rows (> 0: covered) and
  :func:`jointdiff.surfaces.spherical.pole_ratio` of the final latent canvas.

The built-in ``tiny`` model has random weights: its images are noise, so these numbers
describe the fusion machinery (noise statistics, blur, seams, coverage), not image quality.

    python benchmarks/fusion_360.py --steps 5 --json fusion_360.json

Variants: ``latent``; ``x0`` (the engine's x̂0 fusion: on resampling geometries each view
starts from fresh noise of its own); ``x0-resampled`` (x̂0 fusion whose views start from noise
resampled out of the initial canvas, as crops do: this measures what the initialisation
changes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from jointdiff import JointDiffusion  # noqa: E402
from jointdiff.core.registry import create  # noqa: E402
from jointdiff.core.synchronizer import Synchronizer  # noqa: E402
from jointdiff.models.loading import load_pipeline  # noqa: E402
from jointdiff.surfaces import spherical
from jointdiff_plugins.sphere import EquirectGeometry  # noqa: E402

PROMPT = "a blue sky with clouds over a lake"
VARIANTS = ("latent", "x0-resampled", "x0")


class VarianceProbe(Synchronizer):
    """Records the variance of the window latents the UNet is given, per step; changes nothing."""

    name = "variance-probe"

    def setup(self, context) -> None:
        self.sums: dict[int, list[float]] = {}

    def update(self, latents, batch, state):
        total = self.sums.setdefault(state.step_index, [0.0, 0.0, 0])
        total[0] += float(latents.double().sum())
        total[1] += float(latents.double().pow(2).sum())
        total[2] += latents.numel()
        return latents

    def variances(self) -> list[float]:
        out = []
        for step in sorted(self.sums):
            s, s2, n = self.sums[step]
            out.append(s2 / n - (s / n) ** 2)
        return out


def hf_ratio(canvas: torch.Tensor) -> float:
    """Mean squared 4-neighbour Laplacian over the variance, rows within ±45° of the horizon."""
    height = canvas.shape[-2]
    band = canvas[..., height // 4 : 3 * height // 4, :].double()
    wrapped = torch.cat([band[..., -1:], band, band[..., :1]], dim=-1)
    laplacian = (
        wrapped[..., 1:-1, 2:] + wrapped[..., 1:-1, :-2] + wrapped[..., 2:, 1:-1] + wrapped[..., :-2, 1:-1]
        - 4 * wrapped[..., 1:-1, 1:-1]
    )
    return float(laplacian.pow(2).mean() / band.var())


@contextlib.contextmanager
def resampled_view_noise(geometry):
    """Start x̂0 fusion's views from noise resampled out of the initial canvas (what the
    engine does for exact crops) instead of their own fresh noise."""
    cls = type(geometry)
    saved = cls.__dict__.get("resamples")
    cls.resamples = False
    try:
        yield
    finally:
        if saved is None:
            del cls.resamples
        else:
            cls.resamples = saved


def run(pipeline, geometry, variant: str, steps: int, seed: int, decode: bool) -> dict:
    probe = VarianceProbe()
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=7.5)
    fusion = "latent" if variant == "latent" else "x0"
    job = JointDiffusion(pipeline, geometry, [text], probe, fusion=fusion)
    start = time.perf_counter()
    with resampled_view_noise(geometry) if variant == "x0-resampled" else contextlib.nullcontext():
        result = job(num_inference_steps=steps, seed=seed, progress=False, output_type="pil" if decode else "latent")
    seconds = time.perf_counter() - start
    out = {"fusion": variant, "seconds": round(seconds, 2), "view_variance": probe.variances(), "hf_ratio": hf_ratio(result.latents)}
    if decode:
        out["seam_ratio"] = spherical.wrap_seam_ratio(result.pixels)
        out["seam_ratio_plain_decode"] = spherical.wrap_seam_ratio(job._vae_decode(result.latents))
        out["pole_ratio"] = spherical.pole_ratio(result.latents)
    return out


def native(pipeline, window_latent: int, steps: int, seed: int) -> dict:
    """The same model on one window, no fusion: the variance trajectory it is trained for."""
    geometry = create("geometry", "strip", length_px=window_latent * 8, window_latent=window_latent, stride_latent=window_latent)
    probe = VarianceProbe()
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=7.5)
    result = JointDiffusion(pipeline, geometry, [text], probe)(num_inference_steps=steps, seed=seed, progress=False, output_type="latent")
    return {"fusion": "none (one window)", "view_variance": probe.variances(), "hf_ratio_window": hf_ratio(result.latents)}


def pole_weights(geometry: EquirectGeometry) -> float:
    sheets, height, width = geometry.canvas_shape_latent
    total = torch.zeros(sheets, 1, height, width)
    ids = list(range(geometry.num_windows))
    geometry.insert(total, geometry.window_weights(ids), ids)
    return float(torch.cat([total[..., 0, :], total[..., -1, :]]).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--width-px", type=int, default=1024)
    parser.add_argument("--window-latent", type=int, default=32)
    parser.add_argument("--fov-deg", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    pipeline = load_pipeline("tiny", device=args.device, dtype="float32")
    geometry = EquirectGeometry(width_px=args.width_px, window_latent=args.window_latent, fov_deg=args.fov_deg)
    geometry.setup(pipeline.vae_scale_factor)
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(args.steps, device="cpu")
    noise_floor = [float(1 - scheduler.alphas_cumprod[int(t)]) for t in scheduler.timesteps]

    results = {
        "model": "tiny (random weights)",
        "device": f"{args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "scheduler": type(scheduler).__name__,
        "geometry": {"name": geometry.name, **geometry.options.model_dump(), "views": geometry.num_windows,
                     "canvas_latent": list(geometry.canvas_shape_latent)},
        "steps": args.steps,
        "timesteps": [int(t) for t in scheduler.timesteps],
        "noise_floor": noise_floor,
        "pole_min_weight": pole_weights(geometry),
        "native": native(pipeline, args.window_latent, args.steps, args.seed),
        "runs": [run(pipeline, geometry, fusion, args.steps, args.seed, decode=True) for fusion in VARIANTS],
    }
    print_table(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def print_table(results: dict) -> None:
    runs = {run["fusion"]: run for run in results["runs"]}
    print(f"{results['model']} on {results['device']}, {results['geometry']['views']} views, "
          f"canvas {results['geometry']['canvas_latent']} latent, {results['steps']} DDIM steps")
    print("step     t    1-ᾱ_t   native   " + "   ".join(f"{name:>8}" for name in runs))
    for i, t in enumerate(results["timesteps"]):
        row = [results["noise_floor"][i], results["native"]["view_variance"][i]]
        row += [run["view_variance"][i] for run in runs.values()]
        print(f"{i:>4}  {t:>4}  " + "  ".join(f"{v:8.4f}" for v in row))
    print(f"hf ratio: native window {results['native']['hf_ratio_window']:.3f}, "
          + ", ".join(f"{name} {run['hf_ratio']:.3f}" for name, run in runs.items()))
    for name, run in runs.items():
        print(f"{name}: seam {run['seam_ratio']:.3f} (plain decode {run['seam_ratio_plain_decode']:.3f}), "
              f"pole ratio {run['pole_ratio']:.3f}, {run['seconds']} s")
    print(f"smallest fusion weight on the pole rows: {results['pole_min_weight']:.3f}")


if __name__ == "__main__":
    main()

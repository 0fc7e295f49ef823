"""The final VAE decode of a large canvas: in one piece vs in tiles (jointdiff.models.tiled_decode).

Each measurement runs in a fresh subprocess: build the model, decode a small warm-up, reset
the kernel's RSS high-water mark (``/proc/self/clear_refs``), decode unit Gaussian latents of
the given size, and report the peak RSS growth (``VmHWM`` minus the RSS before the decode),
the wall time, and jointdiff's estimate of that peak (:mod:`jointdiff.cost.budget`). On CUDA the
peak is ``torch.cuda.max_memory_allocated`` growth instead.

Modes: ``whole`` (one decoder call), ``tiled`` (tiles of the model's native window
overlapping by a quarter, each tile's own GroupNorm statistics), ``shared`` (the same tiles,
GroupNorm statistics shared across tiles: two passes, the engine's default).

    .venv/bin/python benchmarks/bench_decode.py --model tiny --sizes 64x256 64x512 128x1280 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("whole", "tiled", "shared")


def _rss(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) * 1024


def measure(args: argparse.Namespace) -> dict:
    """One decode in this process (the ``--child`` side)."""
    import torch

    from jointdiff.core.registry import create
    from jointdiff.cost import budget
    from jointdiff.models.loading import load_model
    from jointdiff.models.tiled_decode import decoder_norms, default_overlap, tiled

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    height, width = (int(v) for v in args.child_size.split("x"))
    latent = model.latent_format
    latents = torch.randn(1, latent.channels, height, width, generator=torch.Generator().manual_seed(0)).to(model.device)
    tile = latent.native_window
    decode = {
        "whole": model.decode,
        "tiled": tiled(model.decode, tile, default_overlap(tile), latent.scale_factor),
        "shared": tiled(model.decode, tile, default_overlap(tile), latent.scale_factor, shared_norms=decoder_norms(model)),
    }[args.child_mode]
    with torch.no_grad():
        model.decode(latents[..., : min(8, height), : min(8, width)])  # warm-up
        cuda = model.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            before = _rss("VmRSS")
        start = time.perf_counter()
        pixels = decode(latents)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")) - before
    geometry = create("geometry", "grid", height_px=height * latent.scale_factor, width_px=width * latent.scale_factor)
    estimate = budget.estimate(geometry, model, decode_tile_latent=0 if args.child_mode == "whole" else tile,
                               shared_norms=args.child_mode == "shared")
    return {
        "mode": args.child_mode, "latent": [height, width], "pixels": list(pixels.shape[-2:]),
        "megapixels": pixels.shape[-2] * pixels.shape[-1] / 1e6, "seconds": seconds, "peak_bytes": peak,
        "estimated_bytes": estimate.decode_bytes, "decoder_calls": estimate.decode_calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sizes", nargs="+", default=["64x256", "64x512", "128x1280"], help="latent HxW")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child-size", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_mode:
        print(json.dumps(measure(args)))
        return
    rows = []
    print("| canvas | mode | decoder calls | seconds | peak memory growth | estimate |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for mode in args.modes:
            command = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--dtype", args.dtype,
                       "--threads", str(args.threads), "--child-size", size, "--child-mode", mode]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            h, w = row["pixels"]
            print(f"| {h}×{w} px ({row['megapixels']:.1f} MP) | {mode} | {row['decoder_calls']} | {row['seconds']:.1f} | "
                  f"{row['peak_bytes'] / 2**20:.0f} MiB | {row['estimated_bytes'] / 2**20:.0f} MiB |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

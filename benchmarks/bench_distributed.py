"""Window parallelism: scaling efficiency, communication per step, equality with 1 rank.

Runs the same job on 1 rank and on N ranks (local processes, ``torch.multiprocessing``) and
reports seconds per denoising step, scaling efficiency ``T_1 / (N · T_N)``, bytes all-reduced
per step per rank, and the largest difference of the N-rank canvas from the 1-rank one.

    python benchmarks/bench_distributed.py --ranks 1 2                      # CPU, gloo
    python benchmarks/bench_distributed.py --device cuda --ranks 1 2        # 2 ranks, 1 GPU: gloo
    python benchmarks/bench_distributed.py --device cuda --ranks 1 2 --model <sd15 dir>

On CUDA each rank uses ``cuda:rank % gpu_count``; with more ranks than GPUs the ranks share
a GPU over gloo (NCCL refuses two ranks on one device), a correctness and overhead check,
not a speed-up. The tiny model's images are noise: this measures the machinery only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _job(args, pipeline, distributed):
    from jointdiff import JointDiffusion
    from jointdiff.core.registry import create

    geometry = create("geometry", "strip", length_px=args.length_px, stride_latent=args.stride_latent)
    text = create("conditioner", "text", prompt="a photo of a city", guidance_scale=7.5)
    sync = None
    if args.sync:
        sync = create("synchronizer", "syncdiffusion", lpips_random_backbone=args.model == "tiny", net="alex")
    return JointDiffusion(pipeline, geometry, [text], sync, view_batch_size=args.view_batch_size,
                          distributed=distributed)


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    from jointdiff.engine.distributed import Distributed, init_from_env, local_device, shutdown
    from jointdiff.models.loading import load_pipeline

    comm = init_from_env(timeout_s=600, backend=args.backend)
    device = "cpu" if args.device == "cpu" else local_device()
    pipeline = load_pipeline(args.model, device=device, dtype=args.dtype)
    distributed = comm if comm is not None else False
    _job(args, pipeline, distributed)(1, seed=0, progress=False, output_type="latent")  # warm-up
    if comm is not None:
        torch.distributed.barrier()
        comm.bytes_reduced, comm.seconds_in_collectives = 0, 0.0
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    synchronize()
    reduced = []  # bytes all-reduced so far, after each step
    record = (lambda i, t, canvas: reduced.append(comm.bytes_reduced)) if isinstance(comm, Distributed) else None
    start = time.perf_counter()
    result = _job(args, pipeline, distributed)(args.steps, seed=0, progress=False, output_type="latent", callback=record)
    synchronize()
    seconds = time.perf_counter() - start
    if rank == 0:
        per_step = (reduced[-1] - reduced[0]) // (len(reduced) - 1) if len(reduced) > 1 else 0
        waited = comm.seconds_in_collectives if isinstance(comm, Distributed) else 0.0
        torch.save({"seconds": seconds, "bytes": per_step, "waited": waited, "latents": result.latents.cpu(),
                    "windows": result.metadata["windows"], "canvas": tuple(result.latents.shape)}, f"{out}/world{world}.pt")
    shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl when each rank has a GPU")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--length-px", type=int, default=1536, help="strip length (default: 9 windows)")
    parser.add_argument("--stride-latent", type=int, default=16)
    parser.add_argument("--view-batch-size", type=int, default=1)
    parser.add_argument("--sync", action="store_true", help="SyncDiffusion at every step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for world in args.ranks:
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
            rows.append((world, torch.load(Path(out) / f"world{world}.pt", weights_only=False)))
    base_world, base = rows[0]
    for world, row in rows:
        per_step = row["seconds"] / args.steps
        efficiency = base["seconds"] * base_world / (world * row["seconds"])
        report = {
            "ranks": world, "device": args.device, "windows": row["windows"], "steps": args.steps,
            "sync": args.sync, "seconds_per_step": round(per_step, 4),
            "efficiency_vs_%d" % base_world: round(efficiency, 3),
            "canvas_latent": row["canvas"], "bytes_all_reduced_per_step": row["bytes"],
            "rank0_seconds_in_collectives_per_step": round(row["waited"] / args.steps, 4),
            "max_abs_diff_vs_%d" % base_world: float((row["latents"] - base["latents"]).abs().max()),
        }
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

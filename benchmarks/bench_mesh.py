"""Benchmark of the ``mesh`` geometry: ray-cast maps of a 40k-face mesh × 10 views at 96² and
768² (Embree through trimesh; trimesh's numpy caster on one 32² view), the texel maps and bake of a
texture, and a whole tiny job. Seconds of wall time; not image quality (tiny models have
random weights). Results: docs/benchmarks.md ("Mesh textures").

    .venv/bin/python benchmarks/bench_mesh.py --json mesh.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import trimesh


def timed(action, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` runs, seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def bench_raster(folder: Path, faces: int, sizes: list[int], numpy_size: int | None) -> dict:
    from jointdiff.surfaces.mesh import asset, cameras, raster

    side = max(3, round((faces / 4) ** 0.5))
    mesh = trimesh.creation.uv_sphere(count=[side, side])  # ≈ ``faces`` faces, no UVs once written as PLY
    path = folder / "bench.ply"
    mesh.export(path)
    loaded = {}
    results = {"faces": None, "load_and_unwrap_s": timed(lambda: loaded.setdefault("a", asset.load_mesh(path, max_faces=10**6)))}
    mesh_asset = loaded["a"]
    results["faces"] = int(len(mesh_asset.faces))
    views = cameras.default_cameras()
    for size in sizes:
        results[f"embree_{size}_s"] = timed(lambda: raster.rasterize_views(mesh_asset, views, size, "embree"))
    if numpy_size:  # trimesh's numpy caster is far slower: one view only
        results[f"numpy_{numpy_size}_one_view_s"] = timed(lambda: raster.rasterize_views(mesh_asset, views[:1], numpy_size, "triangle"))
    results["uv_raster_1024_s"] = timed(lambda: raster.rasterize_uv(mesh_asset, 0, (1024, 1024), "embree"))
    return results


def bench_job(folder: Path, model: str) -> dict:
    from jointdiff.jobs.spec import Job, run_job

    trimesh.creation.box().export(folder / "box.obj")
    job = Job.from_dict({
        "model": {"id": model, "device": "cpu", "dtype": "float32"},
        "geometry": {"name": "mesh", "path": str(folder / "box.obj"), "window_latent": 16, "texture_latent": 32,
                     "texture_px": 256},
        "conditioners": [{"name": "text", "prompt": "a wooden crate"}],
        "steps": 4, "seed": 0, "view_batch_size": 5, "output": str(folder / "crate.png"),
    })
    result = {}
    start = time.perf_counter()
    out = run_job(job, progress=False)
    result["job_s"] = time.perf_counter() - start
    start = time.perf_counter()
    out.save(folder / "crate.png")
    result["save_glb_obj_turntable_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=40_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 768])
    parser.add_argument("--numpy-size", type=int, default=32, help="also time trimesh's numpy caster on one view of this size (0: skip)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = {"cpus": os.cpu_count(), "raster": bench_raster(folder, args.faces, args.sizes, args.numpy_size),
                   "job": bench_job(folder, args.model)}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

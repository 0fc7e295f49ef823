"""Many small jobs: separate ``jointdiff run`` processes against one ``jointdiff batch``
(docs/batch.md). Wall time and model loads for ``--jobs`` tiny jobs (built-in ``tiny`` SD
model, a 96×64 px strip, ``--steps`` DDIM steps), then a re-run of the finished batch.

Each ``jointdiff run`` process pays Python start-up, the imports and the model load; the
batch pays them once. Random weights: this measures cost, never image quality.

    .venv/bin/python benchmarks/bench_batch.py --jobs 20 --steps 2 --out /tmp/bench-batch
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

JOB = """steps = {steps}
seed = {seed}
output = "{output}"

[model]
id = "tiny"
device = "cpu"

[geometry]
name = "strip"
length_px = 96
window_latent = 8
stride_latent = 4

[[conditioners]]
name = "text"
prompt = "a sky at hour {seed}"
"""


def write_jobs(folder: Path, count: int, steps: int) -> list[Path]:
    (folder / "out").mkdir(parents=True, exist_ok=True)  # `jointdiff run` wants the output folder to exist
    paths = []
    for i in range(count):
        path = folder / f"job-{i:02d}.toml"
        path.write_text(JOB.format(steps=steps, seed=i, output=f"out/sky-{i:02d}.png"))
        paths.append(path)
    return paths


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-batch"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cli = str(Path(sys.executable).with_name("jointdiff"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    separate = write_jobs(args.out / "separate", args.jobs, args.steps)
    separate_s = sum(timed([cli, "run", str(p), "--quiet", "--overwrite"], env) for p in separate)

    batch_jobs = write_jobs(args.out / "batch", args.jobs, args.steps)
    batch_s = timed([cli, "batch", str(batch_jobs[0].parent), "--quiet"], env)
    rows = [json.loads(line) for line in (args.out / "batch" / "out" / "batch-summary.jsonl").read_text().splitlines()]
    rerun_s = timed([cli, "batch", str(batch_jobs[0].parent), "--quiet"], env)

    result = {
        "load_average_1min": round(os.getloadavg()[0], 1),
        "jobs": args.jobs, "steps": args.steps,
        "separate_runs_s": round(separate_s, 1), "separate_model_loads": args.jobs,
        "batch_s": round(batch_s, 1), "batch_model_loads": sum(r["model_load_s"] > 0 for r in rows),
        "batch_model_load_s": round(sum(r["model_load_s"] for r in rows), 2),
        "batch_job_s_mean": round(sum(r["seconds"] for r in rows) / len(rows), 3),
        "rerun_of_finished_batch_s": round(rerun_s, 1),
        "speedup": round(separate_s / batch_s, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

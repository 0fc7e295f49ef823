"""How long the command line takes to refuse a job that only arithmetic shows is too big.

    .venv/bin/python benchmarks/bench_refusals.py [--rounds 5]

Runs ``jointdiff generate`` on a 45056×45056 px grid (2030 megapixels, above the default
limit of 64) in a fresh process each round and prints the best and median wall time and the
process's own CPU time. The refusal is arithmetic on the canvas shape (no model loads, and
the cost estimate does not walk the windows), so it should not grow with the canvas.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMAND = ["generate", "x", "--geometry", "grid", "-g", "height_px=45056", "-g", "width_px=45056", "--device", "cpu"]


def one_round() -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jointdiff.cli", *COMMAND], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    results = [one_round() for _ in range(rounds)]
    walls, cpus = [r[0] for r in results], [r[1] for r in results]
    print(results[0][2])
    print(f"wall: best {min(walls):.2f} s, median {statistics.median(walls):.2f} s; "
          f"CPU: best {min(cpus):.2f} s, median {statistics.median(cpus):.2f} s ({rounds} rounds)")


if __name__ == "__main__":
    main()

"""``benchmarks/gpu_all.py`` keeps working without a GPU: its ``--smoke`` mode runs the FLUX
and shifted-windows cases end to end on the CPU (tiny models) and writes its reports.

The SD cases are left to a manual ``--smoke`` run (about a minute on two cores): this test
stays under 30 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_runs_the_flux_and_shifted_cases(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_all.py"), "--smoke", "--cases", "4,3",
               "--threads", "1", "--out", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    cases = {case["case"]: case for case in report["cases"]}
    assert cases["4"]["status"] == "ok"
    assert [row["implementation"] for row in cases["4"]["rows"]] == [
        "jointdiff (flux family)", "diffusers FluxPipeline, one window"]
    assert cases["4"]["rows"][0]["windows"] == 7 and cases["4"]["checks"]["latents_finite"]
    assert cases["3"]["status"] in ("ok", "skipped")  # skipped only where the engine has no shifted windows
    assert "| 4 | FLUX.1-dev-sized transformer strip |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "gpu_all.log").read_text().count("case 4: ok") == 1

"""The batch on a Ray cluster (jointdiff.jobs.ray_batch): one local cluster for the session
(2 CPUs), one pool of 2 CPU workers for the module; outputs equal to a sequential batch pixel
for pixel, one model load per worker per model, a worker killed mid-job. Tiny model, 3 steps."""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from jointdiff.jobs.batch import run_batch  # noqa: E402
from jointdiff.jobs.ray_batch import run_ray_batch, start_workers  # noqa: E402

from test_batch import pixels, write_batch  # noqa: E402

ROWS = [
    {"prompt": "a red sky", "seed": 1, "output": "out/red.png"},
    {"prompt": "a blue sky", "seed": 2, "output": "out/blue.png", "model.scheduler": "euler"},
    {"prompt": "a grey sky", "seed": 3, "output": "out/victim.png"},
    {"prompt": "a gold sky", "seed": 4, "output": "out/gold.png", "model.scheduler": "euler"},
]


class KillOnce:
    """The workers' step callback: once ``armed`` exists, the worker running ``victim.png``
    kills its own process (SIGKILL: no cleanup, as when a node is lost) at step 1, once."""

    def __init__(self, folder: Path) -> None:
        self.armed, self.fired = folder / "armed", folder / "fired"

    def __call__(self, output: str, step: int) -> None:
        if output.endswith("victim.png") and step == 1 and self.armed.exists() and not self.fired.exists():
            self.fired.touch()
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def killer(tmp_path_factory):
    return KillOnce(tmp_path_factory.mktemp("killer"))


@pytest.fixture(scope="module")
def workers(ray_cluster, killer):
    return start_workers(2, max_models=2, step_callback=killer)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The same batch in this process, one job after another."""
    base, manifest = write_batch(tmp_path_factory.mktemp("sequential"), ROWS, steps=3)
    run_batch([manifest], base=base, progress=False)
    return base.parent / "out"


def _same_outputs(folder: Path, reference: Path) -> None:
    for row in ROWS:
        name = Path(row["output"]).name
        assert np.array_equal(pixels(folder / name), pixels(reference / name)), name


def test_ray_batch_equals_sequential_with_one_load_per_worker_per_model(tmp_path, workers, sequential):
    base, manifest = write_batch(tmp_path, ROWS, steps=3)
    summary = run_ray_batch([manifest], actors=workers, base=base, progress=False)
    assert [r.status for r in summary.records] == ["done"] * 4
    _same_outputs(tmp_path / "out", sequential)
    loads = Counter((r.worker, r.output.endswith(("blue.png", "gold.png"))) for r in summary.records if r.model_load_s > 0)
    assert set(loads.values()) == {1} and summary.model_loads == sum(loads.values())  # no worker loaded a model twice
    assert len({r.worker for r in summary.records}) == 2  # both workers took jobs
    again = run_ray_batch([manifest], actors=workers, base=base, progress=False)
    assert [r.status for r in again.records] == ["skipped"] * 4 and again.model_loads == 0


def test_worker_killed_mid_job_its_job_is_retried_elsewhere(tmp_path, workers, killer, sequential):
    base, manifest = write_batch(tmp_path, ROWS, steps=3)
    killer.armed.touch()
    summary = run_ray_batch([manifest], actors=workers, base=base, checkpoint_every=1, progress=False)
    assert killer.fired.exists()
    records = {Path(r.output).name: r for r in summary.records}
    assert [r.status for r in summary.records] == ["done"] * 4
    assert records["victim.png"].attempts == 2  # the death counted as an attempt; resumed from its checkpoint
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == sorted(
        ["batch-summary.csv", "batch-summary.jsonl", *(Path(r["output"]).name for r in ROWS)]
    )  # every output exactly once, no second copy under another name
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".") and p.is_file()] == []  # no temp files
    _same_outputs(tmp_path / "out", sequential)

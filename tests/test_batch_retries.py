"""A retried batch job's summary row counts the time of every attempt (seconds, model-load,
GPU and CPU seconds), in a local batch and in the Ray dispatcher (driven here by a stand-in
for Ray's API: no cluster is started)."""

from __future__ import annotations

from types import SimpleNamespace

from jointdiff.jobs import batch as batch_module
from jointdiff.jobs.batch import JobRecord, Progress
from jointdiff.jobs.ray_batch import _dispatch, _Queue
from jointdiff.jobs.spec import ModelSpec

ATTEMPTS = [  # (status, seconds, model_load_s, gpu_s, cpu_s) of three attempts
    ("failed", 1.0, 0.5, 1.0, 0.25),
    ("failed", 2.0, 0.0, 2.0, 0.5),
    ("done", 4.0, 0.25, 4.0, 1.0),
]
TOTALS = {"seconds": 7.0, "model_load_s": 0.75, "gpu_s": 7.0, "cpu_s": 1.75}


def attempt(n: int) -> JobRecord:
    status, seconds, load, gpu, cpu = ATTEMPTS[n]
    return JobRecord("out.png", status, seconds, load, gpu, cpu, error="boom" if status == "failed" else "",
                     retry=status == "failed")


def timings(record: JobRecord) -> dict[str, float]:
    return {name: getattr(record, name) for name in TOTALS}


def test_local_retries_sum_the_timings_of_every_attempt(monkeypatch):
    tries = iter(range(3))
    monkeypatch.setattr(batch_module, "run_attempt", lambda *a, **k: attempt(next(tries)))
    record = batch_module._with_retries(SimpleNamespace(), None, retries=2, step_callback=None)
    assert (record.status, record.attempts, timings(record)) == ("done", 3, TOTALS)


def test_ray_retries_sum_the_timings_of_every_attempt():
    tries = iter(range(3))

    class Ref:  # what actor.run.remote returns: a handle to the attempt's record
        def __init__(self, planned) -> None:
            self.record = attempt(next(tries))

    class Actor:
        run = SimpleNamespace(remote=Ref)

    actor = Actor()
    ray = SimpleNamespace(wait=lambda refs, num_returns: (refs[:1], refs[1:]), get=lambda ref: ref.record)
    job = SimpleNamespace(output="out.png", model=ModelSpec(id="tiny"))
    planned = [SimpleNamespace(job=job, finished=False, item=SimpleNamespace(where="row 1"))]
    records = [JobRecord("out.png")]
    _dispatch(ray, [actor], planned, _Queue(planned), records, 2, Progress(1, 0, False), set())
    assert (records[0].status, records[0].attempts, timings(records[0])) == ("done", 3, TOTALS)

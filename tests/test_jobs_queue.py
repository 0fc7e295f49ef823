"""The persistent job queue (jointdiff.jobs.queue): order, persistence across a restart,
cancel at a step and resume equal to an uninterrupted run, failures recorded as one line."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from jointdiff.jobs.queue import JobQueue
from jointdiff.utils.errors import ConfigError


def tiny_job(seed: int = 0, steps: int = 2, prompt: str = "a test") -> dict:
    return {
        "model": {"id": "tiny", "device": "cpu"},
        "geometry": {"name": "strip", "length_px": 96, "window_latent": 8, "stride_latent": 4},
        "conditioners": [{"name": "text", "prompt": prompt}],
        "steps": steps,
        "seed": seed,
    }


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def queue(tmp_path):
    q = JobQueue(tmp_path / "app")
    yield q
    q.close()


def test_jobs_run_in_submission_order_one_at_a_time(queue):
    running: list[int] = []
    overlap: list[bool] = []
    gate = threading.Event()

    def hook(q, job_id, step):
        overlap.append(sum(r.status == "running" for r in q.history()) > 1)
        if job_id not in running:
            running.append(job_id)
        gate.wait(10)  # the first job holds the device until all three are queued

    queue.step_hooks.append(hook)
    ids = [queue.submit(tiny_job(seed=0))]
    queue.wait(ids[0], until=frozenset({"running"}))
    ids += [queue.submit(tiny_job(seed=s)) for s in (1, 2)]
    assert [queue.position(i) for i in ids] == [None, 1, 2]
    gate.set()
    records = [queue.wait(i) for i in ids]
    assert [r.status for r in records] == ["done"] * 3
    assert running == ids and not any(overlap)
    assert records[0].started <= records[1].started <= records[2].started


def test_history_survives_a_restart_and_a_running_job_becomes_resumable(tmp_path):
    folder = tmp_path / "app"
    first = JobQueue(folder)
    done = first.wait(first.submit(tiny_job(seed=1)))
    first.close()
    # A process that ended mid-job leaves it "running" in the database.
    again = JobQueue(folder, start=False)
    again._set(done.id, status="running")
    again.close()
    restarted = JobQueue(folder)
    try:
        record = restarted.get(done.id)
        assert record.status == "interrupted" and record.job["seed"] == 1 and record.outputs == done.outputs
        restarted.resume(done.id)
        assert restarted.wait(done.id).status == "done"
        assert [r.id for r in restarted.history()] == [done.id]
    finally:
        restarted.close()


def test_cancel_keeps_the_checkpoint_and_resume_equals_an_uninterrupted_run(queue):
    def cancel_first_job_after_step_0(q, job_id, step):
        if job_id == stopped_id and step == 0:
            q.cancel(job_id)

    queue.step_hooks.append(cancel_first_job_after_step_0)
    stopped_id = -1
    stopped_id = queue.submit(tiny_job(seed=7, steps=3))
    record = queue.wait(stopped_id)
    assert record.status == "cancelled" and record.step == 1 and not record.outputs
    checkpoint = record.job["checkpoint"]["path"]
    assert (queue.folder / "checkpoints").joinpath(checkpoint.rsplit("/", 1)[-1]).exists()
    queue.resume(stopped_id)
    resumed = queue.wait(stopped_id)
    assert resumed.status == "done" and queue.live[stopped_id].first_step == 1  # continued at step 1
    whole = queue.wait(queue.submit(tiny_job(seed=7, steps=3)))
    np.testing.assert_array_equal(pixels(resumed.outputs[0]), pixels(whole.outputs[0]))


def test_a_failing_job_records_its_one_line_error_and_the_next_job_runs(queue, monkeypatch):
    from jointdiff.jobs import queue as queue_module

    real = queue_module.run_job

    def failing(job, **kwargs):
        if job.seed == 13:
            raise RuntimeError("out of memory\nsecond line")
        return real(job, **kwargs)

    monkeypatch.setattr(queue_module, "run_job", failing)
    bad, good = queue.submit(tiny_job(seed=13)), queue.submit(tiny_job(seed=14))
    assert queue.wait(bad).error == "RuntimeError: out of memory"
    assert queue.wait(good).status == "done"


def test_bad_jobs_are_refused_before_queueing_with_the_cli_message(queue):
    job = tiny_job()
    job["geometry"]["length_px"] = -5
    with pytest.raises(ConfigError, match="length_px"):
        queue.submit(job)
    assert queue.history() == []
    with pytest.raises(ConfigError, match="only .* can be resumed"):
        queue.resume(queue.wait(queue.submit(tiny_job())).id)


def test_an_error_while_saving_fails_the_job_with_one_line_and_the_worker_goes_on(queue, monkeypatch):
    from jointdiff.jobs import queue as queue_module

    real = queue_module.save_result

    def full_disk(result, output, **kwargs):
        if result.metadata["job"]["seed"] == 21:
            raise OSError(28, "No space left on device")
        return real(result, output, **kwargs)

    monkeypatch.setattr(queue_module, "save_result", full_disk)
    bad, good = queue.submit(tiny_job(seed=21)), queue.submit(tiny_job(seed=22))
    failed = queue.wait(bad)
    assert failed.status == "failed" and failed.error == "OSError: [Errno 28] No space left on device"
    assert failed.finished is not None and not failed.outputs
    assert queue.wait(good).status == "done"


def test_a_failing_preview_keeps_the_previous_one_and_the_job_finishes(tmp_path):
    calls: list[int] = []

    def preview(model, canvas):
        calls.append(len(calls))
        if len(calls) > 1:
            raise RuntimeError("preview decoder broke")
        return "first preview"

    q = JobQueue(tmp_path / "app", preview=preview)
    try:
        job_id = q.submit(tiny_job(steps=3))
        assert q.wait(job_id).status == "done"
        live = q.live[job_id]
        assert len(calls) == 3 and live.preview == "first preview" and live.preview_step == 1
        assert live.preview_errors == 2
    finally:
        q.close()


def test_a_second_queue_on_the_same_folder_is_refused_until_the_first_closes(tmp_path):
    first = JobQueue(tmp_path / "app", start=False)
    try:
        with pytest.raises(ConfigError, match=r"folder '.*app' is already served by another job queue"):
            JobQueue(tmp_path / "app", start=False)
        job_id = first.submit(tiny_job())
        assert first._claim(job_id) and not first._claim(job_id)  # claimed once only
        assert first.get(job_id).status == "running"
    finally:
        first.close()
    JobQueue(tmp_path / "app", start=False).close()  # free again once closed

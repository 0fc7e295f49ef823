"""A persistent job queue: jobs run one at a time per device, in the order they were
submitted, and every job (its options, status, timings, outputs, error) is recorded in a
SQLite database beside the outputs, so the history survives a restart.

Cancelling a running job stops it after its current step through the engine's
:class:`~jointdiff.engine.result.StopJob`: the engine writes the job's checkpoint at that step
and keeps it, and :meth:`JobQueue.resume` queues the job again to continue from it (the
checkpoint's fingerprint makes the continued run equal to an uninterrupted one). A job that
was running when the process ended is recorded as ``interrupted`` and resumes the same way.

The queue drives :func:`jointdiff.jobs.spec.run_job` with models from a
:class:`~jointdiff.jobs.cache.ModelCache` per device (the next job with the same ``[model]``
table reuses the loaded model); anything that submits jobs (the web UI, a script) shares it.
SQLite (the standard library's ``sqlite3``) is the store because it is one file, needs no
server and survives a crash mid-write. One queue at a time serves a folder: it holds an
exclusive lock (``fcntl.flock``) on ``folder/jobs.lock`` while open, a second one is refused,
and a worker claims a job with one conditional update (``queued`` to ``running``), so no job
runs twice. (Where ``fcntl`` is missing, Windows, the folder is not locked.)
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from jointdiff.image.output import save_result
from jointdiff.jobs.cache import ModelCache
from jointdiff.jobs.spec import Job, check_before_loading, run_job
from jointdiff.models.loading import resolve_device
from jointdiff.utils.errors import ConfigError, JointDiffError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one process per folder is up to the user
    fcntl = None  # type: ignore[assignment]

STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
RESUMABLE = frozenset({"cancelled", "interrupted", "failed"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL,
    device TEXT NOT NULL,
    job TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    seconds REAL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL,
    outputs TEXT NOT NULL DEFAULT '[]',
    error TEXT
)
"""


@dataclass
class JobRecord:
    """One row of the history: the job as submitted (``job``, a dict with its output and
    checkpoint in the queue's folder), where it runs, its status and what it made."""

    id: int
    seq: int
    device: str
    job: dict[str, Any]
    status: str
    created: float
    started: float | None
    finished: float | None
    seconds: float | None
    step: int
    steps: int
    outputs: list[str]
    error: str | None

    @property
    def prompt(self) -> str:
        """The first prompt of the job (for lists), or ``""``."""
        for table in self.job.get("conditioners", []):
            if isinstance(table.get("prompt"), str):
                return table["prompt"]
        return ""


@dataclass
class Live:
    """What a running job shows while it runs: steps done, ETA, the latest preview (any
    object the queue's ``preview`` returned; a preview that raised keeps the previous one and
    counts in ``preview_errors``), whether it was asked to stop."""

    step: int = 0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)
    first_step: int | None = None
    eta_s: float | None = None
    preview: Any = None
    preview_step: int = -1
    preview_errors: int = 0
    cancel: bool = False


Preview = Callable[[Any, Any], Any]
"""``preview(model, canvas)``: a cheap picture of the canvas latents ``(S, C, H, W)`` for
the loaded :class:`~jointdiff.core.family.ModelFamily`."""
StepHook = Callable[["JobQueue", int, int], None]
"""``hook(queue, job_id, step_index)``: called after every step of a running job."""


class JobQueue:
    """Jobs in a SQLite database ``folder/jobs.sqlite``, outputs in ``folder/outputs``,
    checkpoints in ``folder/checkpoints``. One worker thread per device runs that device's
    queued jobs in submission order. ``preview`` (optional) makes a preview every
    ``preview_every`` steps; ``step_hooks`` are called after each step."""

    def __init__(self, folder: str | Path, *, preview: Preview | None = None, preview_every: int = 1,
                 checkpoint_every: int = 5, start: bool = True) -> None:
        if preview_every < 1:
            raise ConfigError(f"preview_every must be >= 1, got {preview_every!r}")
        self.folder = Path(folder).absolute()
        for sub in ("outputs", "checkpoints"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self._folder_lock = _lock_folder(self.folder)
        self.preview, self.preview_every, self.checkpoint_every = preview, preview_every, checkpoint_every
        self.step_hooks: list[StepHook] = []
        self.live: dict[int, Live] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._workers: dict[str, threading.Thread] = {}
        self._models: dict[str, ModelCache] = {}
        self._closed = False
        self._db = sqlite3.connect(self.folder / "jobs.sqlite", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute(SCHEMA)
            # A job that was running when the last process ended did not finish: resumable.
            self._db.execute("UPDATE jobs SET status = 'interrupted' WHERE status = 'running'")
        if start:
            for device in self._devices_with_queued():
                self._ensure_worker(device)

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, data: Mapping[str, Any]) -> int:
        """Validate the raw job ``data`` (as the CLI does: :meth:`Job.from_dict` and
        :func:`check_before_loading`), queue it and return its id. Its output and checkpoint
        go to the queue's folder (``outputs/job-ID.png``, ``checkpoints/job-ID.pt``)."""
        job = Job.from_dict(dict(data))
        check_before_loading(job)
        device = device_key(job.model.device)
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO jobs (seq, device, job, status, created, steps) VALUES (?, ?, ?, 'queued', ?, ?)",
                (self._next_seq(), device, "{}", time.time(), job.steps),
            )
            job_id = int(cursor.lastrowid)
            stored = self._placed(job, job_id)
            self._db.execute("UPDATE jobs SET job = ? WHERE id = ?", (json.dumps(stored), job_id))
            self._ensure_worker(device)
            self._wake.notify_all()
        return job_id

    def _placed(self, job: Job, job_id: int) -> dict[str, Any]:
        """The job with its output and checkpoint in the queue's folder."""
        data = job.to_dict()
        data["output"] = str(self.folder / "outputs" / f"job-{job_id}.png")
        every = job.checkpoint.every if job.checkpoint is not None else self.checkpoint_every
        data["checkpoint"] = {"path": str(self.folder / "checkpoints" / f"job-{job_id}.pt"), "every": every,
                              "resume": True, "overwrite": False}
        return data

    def _next_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0])

    def cancel(self, job_id: int) -> str:
        """Cancel a job: a queued one leaves the queue, a running one stops after its current
        step (its checkpoint kept). Returns the job's status after the request."""
        with self._lock:
            record = self.get(job_id)
            if record.status == "queued":
                self._set(job_id, status="cancelled")
                return "cancelled"
            if record.status == "running":
                self.live.setdefault(job_id, Live()).cancel = True
            return record.status

    def cancel_requested(self, job_id: int) -> bool:
        live = self.live.get(job_id)
        return live is not None and live.cancel

    def resume(self, job_id: int) -> None:
        """Queue a cancelled, interrupted or failed job again, at the end of its device's
        queue; it continues from its checkpoint when one was kept."""
        with self._lock:
            record = self.get(job_id)
            if record.status not in RESUMABLE:
                raise ConfigError(f"job {job_id} is {record.status}; only {sorted(RESUMABLE)} jobs can be resumed")
            self._set(job_id, status="queued", error=None, seq=self._next_seq())
            self._ensure_worker(record.device)
            self._wake.notify_all()

    # -- reading ------------------------------------------------------------------------------

    def get(self, job_id: int) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise ConfigError(f"job {job_id!r} does not exist")
        return _record(row)

    def history(self, limit: int = 200) -> list[JobRecord]:
        """The latest ``limit`` jobs, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_record(row) for row in rows]

    def position(self, job_id: int) -> int | None:
        """A queued job's place in its device's queue (1: next to run); None when not queued."""
        record = self.get(job_id)
        if record.status != "queued":
            return None
        with self._lock:
            ahead = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE device = ? AND status = 'queued' AND seq < ?", (record.device, record.seq)
            ).fetchone()[0]
        return int(ahead) + 1

    def wait(self, job_id: int, timeout_s: float = 60.0, until: frozenset[str] = frozenset({"done", "failed", "cancelled"})) -> JobRecord:
        """Block until the job's status is one of ``until`` (for scripts and tests)."""
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.get(job_id)
            if record.status in until:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {record.status} after {timeout_s} s")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop the workers after their current job (a running job is cancelled: resumable)."""
        with self._lock:
            self._closed = True
            for live in self.live.values():
                live.cancel = True
            self._wake.notify_all()
            workers = list(self._workers.values())
        for worker in workers:
            worker.join(timeout=60)
        self._db.close()
        if self._folder_lock is not None:
            self._folder_lock.close()  # releases the folder's lock
            self._folder_lock = None

    # -- running ------------------------------------------------------------------------------

    def _devices_with_queued(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT device FROM jobs WHERE status = 'queued'")]

    def _ensure_worker(self, device: str) -> None:
        worker = self._workers.get(device)
        if worker is None or not worker.is_alive():
            worker = threading.Thread(target=self._work, args=(device,), name=f"jointdiff-jobs-{device}", daemon=True)
            self._workers[device] = worker
            worker.start()

    def _next_job(self, device: str) -> int | None:
        """Take the first queued job of ``device`` (marked running), waiting for one."""
        with self._lock:
            while not self._closed:
                row = self._db.execute(
                    "SELECT id FROM jobs WHERE device = ? AND status = 'queued' ORDER BY seq LIMIT 1", (device,)
                ).fetchone()
                if row is not None and self._claim(int(row[0])):
                    job_id = int(row[0])
                    self.live[job_id] = Live()
                    return job_id
                if row is not None:
                    continue  # taken meanwhile (cancelled): look again
                self._wake.wait(timeout=1.0)
        return None

    def _claim(self, job_id: int) -> bool:
        """Mark a queued job running in one conditional update; False when it is no longer queued."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = 'running', started = ?, error = NULL WHERE id = ? AND status = 'queued'",
                (time.time(), job_id),
            )
            return cursor.rowcount == 1

    def _work(self, device: str) -> None:
        """Run ``device``'s jobs until the queue closes; whatever goes wrong with one job is
        recorded as its failure and the thread takes the next."""
        while (job_id := self._next_job(device)) is not None:
            try:
                self._run(job_id)
            except Exception as error:  # the worker must outlive any one job
                self._fail(job_id, error)

    def _run(self, job_id: int) -> None:
        """Run one job and write its outputs; any failure (running or saving) is recorded as its
        one-line error (the worker goes on)."""
        record, live = self.get(job_id), self.live[job_id]
        began = time.monotonic()
        try:
            result = self._execute(job_id, record, live)
            stopped = result.metadata.get("stopped_at_step")
            if stopped is not None:
                self._set(job_id, status="cancelled", step=stopped + 1, seconds=_elapsed(record, began))
                return
            outputs = [str(p) for p in save_result(result, record.job["output"], overwrite=True)]
            self._set(job_id, status="done", finished=time.time(), seconds=_elapsed(record, began),
                      step=record.steps, outputs=json.dumps(outputs))
        except Exception as error:  # a failing job must not take the worker (or the server) down
            self._fail(job_id, error, _elapsed(record, began))

    def _fail(self, job_id: int, error: BaseException, seconds: float | None = None) -> None:
        values: dict[str, Any] = {"status": "failed", "finished": time.time(), "error": one_line(error)}
        if seconds is not None:
            values["seconds"] = seconds
        self._set(job_id, **values)

    def _execute(self, job_id: int, record: JobRecord, live: Live) -> Any:
        # lazy: loads torch; jointdiff.jobs.queue must import without it
        from jointdiff.engine.result import StopJob

        job = Job.from_dict(record.job)
        live.steps = job.steps
        model = self._model(record.device, job)

        def on_step(i: int, t: int, canvas: Any) -> None:
            self._after_step(job_id, live, i, canvas, model)
            if live.cancel:
                raise StopJob

        return run_job(job, progress=False, callback=on_step, model=model)

    def _model(self, device: str, job: Job) -> Any:
        """The job's loaded model, from this device's :class:`ModelCache` (one model per
        device: the next job with the same ``[model]`` table reuses it)."""
        check_before_loading(job)
        cache = self._models.setdefault(device, ModelCache(max_models=1))
        return cache.get(job.model)

    def _after_step(self, job_id: int, live: Live, i: int, canvas: Any, model: Any) -> None:
        """Progress with ETA (from the steps run in this process), the preview when due, the hooks."""
        now = time.monotonic()
        if live.first_step is None:
            live.first_step, live.started = i, now
        live.step = i + 1
        done = i - live.first_step
        if done > 0:
            live.eta_s = (now - live.started) / done * (live.steps - live.step)
        if self.preview is not None and model is not None and (i % self.preview_every == 0 or live.step == live.steps):
            try:
                live.preview, live.preview_step = self.preview(model, canvas), live.step
            except Exception:  # noqa: BLE001 - a preview is a courtesy: the job goes on, the last one stays
                live.preview_errors += 1
        for hook in self.step_hooks:
            hook(self, job_id, i)

    def _set(self, job_id: int, **values: Any) -> None:
        columns = ", ".join(f"{key} = ?" for key in values)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*values.values(), job_id))


def _lock_folder(folder: Path) -> Any:
    """The open ``folder/jobs.lock`` holding an exclusive lock (None without ``fcntl``);
    ConfigError when another queue holds it."""
    if fcntl is None:
        return None
    handle = open(folder / "jobs.lock", "a+")  # noqa: SIM115 - held open for the queue's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(f"folder {str(folder)!r} is already served by another job queue (it holds "
                          f"{str(folder / 'jobs.lock')!r}); stop that one or choose another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")  # who holds it, for a person looking
    handle.flush()
    return handle


def device_key(device: str) -> str:
    """The queue a job waits in: its device, ``auto`` resolved (``cpu``, ``cuda``, ``cuda:1``)."""
    return str(resolve_device(device))


def one_line(error: BaseException) -> str:
    """The error as the CLI prints it: its first line; the type named for errors that are not jointdiff's."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return message if isinstance(error, JointDiffError) else f"{type(error).__name__}: {message}"


def _elapsed(record: JobRecord, began: float) -> float:
    return (record.seconds or 0.0) + time.monotonic() - began


def _record(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    values["job"] = json.loads(values["job"])
    values["outputs"] = json.loads(values["outputs"])
    return JobRecord(**values)

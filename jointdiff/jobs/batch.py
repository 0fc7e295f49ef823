"""Many jobs in one process: models loaded once, finished outputs skipped, interrupted jobs
resumed, failures retried, and a summary table of the whole batch (``jointdiff batch``).

- **Idempotent outputs.** Every job has a fingerprint (:func:`job_fingerprint`: the job
  without its output path, checkpoint, device and micro-batch size, plus the sha256 of the
  files it reads: input images, a mesh, a plugin's model file). It is written into the output (a PNG text chunk, or a hidden
  ``.NAME.jointdiff.json`` beside a JPEG or WebP); an output that carries the job's
  fingerprint is skipped without loading anything; one made by the same job from files that
  have changed since is made again.
- **Resume.** Each job checkpoints every ``checkpoint_every`` steps to
  ``.jointdiff-checkpoints/`` beside its output (a job's own ``[checkpoint]`` is kept), so an
  interrupted batch continues each job from its last checkpoint.
- **Retries.** A job that raises is retried up to ``retries`` times; errors in the job itself
  (:class:`~jointdiff.utils.errors.ConfigError`) are not retried. Then it is recorded as
  failed with its one-line error and the batch goes on.
- **Summary.** :class:`BatchSummary`, written as CSV and JSONL (``batch-summary.csv``,
  ``.jsonl``) beside the outputs: output, status, seconds, model-load seconds, GPU- and
  CPU-seconds, attempts, worker, error.

The same plan runs on a Ray cluster in :mod:`jointdiff.jobs.ray_batch`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from jointdiff.image.output import BATCH_KEY, file_sha256, input_files, save_result
from jointdiff.jobs.cache import ModelCache, model_key, release_memory
from jointdiff.jobs.manifest import BadJobsError, BatchJob, collect_jobs
from jointdiff.jobs.spec import MAYBE_PATH_KEYS, CheckpointSpec, Job, check_before_loading, run_job
from jointdiff.utils.errors import ConfigError, JointDiffError
from jointdiff.utils.files import check_writable, output_paths

CHECKPOINT_FOLDER = ".jointdiff-checkpoints"
SUMMARY_COLUMNS = (
    "output", "status", "seconds", "model_load_s", "gpu_s", "cpu_s", "attempts", "worker", "where", "error",
)
StepCallback = Callable[[str, int], None]
"""``callback(output, step)`` after every denoising step of every job (in the worker)."""


@dataclass
class PlannedJob:
    """A job as the batch runs it: with its checkpoint, fingerprint and the job its image
    embeds (as given: without the batch's checkpoint)."""

    item: BatchJob
    fingerprint: str
    embedded: dict[str, Any]
    finished: bool = False

    @property
    def job(self) -> Job:
        return self.item.job


@dataclass
class JobRecord:
    """One row of the summary. ``status``: ``done`` (written now), ``skipped`` (its output
    was already there with this fingerprint), ``failed`` (``error`` says why) or ``pending``
    (the batch was interrupted first). ``gpu_s``: seconds the job held a GPU (0 on a CPU);
    ``cpu_s``: CPU time of the process that ran it. The timings (``seconds``,
    ``model_load_s``, ``gpu_s``, ``cpu_s``) are summed over all the job's attempts."""

    output: str
    status: str = "pending"
    seconds: float = 0.0
    model_load_s: float = 0.0
    gpu_s: float = 0.0
    cpu_s: float = 0.0
    attempts: int = 0
    worker: str = ""
    where: str = ""
    error: str = ""
    retry: bool = field(default=False, repr=False)

    def row(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {k: round(values[k], 3) if isinstance(values[k], float) else values[k] for k in SUMMARY_COLUMNS}


@dataclass
class BatchSummary:
    """The records of a batch in its order, its model loads and wall time."""

    records: list[JobRecord]
    model_loads: int = 0
    wall_s: float = 0.0
    files: list[Path] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def ok(self) -> bool:
        return all(r.status in ("done", "skipped") for r in self.records)

    def text(self) -> str:
        """A few lines: counts, wall time, model loads, and seconds and GPU-seconds per output made."""
        done = [r for r in self.records if r.status == "done"]

        def per(key: str) -> float:
            return sum(getattr(r, key) for r in done) / max(len(done), 1)

        lines = [
            f"{len(self.records)} jobs: {len(done)} done, {self.count('skipped')} skipped, "
            f"{self.count('failed')} failed, {self.count('pending')} pending; {self.wall_s:.1f} s, "
            f"{self.model_loads} model load(s)",
            f"per output made: {per('seconds'):.2f} s, {per('model_load_s'):.2f} s loading, "
            f"{per('gpu_s'):.2f} GPU-s, {per('cpu_s'):.2f} CPU-s",
        ]
        lines += [f"failed: {r.output}: {r.error}" for r in self.records if r.status == "failed"]
        return "\n".join(lines + [f"summary: {p}" for p in self.files])

    def write(self, stem: str | Path) -> list[Path]:
        """Write ``STEM.csv`` and ``STEM.jsonl`` atomically; returns their paths. A ``skipped``
        job keeps the timings, attempts and worker of the run that made it, from the
        ``STEM.jsonl`` being replaced, so a batch run in several goes has one full summary."""
        stem = Path(stem)
        self._carry_over(stem.with_suffix(".jsonl"))
        rows = [r.row() for r in self.records]
        table = io.StringIO()
        writer = csv.DictWriter(table, SUMMARY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        self.files = [
            _write_text(stem.with_suffix(".csv"), table.getvalue()), _write_text(stem.with_suffix(".jsonl"), lines),
        ]
        return self.files


    def _carry_over(self, previous: Path) -> None:
        try:
            rows = [json.loads(line) for line in previous.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError):
            return
        made = {
            row.get("output"): row for row in rows if isinstance(row, dict) and row.get("status") in ("done", "skipped")
        }
        for record in self.records:
            row = made.get(record.output)
            if record.status == "skipped" and row is not None:
                for key in ("seconds", "model_load_s", "gpu_s", "cpu_s", "attempts", "worker"):
                    if isinstance(row.get(key), type(getattr(record, key))):
                        setattr(record, key, row[key])


# -- fingerprints and finished outputs -----------------------------------------------------


def job_fingerprint(job: Job) -> str:
    """What makes two jobs give the same image, as ``JOB-INPUTS`` (two 16-digit hex parts):
    ``JOB`` digests the job without ``output``, ``checkpoint``, ``view_batch_size`` and the
    model's ``device`` and ``offload``; ``INPUTS`` digests the sha256 of every file it reads:
    input images and, under the option names of :data:`~jointdiff.jobs.spec.MAYBE_PATH_KEYS`
    (a mesh's ``path``, a plugin's ``model`` file), every existing local file. An output whose
    ``JOB`` part matches but whose ``INPUTS`` differ was made from files that have changed
    since: it is made again. (The ``[model]`` table's weights are known by path, not content.)"""
    data = job.to_dict()
    for key in ("output", "checkpoint", "view_batch_size"):
        data.pop(key, None)
    data["model"] = {k: v for k, v in data["model"].items() if k not in ("device", "offload")}
    inputs = {where: entry["sha256"] for where, entry in input_files(data).items()}
    inputs.update(_option_files(data))
    return f"{_digest(data)}-{_digest(inputs)}"


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=8).hexdigest()


def _option_files(data: dict[str, Any]) -> dict[str, str | None]:
    """``{where: sha256}`` of the existing local files named by plugin options under
    :data:`MAYBE_PATH_KEYS` (nested tables and lists included; folders and hub ids skipped)."""
    found: dict[str, str | None] = {}

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                inner = f"{where}.{key}"
                if key in MAYBE_PATH_KEYS and isinstance(item, str) and Path(item).expanduser().is_file():
                    found[inner] = _file_digest(Path(item).expanduser())
                else:
                    walk(item, inner)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")

    for key in ("geometry", "synchronizer", "conditioners", "init"):
        walk(data.get(key), key)
    return found


_DIGESTS: dict[tuple[str, int, int], str | None] = {}


def _file_digest(path: Path) -> str | None:
    """``file_sha256`` of ``path``, read once per process while its size and mtime stay the
    same (hundreds of jobs naming one large model file hash it once)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.jointdiff.json")


def read_mark(path: str | Path) -> dict[str, Any] | None:
    """The batch mark (``{"fingerprint", "images"}``) of an output, None without one."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".png":
            with Image.open(path) as image:
                text = getattr(image, "text", {}).get(BATCH_KEY)
        else:
            text = _sidecar(path).read_text(encoding="utf-8") if path.exists() else None
        mark = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None


def output_state(output: str | Path, fingerprint: str) -> str:
    """``finished`` (every image there with this fingerprint), ``other`` (an image of
    another job, or no mark, is there) or ``missing`` (nothing there, or an image of this job
    made from input files that have changed since)."""
    target = Path(output)
    for first in (target, output_paths(target, 2)[0]):
        if not first.exists():
            continue
        mark = read_mark(first)
        if mark is None or not isinstance(mark.get("fingerprint"), str):
            return "other"
        if mark["fingerprint"] != fingerprint:  # the same job on changed input files is made again
            return "missing" if mark["fingerprint"].split("-")[0] == fingerprint.split("-")[0] else "other"
        count = int(mark.get("images", 1))
        paths = output_paths(target, count)
        marks = [read_mark(p) for p in paths]
        return "finished" if all(m and m.get("fingerprint") == fingerprint for m in marks) else "missing"
    return "missing"


# -- planning --------------------------------------------------------------------------------


def plan_batch(items: Sequence[BatchJob], *, overwrite: bool = False, checkpoint_every: int | None = 10,
               check_devices: bool = True) -> list[PlannedJob]:
    """Fingerprint every job, find finished outputs, create output folders, give each job a
    checkpoint; :class:`~jointdiff.jobs.manifest.BadJobsError` naming every output made by
    another job unless ``overwrite``."""
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ConfigError(f"--checkpoint-every (checkpoint_every) = {checkpoint_every!r}: must be a positive number "
                          "of steps (0 on the command line, None in Python: no checkpoints)")
    planned, taken = [], []
    folders: set[Path] = set()
    models: set[str] = set()
    for item in items:
        fingerprint = job_fingerprint(item.job)
        state = output_state(item.job.output, fingerprint)
        if state == "other" and not overwrite:
            taken.append(f"{item.where}: output {item.job.output!r} exists and was made by another job (or not by a "
                         "batch); --overwrite replaces it")
        folder = Path(item.job.output).absolute().parent
        if folder not in folders:
            folder.mkdir(parents=True, exist_ok=True)
            check_writable(item.job.output)
            folders.add(folder)
        if check_devices and state != "finished" and model_key(item.job.model) not in models:
            check_before_loading(item.job)
            models.add(model_key(item.job.model))
        job = _with_checkpoint(item.job, fingerprint, checkpoint_every)
        planned.append(PlannedJob(BatchJob(job, item.where), fingerprint, item.job.to_dict(), state == "finished"))
    if taken:
        raise BadJobsError(taken)
    return planned


def _with_checkpoint(job: Job, fingerprint: str, every: int | None) -> Job:
    if job.checkpoint is not None or every is None:
        return job
    output = Path(job.output)
    path = output.parent / CHECKPOINT_FOLDER / f"{output.stem}.{fingerprint}.ckpt"
    checkpoint = CheckpointSpec(path=str(path), every=every, resume=True, overwrite=True)
    return job.model_copy(update={"checkpoint": checkpoint})


def run_order(planned: Sequence[PlannedJob]) -> list[int]:
    """Indices of the jobs to run, grouped by model (first appearance order), so that a
    cache of one model loads each model once."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(planned):
        if not p.finished:
            groups.setdefault(model_key(p.job.model), []).append(i)
    return [i for group in groups.values() for i in group]


# -- running one job -------------------------------------------------------------------------


def run_attempt(planned: PlannedJob, cache: ModelCache, worker: str = "local",
                step_callback: StepCallback | None = None) -> JobRecord:
    """One attempt at a job: skipped when its output is finished, else run on the cached
    model and saved atomically. Never raises for the job's own failure (the record says it;
    ``retry`` tells whether another attempt may help); KeyboardInterrupt passes."""
    job = planned.job
    record = JobRecord(output=job.output, worker=worker, where=planned.item.where, attempts=1)
    if output_state(job.output, planned.fingerprint) == "finished":
        record.status = "skipped"
        return record
    start, cpu_start = time.perf_counter(), time.process_time()
    device = ""
    try:
        model = cache.get(job.model)
        record.model_load_s, device = cache.last_load_s, str(model.device)
        if job.checkpoint is not None:
            Path(job.checkpoint.path).parent.mkdir(parents=True, exist_ok=True)
        callback = None if step_callback is None else (lambda step, timestep, latents: step_callback(job.output, step))
        result = run_job(job, model=model, progress=False, callback=callback)
        _save(result, planned)
        record.status = "done"
    except Exception as error:  # the job's failure is recorded, the batch goes on
        record.status, record.error = "failed", one_line(error)
        record.retry = not isinstance(error, ConfigError)
        if "out of memory" in str(error).lower():
            cache.clear()
        release_memory()
    record.seconds = time.perf_counter() - start
    record.cpu_s = time.process_time() - cpu_start
    record.gpu_s = record.seconds if device.startswith("cuda") else 0.0
    return record


def run_one(job: Job, cache: ModelCache, *, checkpoint_every: int | None = 10, overwrite: bool = False,
            step_callback: StepCallback | None = None, worker: str = "local") -> JobRecord:
    """One job as a batch runs it, for a caller with its own queue (a web UI, a service): on
    ``cache``'s models, skipped when its output is finished, checkpointed, saved atomically
    with its fingerprint. One attempt; the record says how it went (``retry``: whether
    another attempt may help)."""
    [planned] = plan_batch([BatchJob(job, job.output)], overwrite=overwrite, checkpoint_every=checkpoint_every)
    return run_attempt(planned, cache, worker, step_callback)


def _save(result: Any, planned: PlannedJob) -> None:
    """Write the outputs with the job the engine recorded (options a plugin filled in, such
    as a mesh's sha256, included) less the batch's own checkpoint, and the batch mark."""
    embedded = dict(result.metadata.get("job") or planned.embedded)
    embedded.pop("checkpoint", None)
    if "checkpoint" in planned.embedded:  # the job's own [checkpoint] stays recorded
        embedded["checkpoint"] = planned.embedded["checkpoint"]
    result.metadata["job"] = embedded
    result.metadata["batch"] = {"fingerprint": planned.fingerprint, "images": len(result.images)}
    for path in save_result(result, planned.job.output, overwrite=True):
        if path.suffix.lower() != ".png":
            _write_text(_sidecar(path), json.dumps(result.metadata["batch"]))


def one_line(error: BaseException) -> str:
    """An error as one line: its message, with the exception's type unless it is jointdiff's."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return message if isinstance(error, JointDiffError) else f"{type(error).__name__}: {message}"


def _write_text(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; the summary is an ordinary file
    os.replace(tmp, path)
    return path


# -- the batch -------------------------------------------------------------------------------


class Progress:
    """One bar over the whole batch (jobs, ETA from the jobs run so far) on stderr."""

    def __init__(self, total: int, skipped: int, enabled: bool) -> None:
        from tqdm.auto import tqdm  # lazy: the bar only when a batch runs

        self.bar = tqdm(total=total, initial=skipped, unit="job", desc="batch", disable=not enabled, file=sys.stderr)
        self.failed = 0

    def update(self, record: JobRecord) -> None:
        self.failed += record.status == "failed"
        if self.failed:
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def remove_empty_checkpoint_folders(planned: Sequence[PlannedJob]) -> None:
    """The batch's checkpoint folders that hold nothing any more (every job finished)."""
    for folder in {Path(p.job.output).absolute().parent / CHECKPOINT_FOLDER for p in planned}:
        try:
            folder.rmdir()
        except OSError:  # not empty (an unfinished job's checkpoint), or absent
            pass


def default_summary(planned: Sequence[PlannedJob]) -> Path:
    """``batch-summary`` in the folder all outputs share."""
    folders = [str(Path(p.job.output).absolute().parent) for p in planned] or [os.getcwd()]
    return Path(os.path.commonpath(folders)) / "batch-summary"


def prepare(jobs: Sequence[BatchJob | str | Path], base: str | Path | None, overwrite: bool,
            checkpoint_every: int | None, check_devices: bool = True) -> list[PlannedJob]:
    """Jobs (or sources to collect them from) validated and planned (see :func:`plan_batch`)."""
    items = [j for j in jobs if isinstance(j, BatchJob)]
    if len(items) != len(jobs):
        items = collect_jobs([j for j in jobs if not isinstance(j, BatchJob)], base)  # type: ignore[arg-type]
    return plan_batch(items, overwrite=overwrite, checkpoint_every=checkpoint_every, check_devices=check_devices)


def run_batch(
    jobs: Sequence[BatchJob | str | Path], *, base: str | Path | None = None, retries: int = 2,
    cache: ModelCache | None = None, max_models: int = 1, checkpoint_every: int | None = 10,
    overwrite: bool = False, summary: str | Path | None = None, progress: bool = True,
    step_callback: StepCallback | None = None,
) -> BatchSummary:
    """Run a batch in this process and return its summary (also written to ``summary``.csv
    and .jsonl; default: ``batch-summary`` beside the outputs).

    ``jobs``: sources (job files, folders, manifests on ``base``) or :class:`BatchJob` s. Every
    job is validated first (:class:`~jointdiff.jobs.manifest.BadJobsError` names all bad
    ones). ``cache`` (or a new one of ``max_models``) keeps models between jobs and batches.
    On KeyboardInterrupt the summary so far is written (the rest ``pending``) and it passes."""
    if not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"--retries (retries) = {retries!r}: must be a non-negative integer")
    planned = prepare(jobs, base, overwrite, checkpoint_every)
    cache = cache if cache is not None else ModelCache(max_models)
    records = [JobRecord(p.job.output, "skipped" if p.finished else "pending", where=p.item.where) for p in planned]
    order = run_order(planned)
    start, loads = time.perf_counter(), cache.loads
    bar = Progress(len(planned), len(planned) - len(order), progress)
    try:
        for i in order:
            records[i] = _with_retries(planned[i], cache, retries, step_callback)
            bar.update(records[i])
    finally:
        bar.close()
        remove_empty_checkpoint_folders(planned)
        result = BatchSummary(records, cache.loads - loads, time.perf_counter() - start)
        result.write(summary if summary is not None else default_summary(planned))
    return result


def _with_retries(planned: PlannedJob, cache: ModelCache, retries: int,
                  step_callback: StepCallback | None) -> JobRecord:
    record = run_attempt(planned, cache, step_callback=step_callback)
    attempts = 1
    while record.status == "failed" and record.retry and attempts <= retries:
        record = with_earlier_attempts(run_attempt(planned, cache, step_callback=step_callback), record)
        attempts += 1
    record.attempts = attempts
    return record


TIME_FIELDS = ("seconds", "model_load_s", "gpu_s", "cpu_s")
"""The timings a job's record sums over all its attempts."""


def with_earlier_attempts(record: JobRecord, earlier: JobRecord | None) -> JobRecord:
    """``record`` (the latest attempt) with the timings of the ``earlier`` attempts added:
    a retried job's summary row counts all the time spent on it."""
    if earlier is not None:
        for name in TIME_FIELDS:
            setattr(record, name, getattr(record, name) + getattr(earlier, name))
    return record

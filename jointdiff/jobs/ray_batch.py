"""The batch on a Ray cluster: one actor per GPU (or per CPU where the cluster has no GPU)
holds loaded models (its own :class:`~jointdiff.jobs.cache.ModelCache`) and takes jobs.

Ray actors are how diffusion batch inference is spread over a cluster (Ray's "Stable
Diffusion batch prediction" example): the model stays loaded in a long-lived process per
device, and the driver only hands out small job descriptions. The driver here plans the batch
exactly as :func:`jointdiff.jobs.batch.run_batch` does (validation, fingerprints, finished
outputs skipped, checkpoints), then gives each idle actor the next job, preferring one on a
model that actor already holds.

Outputs and checkpoints are written by the actors to the job's output path, so that path must
be one every worker can write (a shared filesystem: NFS, a cluster volume). A worker that
dies mid-job (node lost, process killed) has its job given to another worker: the job resumes
from its last checkpoint; an image saved before the death is found by its fingerprint and not
written again; writes are atomic, so no half-written file is ever seen. A death counts as an
attempt; dead workers are not replaced during the batch.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any, Sequence

from jointdiff.jobs.batch import (
    BatchSummary,
    JobRecord,
    PlannedJob,
    Progress,
    StepCallback,
    default_summary,
    prepare,
    remove_empty_checkpoint_folders,
    run_attempt,
    with_earlier_attempts,
)
from jointdiff.jobs.cache import ModelCache, model_key
from jointdiff.jobs.manifest import BatchJob
from jointdiff.utils.errors import ConfigError

INSTALL_HINT = "pip install 'jointdiff[ray]'"


def require_ray() -> Any:
    """The ``ray`` module; ConfigError saying what to install without it."""
    try:
        import ray  # lazy: Ray is an optional extra
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class BatchWorker:
    """The actor: a model cache and one job at a time (see :func:`run_attempt`)."""

    def __init__(self, name: str, max_models: int, step_callback: StepCallback | None) -> None:
        self.name = name
        self.cache = ModelCache(max_models)
        self.step_callback = step_callback

    def run(self, planned: PlannedJob) -> JobRecord:
        return run_attempt(planned, self.cache, f"{self.name}@{os.uname().nodename}", self.step_callback)

    def stats(self) -> dict[str, Any]:
        return {"loads": self.cache.loads, "load_seconds": self.cache.load_seconds, "pid": os.getpid()}


def run_ray_batch(
    jobs: Sequence[BatchJob | str], *, address: str | None = None, workers: int | None = None,
    actors: Sequence[Any] | None = None, base: str | None = None, retries: int = 2, max_models: int = 1,
    checkpoint_every: int | None = 10, overwrite: bool = False, summary: str | None = None,
    progress: bool = True, step_callback: StepCallback | None = None,
) -> BatchSummary:
    """:func:`~jointdiff.jobs.batch.run_batch` on a Ray cluster: ``address`` (None: the
    running one, else a new local one; ``"auto"``, ``ray://host:10001``), ``workers`` actors
    (None: one per GPU, or one per CPU without GPUs), or ``actors`` from :func:`start_workers`
    (kept alive with their models after the batch, for the next one). Same summary;
    ``worker`` names the actor and node of each job, ``model_loads`` counts the loads of the
    actors alive at the end."""
    ray = require_ray()
    if not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"--retries (retries) = {retries!r}: must be a non-negative integer")
    planned = prepare(jobs, base, overwrite, checkpoint_every, check_devices=False)
    records = [JobRecord(p.job.output, "skipped" if p.finished else "pending", where=p.item.where) for p in planned]
    start, queue = time.perf_counter(), _Queue(planned)
    bar = Progress(len(planned), len(planned) - len(queue), progress)
    started = not ray.is_initialized() and len(queue) > 0
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    if actors is not None:
        pool = list(actors)
    else:
        pool = start_workers(workers, max_models, step_callback) if len(queue) else []
    dead: set[Any] = set()
    loads = 0
    try:
        before = _loads(ray, pool)
        pool = [actor for actor in pool if actor in before]  # a kept actor that died since is left out
        _dispatch(ray, pool, planned, queue, records, retries, bar, dead)
        after = _loads(ray, [a for a in pool if a not in dead])
        loads = sum(count - before.get(actor, 0) for actor, count in after.items())
    finally:
        bar.close()
        for actor in pool if actors is None else []:
            ray.kill(actor)
        if started:
            ray.shutdown()
        remove_empty_checkpoint_folders(planned)
        result = BatchSummary(records, loads, time.perf_counter() - start)
        result.write(summary if summary is not None else default_summary(planned))
    return result


def start_workers(workers: int | None = None, max_models: int = 1,
                  step_callback: StepCallback | None = None) -> list[Any]:
    """``workers`` :class:`BatchWorker` actors on the running Ray cluster (None: one per GPU,
    each holding it, or one per CPU without GPUs), each with a cache of ``max_models``."""
    ray = require_ray()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    count = workers if workers is not None else (gpus or int(resources.get("CPU", 1)))
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    if gpus and count > gpus:  # each worker holds a GPU: the others would wait for one forever
        raise ConfigError(f"workers = {count} but the cluster has {gpus} GPU(s); give at most {gpus} (one per GPU)")
    options = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": 1}
    actor_class = ray.remote(max_restarts=0, max_task_retries=0, **options)(BatchWorker)
    return [actor_class.remote(f"worker-{i}", max_models, step_callback) for i in range(count)]


def _loads(ray: Any, actors: list[Any]) -> dict[Any, int]:
    """Model loads so far of each live actor."""
    counts = {}
    for actor in actors:
        try:
            counts[actor] = ray.get(actor.stats.remote())["loads"]
        except ray.exceptions.RayActorError:
            pass
    return counts


class _Queue:
    """The jobs still to run, one queue per model (in first-appearance order)."""

    def __init__(self, planned: list[PlannedJob]) -> None:
        self.keys = [model_key(p.job.model) for p in planned]
        self.queues: dict[str, collections.deque] = {}
        for index, p in enumerate(planned):
            if not p.finished:
                self.queues.setdefault(self.keys[index], collections.deque()).append(index)

    def __len__(self) -> int:
        return sum(map(len, self.queues.values()))

    def put_back(self, index: int) -> None:
        self.queues[self.keys[index]].appendleft(index)

    def take(self, held: set[str]) -> int:
        """The next job on a model the actor holds, else the next job on any model."""
        key = next((k for k in held if self.queues.get(k)), None)
        if key is None:
            key = next(k for k, q in self.queues.items() if q)
        return self.queues[key].popleft()

    def drain(self) -> list[int]:
        left = [i for q in self.queues.values() for i in q]
        self.queues.clear()
        return left


def _dispatch(ray: Any, actors: list[Any], planned: list[PlannedJob], queue: _Queue, records: list[JobRecord],
              retries: int, bar: Progress, dead: set[Any]) -> None:
    """Hand jobs to idle actors until every job has a final record; a job whose actor died,
    or that failed and may be retried, goes back to the front of its queue."""
    idle, running = list(actors), {}
    held: dict[Any, set[str]] = {actor: set() for actor in actors}
    attempts: collections.Counter = collections.Counter()
    earlier: dict[int, JobRecord] = {}  # the failed attempts so far, their timings summed
    while len(queue) or running:
        while idle and len(queue):
            actor = idle.pop()
            index = queue.take(held[actor])
            running[actor.run.remote(planned[index])] = (actor, index)
        if not running:  # every worker is dead
            for index in queue.drain():
                records[index] = JobRecord(planned[index].job.output, "failed", attempts=attempts[index],
                                           where=planned[index].item.where, error="no worker left (all died)")
                bar.update(records[index])
            return
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, index = running.pop(ref)
        record = _result(ray, ref, actor, planned[index], dead)
        if actor not in dead:
            idle.append(actor)
            held[actor].add(queue.keys[index])
        attempts[index] += 1
        record = with_earlier_attempts(record, earlier.pop(index, None))
        record.attempts = attempts[index]
        if record.status == "failed" and record.retry and attempts[index] <= retries:
            earlier[index] = record
            queue.put_back(index)
            continue
        records[index] = record
        bar.update(record)


def _result(ray: Any, ref: Any, actor: Any, planned: PlannedJob, dead: set[Any]) -> JobRecord:
    """The actor's record, or a retryable failure when the actor died or the call broke."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as error:
        dead.add(actor)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return JobRecord(planned.job.output, "failed", where=planned.item.where, error=f"worker died: {reason}",
                         retry=True)
    except ray.exceptions.RayError as error:
        return JobRecord(planned.job.output, "failed", where=planned.item.where,
                         error=f"{type(error).__name__}: {str(error).splitlines()[0]}", retry=True)

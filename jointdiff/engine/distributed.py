"""Window parallelism on ``torch.distributed``: one job's windows spread over ranks.

Every rank holds the whole canvas and runs a fixed subset of the job's window batches
(:class:`~jointdiff.core.context.WindowBatch`: each has its own scheduler copy, and all noise is
keyed per window and step, so a batch gives the same result whichever rank runs it). After each step the
fusion's numerator ``Σ_i insert_i(w_i · x_i)`` (MultiDiffusion, Bar-Tal et al. 2023, Eq. 5; or
the x̂0 sum of SyncTweedies) is all-reduced with SUM, so every rank divides the same sum by
the same weights (``Σ_i insert_i(w_i)``, all-reduced once per job) and holds the same canvas.

Per step a rank sends and receives one canvas-sized float32 buffer ``(S, C, H, W)`` (the
all-reduce) plus a ``world_size``-element error flag; a synchronized SyncDiffusion step adds
the anchor's decoded image ``(1, 3, f·h, f·w)``, broadcast from the rank that owns the anchor.

Faults: before every collective that follows local work, ranks all-reduce an error flag, so a
rank that raises makes every rank raise :class:`DistributedJobError` naming that rank and its
cause, instead of waiting in a collective. Collectives have the process group's timeout (see
:func:`init_from_env`), so a rank that dies or hangs stops the others too.
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist

from jointdiff.utils.errors import ConfigError, JointDiffError
from jointdiff.utils.files import write_atomic

if TYPE_CHECKING:
    from jointdiff.core.context import WindowBatch

DEFAULT_TIMEOUT_S = 600.0
SYNC_COST = 4.0
"""Extra cost of a window on a synchronized step, in plain window steps (guided UNet forward
and backward, decoder forward and backward, LPIPS): an estimate, used only for balancing."""
ANCHOR_COST = 1.5
"""Extra cost of the anchor window on a synchronized step (guided forward and decode)."""


class DistributedJobError(JointDiffError, RuntimeError):
    """A rank of a distributed job failed; raised on every rank with the failing rank's cause."""


class Distributed:
    """Window parallelism over a process group (default: the global group).

    ``rank``/``world_size`` are the group's. Work is balanced by :meth:`assign`; collectives
    run on the CUDA device for NCCL and on the CPU otherwise (tensors are moved as needed).
    """

    def __init__(self, group: Any = None, *, sync_cost: float = SYNC_COST, anchor_cost: float = ANCHOR_COST) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("distributed: torch.distributed is not initialized; call jointdiff.engine.distributed.init_from_env() first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.sync_cost = sync_cost
        self.anchor_cost = anchor_cost
        backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.owners: list[int] = []
        self._local: dict[int, WindowBatch] = {}
        self._first_batch_of: dict[int, int] = {}
        self.bytes_reduced = 0
        self.seconds_in_collectives = 0.0
        """Time spent inside collectives: communication plus waiting for slower ranks (with
        NCCL, collectives that return before the GPU finishes count only their launch)."""

    def __repr__(self) -> str:
        return f"Distributed(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    # -- work assignment -----------------------------------------------------------------

    def assign(self, batches: Sequence[WindowBatch], costs: Sequence[float]) -> list[WindowBatch]:
        """Give every batch an owner (longest-processing-time-first on ``costs``, ties to the
        lowest rank: deterministic on every rank) and return this rank's batches in order."""
        self.owners = assign_owners(costs, self.world_size)
        self._local = {b.index: b for j, b in enumerate(batches) if self.owners[j] == self.rank}
        self._first_batch_of = {}
        for j, batch in enumerate(batches):
            for window_id in batch.window_ids:
                self._first_batch_of.setdefault(window_id, j)
        return list(self._local.values())

    def owner_of(self, window_id: int) -> int:
        """The rank that owns the first batch holding ``window_id`` (its x0-fusion view)."""
        return self.owners[self._first_batch_of[window_id]]

    def batch_of(self, window_id: int) -> WindowBatch:
        """This rank's first batch holding ``window_id``; only on :meth:`owner_of` that window."""
        return self._local[self._first_batch_of[window_id]]

    # -- collectives ---------------------------------------------------------------------

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place (the fusion's numerator or weights)."""
        buffer = tensor if tensor.device == self.device else tensor.to(self.device)
        self._collective("all-reduce of the canvas", dist.all_reduce, buffer, group=self.group)
        if buffer is not tensor:
            tensor.copy_(buffer)
        self.bytes_reduced += tensor.numel() * tensor.element_size()
        return tensor

    def broadcast(self, tensor: torch.Tensor | None, src: int, device: torch.device) -> torch.Tensor:
        """``tensor`` from rank ``src`` on every rank (on ``device``); others pass ``None``."""
        meta = [(tuple(tensor.shape), tensor.dtype) if self.rank == src else None]
        self._collective("broadcast", dist.broadcast_object_list, meta, src=self._global(src), group=self.group)
        shape, dtype = meta[0]
        buffer = tensor.to(self.device) if self.rank == src else torch.empty(shape, dtype=dtype, device=self.device)
        self._collective("broadcast", dist.broadcast, buffer, src=self._global(src), group=self.group)
        return buffer.to(device)

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (``None`` elsewhere)."""
        gathered = [None] * self.world_size if self.rank == 0 else None
        self._collective("gather", dist.gather_object, obj, gathered, dst=self._global(0), group=self.group)
        return gathered

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        holder = [obj]
        self._collective("broadcast", dist.broadcast_object_list, holder, src=self._global(src), group=self.group)
        return holder[0]

    def _global(self, group_rank: int) -> int:
        """The global rank of a rank of this group (collectives name ranks globally)."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def _collective(self, what: str, op, *args, **kwargs) -> None:
        start = time.perf_counter()
        try:
            op(*args, **kwargs)
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DistributedJobError(
                f"rank {self.rank}: {what} failed ({reason}); another rank died, hung past the "
                "collective timeout, or left the job"
            ) from error
        finally:
            self.seconds_in_collectives += time.perf_counter() - start

    def check(self, failure: BaseException | None, where: str, stop: bool = False) -> bool:
        """Exchange a flag per rank; when any rank failed, raise on every rank a
        :class:`DistributedJobError` naming the failed ranks and their causes. Otherwise
        return whether any rank asked to ``stop`` (the job ends on every rank)."""
        if isinstance(failure, DistributedJobError):
            raise failure  # already agreed on by every rank, or the group is broken
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        if failure is not None:
            flags[self.rank] = 1
        elif stop:
            flags[self.rank] = 2
        self._collective(f"error check at {where}", dist.all_reduce, flags, group=self.group)
        values = flags.tolist()
        failed = [r for r, flag in enumerate(values) if flag == 1]
        if not failed:
            return 2 in values
        cause = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}" if failure else None
        causes = [None] * self.world_size
        self._collective("error gather", dist.all_gather_object, causes, cause, group=self.group)
        message = "; ".join(f"rank {r} failed at {where}: {causes[r]}" for r in failed)
        raise DistributedJobError(message) from failure


def resolve(distributed: Distributed | bool | None) -> Distributed | None:
    """The engine's ``distributed`` argument: ``None`` (automatic: on when an initialized
    process group has more than one rank), ``False`` (off), ``True`` (on; needs a group) or a
    :class:`Distributed`. A world of one rank is the single-process path: no collectives."""
    if distributed is False:
        return None
    if isinstance(distributed, Distributed):
        return distributed if distributed.world_size > 1 else None
    if distributed is None and not (dist.is_available() and dist.is_initialized()):
        return None
    if distributed not in (None, True):
        raise ConfigError(f"distributed must be None, a bool or a Distributed, got {distributed!r}")
    comm = Distributed()
    return comm if comm.world_size > 1 else None


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each batch: longest-processing-time first (each batch, costliest first,
    goes to the least loaded rank; ties to the lowest index and rank), so every rank computes
    the same assignment."""
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        owner = min(range(world_size), key=lambda r: (loads[r], r))
        owners[j] = owner
        loads[owner] += costs[j]
    return owners


def window_costs(num_windows: int, num_steps: int, synchronizer: Any, sync_cost: float, anchor_cost: float) -> list[float]:
    """Relative cost of each window over the job, in plain window steps. A synchronizer's
    :meth:`~jointdiff.core.synchronizer.Synchronizer.synchronizes` steps cost ``1 + sync_cost``
    per window and ``1 + anchor_cost`` for its
    :meth:`~jointdiff.core.synchronizer.Synchronizer.anchor_windows` (SyncDiffusion)."""
    synchronized = 0
    if synchronizer is not None and hasattr(synchronizer, "synchronizes"):
        synchronized = sum(1 for i in range(num_steps) if synchronizer.synchronizes(i))
    if hasattr(synchronizer, "anchor_windows"):
        anchors = set(synchronizer.anchor_windows())
    else:  # duck-typed synchronizers of older versions
        anchors = {getattr(synchronizer, "anchor_id", None)}
    costs = []
    for window_id in range(num_windows):
        extra = anchor_cost if window_id in anchors else sync_cost
        costs.append(num_steps + synchronized * extra)
    return costs


# -- launching ---------------------------------------------------------------------------


def init_from_env(timeout_s: float | None = None, backend: str | None = None) -> Distributed | None:
    """Initialize the default process group from torchrun's variables (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and return a
    :class:`Distributed`; ``None`` when ``WORLD_SIZE`` is unset or 1.

    The backend is NCCL when CUDA is available and every local rank has a GPU of its own
    (each rank uses ``cuda:LOCAL_RANK``), gloo otherwise (CPU, or several ranks sharing a
    GPU, which NCCL refuses). ``timeout_s`` bounds every collective (default
    ``JOINTDIFF_DIST_TIMEOUT`` or 600 s).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    if timeout_s is None:
        timeout_s = float(os.environ.get("JOINTDIFF_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if timeout_s <= 0:
        raise ConfigError(f"distributed timeout must be > 0 seconds, got {timeout_s!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        torch.cuda.set_device(local_rank % gpus)
    if backend is None:
        backend = "nccl" if gpus and local_world <= gpus else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"distributed backend must be 'nccl' or 'gloo', got {backend!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Distributed()


def local_device() -> str:
    """The device a rank's model should use: ``cuda:LOCAL_RANK`` (modulo the GPU count) or
    ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"


def shutdown() -> None:
    """Destroy the default process group if one is initialized."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- checkpoints -------------------------------------------------------------------------

CHECKPOINT_FORMAT = 2
"""Version of the checkpoint layout; files of another layout are refused (or, with
``overwrite``, replaced)."""
_SCHEDULER_SKIP = frozenset({"config", "_internal_dict"})


@dataclass
class Checkpoint:
    """Save the job's state to ``path`` every ``every`` steps; with ``resume``, continue from
    ``path`` when it holds a checkpoint of this very job.

    Saved, as tensors and plain containers only (read back with
    ``torch.load(weights_only=True)``): the step reached, the canvas, every window's
    scheduler state and (``x0`` fusion) own latents, keyed by region branch and window, so a
    job resumes with any ``view_batch_size`` and on any number of ranks; and every plugin's
    ``state_dict()``. Rank 0 writes atomically.

    The file carries a fingerprint of the whole job (model identity, scheduler, every
    plugin's options, steps, seed, fusion, eta, canvas, windows, initial latents). A
    checkpoint of another job, an unreadable one, or any existing file while ``resume`` is
    False is refused with a one-line :class:`~jointdiff.utils.errors.ConfigError` naming what
    differs, so no interrupted work is lost; ``overwrite=True`` starts over instead (with a
    warning) and replaces the file. A job that finishes removes its checkpoint; a stopped
    (:class:`~jointdiff.engine.loop.StopJob`) or interrupted one keeps it.
    """

    path: str | Path
    every: int = 1
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"checkpoint every must be a positive integer, got {self.every!r}")
        self.path = Path(self.path)

    def due(self, step_index: int, num_steps: int) -> bool:
        return (step_index + 1) % self.every == 0 and step_index + 1 < num_steps


def window_key(prompt_index: int | None, window_id: int) -> str:
    """The checkpoint key of a window of a region branch (``"-"``: no branches)."""
    return f"{'-' if prompt_index is None else prompt_index}:{window_id}"


def is_plain(value: Any) -> bool:
    """Whether ``value`` is a tensor or a plain container (what ``weights_only`` loads)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, (str, int)) and is_plain(item) for key, item in value.items())
    return False


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A compact CPU copy (a view would save its whole storage)."""
    return tensor.detach().to("cpu", copy=True)


def _row(value: Any, rows: int, k: int) -> Any:
    """Row ``k`` of a scheduler attribute: sample-shaped tensors ``(rows, C, h, w)`` are
    per window and sliced to ``(1, C, h, w)``; everything else is shared and copied."""
    if isinstance(value, torch.Tensor):
        return _cpu(value[k : k + 1] if value.ndim == 4 and value.shape[0] == rows else value)
    if isinstance(value, (list, tuple)):
        return type(value)(_row(item, rows, k) for item in value)
    if isinstance(value, dict):
        return {key: _row(item, rows, k) for key, item in value.items()}
    return value


def scheduler_rows(scheduler: Any, rows: int) -> list[dict[str, Any]]:
    """A batch scheduler's state split into one plain dict per window. Only plain attributes
    are kept (what ``set_timesteps`` builds otherwise, e.g. numpy arrays, is rebuilt on
    resume); tensors ``(rows, C, h, w)`` are the per-window history of multistep solvers."""
    attributes = {k: v for k, v in vars(scheduler).items() if k not in _SCHEDULER_SKIP and is_plain(v)}
    return [{name: _row(value, rows, k) for name, value in attributes.items()} for k in range(rows)]


def _join(values: list[Any], device: torch.device, like: Any) -> Any:
    """The inverse of :func:`_row` over a batch's windows: per-window tensors concatenated
    on ``device``, shared ones put where the fresh scheduler keeps them (``like``)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.ndim == 4 and first.shape[0] == 1:
            return torch.cat(values).to(device)
        return first.to(like.device) if isinstance(like, torch.Tensor) else first
    if isinstance(first, (list, tuple)):
        return type(first)(_join([v[i] for v in values], device, None) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: _join([v[key] for v in values], device, None) for key in first}
    return first


def load_scheduler_rows(scheduler: Any, rows: Sequence[dict[str, Any]], device: torch.device) -> None:
    """Put the saved states of a batch's windows (in batch order) into its fresh scheduler."""
    for name in rows[0]:
        setattr(scheduler, name, _join([row[name] for row in rows], device, getattr(scheduler, name, None)))


def window_states(batches: Sequence[WindowBatch], fusion: Any) -> dict[str, dict[str, Any]]:
    """The per-window part of a checkpoint for the batches this rank runs, keyed by
    :func:`window_key`: the scheduler state and, with ``x0`` fusion, the window's own
    latents ``(1, C, h, w)``."""
    states = {}
    for batch in batches:
        schedulers = scheduler_rows(batch.scheduler, len(batch))
        view = fusion.view_of(batch)
        for k, window_id in enumerate(batch.window_ids):
            state: dict[str, Any] = {"scheduler": schedulers[k]}
            if view is not None:
                state["view"] = _cpu(view[k : k + 1])
            states[window_key(batch.prompt_index, window_id)] = state
    return states


def restore_windows(batches: Sequence[WindowBatch], fusion: Any, states: dict[str, dict[str, Any]], device: torch.device) -> None:
    """Put saved window states back into this rank's batches (of any composition)."""
    for batch in batches:
        keys = [window_key(batch.prompt_index, w) for w in batch.window_ids]
        missing = [key for key in keys if key not in states]
        if missing:
            raise ConfigError(f"checkpoint has no state for windows {missing} (branch:window)")
        rows = [states[key] for key in keys]
        load_scheduler_rows(batch.scheduler, [row["scheduler"] for row in rows], device)
        if fusion.view_of(batch) is not None:
            fusion.set_view(batch, torch.cat([row["view"] for row in rows]).to(device))


def save_checkpoint(checkpoint: Checkpoint, comm: Distributed | None, fingerprint: dict, next_step: int,
                    canvas: torch.Tensor, states: dict[str, dict[str, Any]], plugins: dict[str, Any] | None = None) -> None:
    """Gather every rank's window states on rank 0, which writes the file atomically with
    the canvas and ``plugins`` (rank 0's plugin states)."""
    parts = comm.gather_objects(states) if comm is not None else [states]
    failure = None
    if comm is None or comm.rank == 0:
        merged: dict[str, dict[str, Any]] = {}
        for part in parts:
            merged.update(part)
        payload = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "next_step": next_step,
                   "canvas": _cpu(canvas), "windows": merged, "plugins": plugins or {}}
        try:
            _atomic_save(payload, checkpoint.path)
        except Exception as error:
            if comm is None:
                raise
            failure = error
    if comm is not None:
        comm.check(failure, f"checkpoint after step {next_step - 1}")


def _atomic_save(payload: dict, path: Path) -> None:
    """Write through a temporary file and a rename; a failure names the checkpoint, never
    the temporary file."""
    write_atomic(Path(path), lambda tmp: torch.save(payload, tmp), describe=_cannot_write_checkpoint)


def _cannot_write_checkpoint(path: Path, error: OSError) -> str:
    return f"checkpoint.path {str(path)!r}: cannot write it ({error.strerror or type(error).__name__})"


def load_checkpoint(checkpoint: Checkpoint, comm: Distributed | None, fingerprint: dict) -> dict | None:
    """The checkpoint to resume (rank 0 reads it and broadcasts it), or None to start over.
    A file that cannot be resumed (see :class:`Checkpoint`) is a ConfigError, or with
    ``overwrite`` a warning and a fresh start."""
    payload, problem, failure = None, None, None
    if comm is None or comm.rank == 0:
        try:
            payload, problem = _read_checkpoint(checkpoint, fingerprint)
        except Exception as error:
            if comm is None:
                raise
            failure = error
    if comm is not None:
        comm.check(failure, f"reading checkpoint {str(checkpoint.path)!r}")
        payload, problem = comm.broadcast_object((payload, problem))
    if problem is None:
        return payload
    if not checkpoint.overwrite:
        raise ConfigError(f"{problem}; delete it, or set overwrite=True to start over")
    if comm is None or comm.rank == 0:
        warnings.warn(f"{problem}: starting over and replacing it (overwrite=True)", stacklevel=3)
    return None


def _read_checkpoint(checkpoint: Checkpoint, fingerprint: dict) -> tuple[dict | None, str | None]:
    """``(payload, None)`` to resume, ``(None, None)`` without a file, ``(None, problem)``."""
    path = checkpoint.path
    if not path.is_file():
        return None, None
    where = f"checkpoint {str(path)!r}"
    if not checkpoint.resume:
        return None, f"{where} exists (left by an interrupted job) and resume is off: set resume=True to continue it"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, f"{where} cannot be read as a checkpoint ({type(error).__name__}: {reason[:200]})"
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        return None, f"{where} is not a checkpoint of this jointdiff version (format {CHECKPOINT_FORMAT})"
    mismatch = fingerprint_mismatch(payload.get("fingerprint"), fingerprint)
    if mismatch is not None:
        return None, f"{where} belongs to another job: {mismatch}"
    return payload, None


def remove_checkpoint(checkpoint: Checkpoint, comm: Distributed | None) -> None:
    """Remove a finished job's checkpoint (rank 0; a missing file is fine)."""
    if comm is None or comm.rank == 0:
        checkpoint.path.unlink(missing_ok=True)


def fingerprint_mismatch(saved: Any, current: dict[str, Any]) -> str | None:
    """What differs between a saved and the current job fingerprint (None: nothing), in
    one line naming the fields, with both values around their first difference."""
    if not isinstance(saved, dict):
        return "it has no job fingerprint"
    keys = [k for k in current if saved.get(k) != current[k]] + [k for k in saved if k not in current]
    if not keys:
        return None
    parts = []
    for key in keys[:3]:
        old, new = _around_difference(saved.get(key), current.get(key))
        parts.append(f"{key} changed (saved {old}, now {new})")
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return "; ".join(parts) + more


def _around_difference(old: Any, new: Any, width: int = 64) -> tuple[str, str]:
    """Short reprs of two values, cut around where they first differ."""
    a, b = repr(old), repr(new)
    if len(a) <= width and len(b) <= width:
        return a, b
    start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, start - width // 2)

    def cut(text: str) -> str:
        piece = text[start : start + width]
        return ("…" if start else "") + piece + ("…" if start + width < len(text) else "")

    return cut(a), cut(b)

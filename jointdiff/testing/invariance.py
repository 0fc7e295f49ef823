"""Invariance checks: a job's result must not depend on how it is run.

jointdiff promises that a job's canvas is the same (to float rounding) whatever the
``view_batch_size``, whatever order the window batches run in, on any number of ranks, and
after an interruption and resume. The engine keeps the promise for its own noise (keyed per
window and step) and state (per window in checkpoints); a plugin keeps it by drawing noise
from :meth:`~jointdiff.core.context.StepState.generator_for` keyed by what the noise belongs to,
by never depending on the batch it is called with beyond the windows in it, and by
exposing state that outlives a step with ``state_dict()`` / ``load_state_dict()``.

These checks run a small job several ways and compare the canvases. Every check takes a
*job factory*: ``job_factory(view_batch_size) -> JointDiffusion``, returning a fresh engine
with fresh plugin instances on a tiny model (e.g. ``jointdiff.models.loading.load_model("tiny")``),
tiny canvases and few steps::

    from jointdiff import JointDiffusion
    from jointdiff.core.registry import create
    from jointdiff.testing.invariance import check_invariance

    def job(view_batch_size):
        geometry = create("geometry", "strip", length_px=256, window_latent=16, stride_latent=8)
        return JointDiffusion(model, geometry, [MyConditioner(...)], view_batch_size=view_batch_size)

    check_invariance(job)

Checks raise ``AssertionError`` naming the property, the two runs and the largest
difference. Tolerances: ``|a - b| <= atol + rtol·|b|`` per element; the defaults allow the
float rounding of a model evaluated on batches of another size: CPU convolution libraries
(oneDNN) pick kernels by batch size, and on some processors float32 canvases then differ by a
few 1e-4 after two or three steps. A batching bug (noise drawn from a stream the batches share,
state leaking between batches) differs by far more.
Invariance over ranks needs a process group; ``tests/test_distributed.py`` of jointdiff
shows the pattern (``torch.multiprocessing.spawn`` with gloo on the CPU).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from jointdiff.engine.distributed import Checkpoint
from jointdiff.engine.loop import StopJob
from jointdiff.testing.geometry import fail

if TYPE_CHECKING:
    from jointdiff.engine.loop import JointDiffusion

JobFactory = Callable[[int], "JointDiffusion"]
"""``job_factory(view_batch_size) -> JointDiffusion``: a fresh engine and fresh plugins."""
ORDERS = ("reversed", "rotated", "interleaved")
"""Batch orders :func:`check_batch_order_invariance` tries besides the natural one."""


def run_latents(job: JointDiffusion, steps: int, seed: int, **call_kwargs: Any) -> torch.Tensor:
    """The job's final canvas latents ``(S, C, H, W)`` (float32, on the CPU)."""
    result = job(steps, seed=seed, progress=False, output_type="latent", **call_kwargs)
    return result.latents.detach().float().cpu()


def assert_same_canvas(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    """``AssertionError`` naming ``what`` unless the canvases agree elementwise within
    ``atol + rtol·|expected|``."""
    if actual.shape != expected.shape:
        fail(f"{what}: canvas shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    difference = (actual.double() - expected.double()).abs()
    allowed = atol + rtol * expected.double().abs()
    if not bool((difference <= allowed).all()):
        worst = float(difference.max())
        fail(f"{what}: the canvas differs by up to {worst:.3g} (tolerance {atol:.1g} + {rtol:.1g}·|x|)")


def _ordered(batches: list, order: str) -> list:
    """``batches`` in another order: ``reversed``, ``rotated`` (from the middle) or
    ``interleaved`` (odd positions first, then even)."""
    if order == "reversed":
        return list(reversed(batches))
    if order == "rotated":
        middle = len(batches) // 2
        return batches[middle:] + batches[:middle]
    if order == "interleaved":
        return batches[1::2] + batches[0::2]
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


@contextlib.contextmanager
def batch_order(job: JointDiffusion, order: str) -> Iterator[JointDiffusion]:
    """Run ``job``'s window batches in another ``order`` (see :data:`ORDERS`) inside the
    block, as another process or scheduling might."""
    saved = vars(job).get("_window_batches")
    original = job._window_batches
    job._window_batches = lambda *args, **kwargs: _ordered(original(*args, **kwargs), order)
    try:
        yield job
    finally:
        if saved is None:
            del job._window_batches  # back to the class's method
        else:
            job._window_batches = saved


def check_batch_size_invariance(
    job_factory: JobFactory, sizes: Sequence[int] = (1, 2, 64), steps: int = 2, seed: int = 0,
    rtol: float = 1e-3, atol: float = 1e-3,
) -> torch.Tensor:
    """The canvas is the same for every ``view_batch_size`` in ``sizes`` (one window per
    batch, pairs, all windows at once). Catches noise or state tied to batches rather than
    windows. Returns the canvas of ``sizes[0]``."""
    if len(sizes) < 2:
        raise ValueError(f"sizes must name at least two batch sizes, got {sizes!r}")
    expected = run_latents(job_factory(sizes[0]), steps, seed)
    for size in sizes[1:]:
        actual = run_latents(job_factory(size), steps, seed)
        what = f"batch-size invariance: view_batch_size={size} vs {sizes[0]} ({steps} steps, seed {seed})"
        assert_same_canvas(actual, expected, what, rtol, atol)
    return expected


def check_batch_order_invariance(
    job_factory: JobFactory, view_batch_size: int = 1, orders: Sequence[str] = ORDERS, steps: int = 2,
    seed: int = 0, rtol: float = 1e-5, atol: float = 1e-5,
) -> torch.Tensor:
    """The canvas is the same whatever order the window batches run in (``orders``, see
    :data:`ORDERS`). Catches noise drawn from one generator in batch order, or a plugin
    that prepares something with whichever batch comes first. Returns the natural order's
    canvas."""
    expected = run_latents(job_factory(view_batch_size), steps, seed)
    for order in orders:
        with batch_order(job_factory(view_batch_size), order) as job:
            actual = run_latents(job, steps, seed)
        what = f"batch-order invariance: {order} vs natural order (view_batch_size={view_batch_size}, {steps} steps)"
        assert_same_canvas(actual, expected, what, rtol, atol)
    return expected


def check_resume_invariance(
    job_factory: JobFactory, steps: int = 3, stop_after: Sequence[int] = (0,), view_batch_size: int = 1,
    resume_view_batch_size: int | None = None, seed: int = 0, directory: str | Path | None = None,
    rtol: float = 1e-5, atol: float = 1e-5,
) -> torch.Tensor:
    """A job stopped after each step in ``stop_after`` (a step-end callback raising
    :class:`~jointdiff.engine.loop.StopJob`, checkpoint every step) and resumed by a fresh job
    (fresh plugins: their state must come from the checkpoint; ``resume_view_batch_size``:
    resumed with other batches) ends with the uninterrupted canvas; the finished job removes
    its checkpoint. Catches plugin state lost on resume and streams of noise that restart.
    Returns the uninterrupted canvas."""
    expected = run_latents(job_factory(view_batch_size), steps, seed)
    with contextlib.ExitStack() as stack:
        folder = Path(directory) if directory is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for stop in stop_after:
            if not isinstance(stop, int) or stop < 0:
                raise ValueError(f"stop_after must hold step indices >= 0 before the last step, got {stop!r}")
            path = folder / f"resume_after_{stop}.ckpt"

            def halt(step_index, timestep, latents, stop=stop):
                if step_index == stop:
                    raise StopJob()

            stopped = job_factory(view_batch_size)(steps, seed=seed, progress=False, output_type="latent",
                                                   checkpoint=Checkpoint(path, every=1), callback_on_step_end=halt)
            if stopped.metadata.get("stopped_at_step") != stop or not path.is_file():
                fail(f"resume invariance: a job stopped after step {stop} (before its last) must report "
                     f"metadata['stopped_at_step'] = {stop} and keep its checkpoint {path}")
            resumed = job_factory(resume_view_batch_size or view_batch_size)
            actual = run_latents(resumed, steps, seed, checkpoint=Checkpoint(path, resume=True))
            what = f"resume invariance: stopped after step {stop} and resumed vs uninterrupted ({steps} steps)"
            assert_same_canvas(actual, expected, what, rtol, atol)
            if path.exists():
                fail(f"resume invariance: the finished job did not remove its checkpoint {path}")
    return expected


def check_invariance(job_factory: JobFactory, steps: int = 3, seed: int = 0) -> None:
    """Every check of this module with its defaults (batch size, batch order, resume with
    the same and with other batches)."""
    check_batch_size_invariance(job_factory, steps=steps, seed=seed)
    check_batch_order_invariance(job_factory, steps=steps, seed=seed)
    check_resume_invariance(job_factory, steps=steps, seed=seed, resume_view_batch_size=2)

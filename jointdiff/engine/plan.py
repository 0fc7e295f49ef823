"""Which windows each step of a job evaluates, known before it runs: what the cost estimate
counts (:func:`jointdiff.cost.budget.estimate` takes this plan)."""

from __future__ import annotations

import copy
from typing import Any

from jointdiff.engine.shifted import evaluation_counts
from jointdiff.image.init_image import start_step


def loop_plan(engine: Any, steps: int, seed: int = 0) -> list[tuple[int, int]]:
    """``(step index, windows evaluated)`` of every step a :class:`~jointdiff.engine.loop.JointDiffusion`
    job of ``steps`` steps runs: the scheduler's timesteps for the window (a solver of order 2
    runs more), from the init image's first step (img2img ``strength``), with the windows of
    each step (``windows = "shifted"``: the seed's shifts, :func:`jointdiff.engine.shifted.evaluation_counts`)."""
    geometry, model = engine.geometry, engine.model
    if getattr(geometry, "latent_format", None) != model.latent_format:
        geometry.setup(model.latent_format)
    scheduler = copy.deepcopy(model.scheduler)
    model.set_timesteps(scheduler, steps, geometry.window_size_latent)
    count = len(scheduler.timesteps)
    first = 0
    if getattr(engine, "init", None) is not None:
        first = start_step(steps, engine.init.strength, model) * int(getattr(model.scheduler, "order", 1) or 1)
    if getattr(engine, "windows", "overlap") == "shifted":
        per_step = evaluation_counts(geometry, count, seed)
    else:
        per_step = [geometry.num_windows] * count
    return [(i, per_step[i]) for i in range(first, count)]

"""What a run amounts to, written as a job: the table a saved PNG carries so that
``jointdiff run image.png`` reproduces it (docs/job-spec.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic

from jointdiff.models.loading import FLOW_SCHEDULERS, SCHEDULERS


def job_of_engine(engine: Any, steps: int, seed: int) -> dict[str, Any]:
    """The job a :class:`~jointdiff.engine.loop.JointDiffusion` run amounts to (what ``run_job``
    records for a job), so PNGs saved from the Python API carry it too. The model's ``id``
    is the pipeline's ``name_or_path`` (absent for an unnamed pipeline object); option
    values that are no JSON (tensors, images, modules) are recorded as ``"<Type>"``."""
    model: dict[str, Any] = {"family": engine.model.name}
    name = getattr(engine.model.pipeline, "name_or_path", None)
    if name:
        model["id"] = str(name)
    scheduler = _scheduler_short_name(engine.model.scheduler)
    if scheduler is not None:
        model["scheduler"] = scheduler
    job = {
        "model": model,
        "geometry": _plugin_record(engine.geometry),
        "conditioners": [_plugin_record(c) for c in engine.conditioners],
        "synchronizer": _plugin_record(engine.synchronizer) if engine.synchronizer is not None else {"name": "none"},
        "steps": steps,
        "seed": seed,
        "view_batch_size": engine.view_batch_size,
        "eta": engine.eta,
    }
    if engine.fusion is not None:
        job["fusion"] = engine.fusion
    if getattr(engine, "windows", "overlap") != "overlap":
        job["windows"] = engine.windows
    return job


def _scheduler_short_name(scheduler: Any) -> str | None:
    names = {cls: short for short, cls in {**SCHEDULERS, **FLOW_SCHEDULERS}.items()}
    return names.get(type(scheduler).__name__)


def _plugin_record(plugin: Any) -> dict[str, Any]:
    options = getattr(plugin, "options", None)
    if not isinstance(options, pydantic.BaseModel):  # an in-process object without validated options
        return {"name": getattr(plugin, "name", type(plugin).__name__)}
    values = {key: _json_value(getattr(options, key)) for key in options.model_fields_set}
    return {"name": plugin.name, **{k: v for k, v in values.items() if v is not None}}


def _json_value(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return {k: _json_value(getattr(value, k)) for k in value.model_fields_set}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    return f"<{type(value).__name__}>"

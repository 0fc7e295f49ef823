"""A job's checkpoints: what makes a checkpoint this job's (its fingerprint), saving the
state of every window and plugin, and resuming from it (see
:class:`~jointdiff.engine.distributed.Checkpoint` for the file and its rules). ``run`` is the
engine's working state of one call (``JointDiffusion.__call__``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jointdiff.engine.distributed import (
    Checkpoint,
    is_plain,
    load_checkpoint,
    restore_windows,
    save_checkpoint,
    window_states,
)
from jointdiff.utils.errors import ConfigError
from jointdiff.utils.fingerprint import (
    config_text,
    describe_plugin,
    describe_value,
    model_identity,
    tensor_digest,
)

if TYPE_CHECKING:
    import torch

    from jointdiff.engine.loop import JointDiffusion


def fingerprint(engine: JointDiffusion, run: Any, latents: torch.Tensor | None) -> dict[str, Any]:
    """What makes a checkpoint this job's: model identity, scheduler, every plugin's
    options (prompts included), steps, seed, fusion, eta, canvas, windows, initial noise."""
    return {
        "model": model_identity(engine.model),
        "scheduler": f"{type(run.scheduler).__name__}{config_text(run.scheduler.config)}",
        "geometry": describe_plugin(engine.geometry),
        "conditioners": [describe_plugin(c) for c in engine.conditioners],
        "synchronizer": describe_plugin(engine.synchronizer) if engine.synchronizer is not None else "none()",
        "steps": len(run.timesteps),
        "seed": run.seed,
        "fusion": run.fusion_mode if engine.windows == "overlap" else f"{run.fusion_mode}, {engine.windows} windows",
        "eta": float(engine.eta),
        "canvas": list(run.canvas.shape),
        "windows": engine.geometry.num_windows,
        "latents": tensor_digest(latents) if latents is not None else "from seed",
        **({"init": engine.init.describe()} if engine.init is not None else {}),
    }

def save(engine: JointDiffusion, run: Any, checkpoint: Checkpoint, next_step: int) -> None:
    """Save the step reached, the canvas, every window's state and every plugin's state."""
    plugins = {
        "conditioners": [_plugin_state(c, f"conditioner {getattr(c, 'name', type(c).__name__)!r}") for c in engine.conditioners],
        "synchronizer": _plugin_state(engine.synchronizer, "the synchronizer") if engine.synchronizer is not None else {},
    }
    states = run.fusion.saved_states()  # a fusion with a canvas scheduler keeps its own
    if states is None:
        states = window_states(run.batches, run.fusion)
    save_checkpoint(checkpoint, run.comm, run.fingerprint, next_step, run.canvas, states, plugins)

def resume(engine: JointDiffusion, run: Any, checkpoint: Checkpoint | None) -> int:
    """The first step to run: 0, or the saved one after restoring the canvas, every
    window's state and every plugin's state from a checkpoint of this job."""
    if checkpoint is None:
        return 0
    payload = load_checkpoint(checkpoint, run.comm, run.fingerprint)
    if payload is None:
        return 0
    if not run.fusion.restore_states(payload["windows"], run.canvas.device):
        restore_windows(run.batches, run.fusion, payload["windows"], run.canvas.device)
    plugins = payload.get("plugins") or {}
    for conditioner, state in zip(engine.conditioners, plugins.get("conditioners", [])):
        if state and hasattr(conditioner, "load_state_dict"):
            conditioner.load_state_dict(state)
    if engine.synchronizer is not None and plugins.get("synchronizer"):
        engine.synchronizer.load_state_dict(plugins["synchronizer"])
    run.fusion.canvas = payload["canvas"].to(run.canvas.device)
    run.canvas = run.fusion.canvas
    return int(payload["next_step"])


def _plugin_state(plugin: Any, where: str) -> dict[str, Any]:
    """A plugin's ``state_dict()`` (``{}`` without one), checked to load with ``weights_only``."""
    getter = getattr(plugin, "state_dict", None)
    state = getter() if callable(getter) else {}
    if not isinstance(state, dict) or not is_plain(state):
        raise ConfigError(
            f"{where}: state_dict() must return a dict of tensors and plain containers "
            f"(dict, list, tuple, numbers, strings, None), got {describe_value(state)[:120]}"
        )
    return state

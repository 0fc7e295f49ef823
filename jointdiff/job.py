"""Job specs: the whole job in one TOML file (or dict), validated before any model loads.

Example::

    steps = 50
    seed = 0
    output = "panorama.png"

    [model]
    id = "tiny"            # hub id, local diffusers folder, single-file checkpoint or "tiny"
    scheduler = "ddim"

    [geometry]
    name = "strip"
    length_px = 2048

    [[conditioners]]
    name = "text"
    prompt = "a photo of a city skyline at night"

    [synchronizer]
    name = "none"

Plugin tables hold ``name`` plus that plugin's options.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal, Mapping

import pydantic

from .errors import ConfigError
from .options import format_validation_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Pixels per latent cell of every Stable Diffusion 1.x/2.x VAE; sizes are checked against
#: it before the model loads and again against the loaded VAE.
SD_LATENT_SCALE = 8


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    id: str = "tiny"
    scheduler: str | None = None
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None
    dtype: str = "auto"
    device: str = "auto"
    config: str | None = pydantic.Field(None, description="diffusers config folder for a single-file checkpoint")


class PluginSpec(pydantic.BaseModel):
    """``name`` plus the plugin's options (validated by the plugin's own ``Options``)."""

    model_config = pydantic.ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CheckpointSpec(_Strict):
    """Save the job's state every ``every`` steps to ``path``; ``resume`` continues from it."""

    path: str
    every: int = pydantic.Field(1, ge=1)
    resume: bool = True


class Job(_Strict):
    model: ModelSpec = ModelSpec()
    geometry: PluginSpec
    conditioners: list[PluginSpec]
    synchronizer: PluginSpec = PluginSpec(name="none")
    steps: int = pydantic.Field(50, ge=1)
    seed: int = 0
    view_batch_size: int = pydantic.Field(4, ge=1)
    eta: float = 0.0
    fusion: Literal["latent", "x0"] | None = None
    checkpoint: CheckpointSpec | None = None
    output: str = "jointdiff.png"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        try:
            job = cls.model_validate(dict(data))
        except pydantic.ValidationError as error:
            raise ConfigError(format_validation_error("job", error)) from None
        job.build_plugins()  # fail on unknown plugins or options now, before any model loads
        return job

    @classmethod
    def from_toml(cls, path: str | Path) -> Job:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"job file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML: {error}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> Job:
        """A job from ``.toml``, ``.json`` or a PNG written by jointdiff (its embedded job)."""
        suffix = Path(path).suffix.lower()
        if suffix == ".json":
            return cls.from_dict(_read_json(path))
        if suffix == ".png":
            from .output import read_job_metadata

            return cls.from_dict(read_job_metadata(path))
        return cls.from_toml(path)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def build_plugins(self):
        """Construct (geometry, conditioners, synchronizer) with validated options, and check
        the canvas against SD's VAE factor."""
        from .plugins import create

        geometry = create("geometry", self.geometry.name, self.geometry.options)
        conditioners = [create("conditioner", c.name, c.options) for c in self.conditioners]
        synchronizer = create("synchronizer", self.synchronizer.name, self.synchronizer.options)
        if not conditioners:
            raise ConfigError("job: conditioners is empty; add at least [[conditioners]] name = \"text\"")
        geometry.setup(SD_LATENT_SCALE)
        return geometry, conditioners, synchronizer


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"job file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON: {error}") from None


def run_job(job: Job, pipeline: Any = None, *, progress: bool = True, callback=None):
    """Run a job: load the model (unless ``pipeline`` is given), generate, return the
    :class:`~jointdiff.engine.JointResult` (not yet saved; see :func:`jointdiff.output.save_result`)."""
    from .engine import JointDiffusion
    from .models import load_pipeline

    geometry, conditioners, synchronizer = job.build_plugins()
    spec = job.model
    pipeline = load_pipeline(
        pipeline if pipeline is not None else spec.id,
        device=spec.device,
        dtype=spec.dtype,
        scheduler=spec.scheduler,
        prediction_type=spec.prediction_type,
        config=spec.config,
    )
    engine = JointDiffusion(
        pipeline, geometry, conditioners, synchronizer,
        view_batch_size=job.view_batch_size, eta=job.eta, fusion=job.fusion,
    )
    checkpoint = None
    if job.checkpoint is not None:
        from .distributed import Checkpoint

        checkpoint = Checkpoint(job.checkpoint.path, job.checkpoint.every, job.checkpoint.resume)
    result = engine(
        num_inference_steps=job.steps, seed=job.seed, progress=progress, callback=callback, checkpoint=checkpoint
    )
    result.metadata["job"] = job.to_dict()
    return result

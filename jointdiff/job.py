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

class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class LoraSpec(_Strict):
    """One LoRA: a ``.safetensors`` file or diffusers LoRA folder, and its strength.

    A ``path`` that looks local (a suffix such as ``.safetensors``, a leading ``.``, ``/`` or
    ``~``) must exist when the job is read; anything else may be a hub repository id.
    """

    path: str = pydantic.Field(min_length=1, description="local file or folder, or hub repository id")
    scale: float = pydantic.Field(1.0, allow_inf_nan=False, description="strength (negative: subtract)")
    weight_name: str | None = pydantic.Field(None, description="file inside a LoRA folder or hub repository")

    @pydantic.field_validator("path")
    @classmethod
    def _path_exists(cls, path: str) -> str:
        from .lora import validate_lora_path

        return validate_lora_path(path)

    @pydantic.field_validator("weight_name")
    @classmethod
    def _weight_name_exists(cls, weight_name: str | None, info: pydantic.ValidationInfo) -> str | None:
        from .lora import validate_weight_name

        return validate_weight_name(info.data.get("path"), weight_name)


class ModelSpec(_Strict):
    id: str = pydantic.Field("tiny", description="hub id, local diffusers folder, single-file checkpoint or a tiny model name")
    family: str | None = pydantic.Field(None, description="model family (sd, sdxl, sd3, flux, flux2, qwenimage); None: detected")
    scheduler: str | None = None
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None
    dtype: str = "auto"
    device: str = "auto"
    config: str | None = pydantic.Field(None, description="diffusers config folder for a single-file checkpoint")
    loras: list[LoraSpec] = pydantic.Field(default_factory=list, description="LoRAs applied to the model, several at once")
    offload: Literal["none", "model", "sequential"] = pydantic.Field("none", description="accelerate CPU offloading")
    positions: Literal["window", "canvas"] = pydantic.Field(
        "window", description="transformer positional ids: an ordinary image per window, or offset to the canvas"
    )


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
        the canvas and windows against the model family's latent format when the family is
        known before loading (a tiny model, ``family``, a local folder), else SD's."""
        from .families.base import SD_LATENT
        from .models import known_family
        from .plugins import create

        geometry = create("geometry", self.geometry.name, self.geometry.options)
        conditioners = [create("conditioner", c.name, c.options) for c in self.conditioners]
        synchronizer = create("synchronizer", self.synchronizer.name, self.synchronizer.options)
        if not conditioners:
            raise ConfigError("job: conditioners is empty; add at least [[conditioners]] name = \"text\"")
        family = known_family(self.model.id, self.model.family)
        geometry.setup(family.latent if family is not None else SD_LATENT)
        if family is not None and family.guidance_modes is not None and "cfg" not in family.guidance_modes:
            for spec, conditioner in zip(self.conditioners, conditioners):
                if getattr(conditioner.options, "negative_prompt", None):
                    raise ConfigError(
                        f"{spec.name}: negative_prompt = {conditioner.options.negative_prompt!r} cannot be used with "
                        f"model family {family.name!r} (guidance-distilled: no unconditional branch); remove it"
                    )
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
    from .models import load_model

    geometry, conditioners, synchronizer = job.build_plugins()
    spec = job.model
    model = load_model(
        pipeline if pipeline is not None else spec.id,
        family=spec.family,
        device=spec.device,
        dtype=spec.dtype,
        scheduler=spec.scheduler,
        prediction_type=spec.prediction_type,
        config=spec.config,
        loras=spec.loras,
        offload=spec.offload,
        options={"positions": spec.positions},
    )
    engine = JointDiffusion(
        model, geometry, conditioners, synchronizer,
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

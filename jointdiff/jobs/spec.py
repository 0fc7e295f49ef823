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

import copy
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Literal, Mapping

import pydantic

from jointdiff.core.conditioner import Conditioner, check_geometry_maps
from jointdiff.core.family import SD_LATENT
from jointdiff.core.geometry import DEFAULT_MAX_MEGAPIXELS, check_canvas_megapixels, check_fusion_option
from jointdiff.core.options import format_validation_error
from jointdiff.core.registry import create
from jointdiff.image.init_spec import InitSpec
from jointdiff.image.output import PATH_KEYS, read_job_metadata
from jointdiff.models.loading import (
    check_device_name,
    check_dtype_name,
    check_family_fits,
    check_hub_loras,
    check_model_source,
    check_scheduler_name,
    known_family,
    load_model,
    resolve_device,
    tiny_model_family,
)
from jointdiff.models.lora import LoraSpec, looks_local
from jointdiff.utils.errors import ConfigError
from jointdiff.utils.files import check_checkpoint_path
from jointdiff.utils.quiet import stdout_folded

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_SEED = 2**63 - 1
MAX_STEPS = 1000
"""The most denoising steps a job takes: the schedulers of every family are trained on 1000
timesteps (DDPM's ``num_train_timesteps``); diffusers' discrete schedulers refuse more."""
FEW_STEPS = 8
"""``fusion = "x0_renoise"`` is for models distilled to 1-8 steps (docs/fast-modes.md)."""
logger = logging.getLogger(__name__)
_noted: set[str] = set()
"""Largest seed: torch generators take 64-bit seeds; jointdiff keeps them non-negative."""


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    id: str = pydantic.Field("tiny", description="hub id, local diffusers folder, single-file checkpoint or a tiny model name")
    family: str | None = pydantic.Field(None, description="model family (sd, sdxl, sd3, flux, flux2, qwenimage); None: detected")
    scheduler: str | None = pydantic.Field(None, description="scheduler short name (ddim, euler, dpm++, flow_euler, ...); None: the model's")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None
    dtype: str = pydantic.Field("auto", description="auto, float32, float16 or bfloat16")
    device: str = pydantic.Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    config: str | None = pydantic.Field(None, description="diffusers config folder for a single-file checkpoint")
    loras: list[LoraSpec] = pydantic.Field(default_factory=list, description="LoRAs applied to the model, several at once")
    offload: Literal["none", "model", "sequential"] = pydantic.Field("none", description="accelerate CPU offloading")
    positions: Literal["window", "canvas"] = pydantic.Field(
        "window", description="transformer positional ids: an ordinary image per window, or offset to the canvas"
    )

    @pydantic.field_validator("device")
    @classmethod
    def _device_name(cls, device: str) -> str:
        if device != "auto":
            check_device_name(device)  # the name only (no torch): whether this machine has it is checked before loading
        return device

    @pydantic.field_validator("dtype")
    @classmethod
    def _dtype_name(cls, dtype: str) -> str:
        return check_dtype_name(dtype)

    @pydantic.field_validator("scheduler")
    @classmethod
    def _scheduler_name(cls, scheduler: str | None) -> str | None:
        return scheduler if scheduler is None else check_scheduler_name(scheduler)


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
    overwrite: bool = pydantic.Field(False, description="start over when the file belongs to another job (else refuse)")


class Job(_Strict):
    model: ModelSpec = ModelSpec()
    geometry: PluginSpec
    conditioners: list[PluginSpec]
    synchronizer: PluginSpec = PluginSpec(name="none")
    steps: int = pydantic.Field(50, ge=1, le=MAX_STEPS, description=f"denoising steps, 1..{MAX_STEPS}")
    seed: int = pydantic.Field(0, ge=0, le=MAX_SEED, description=f"random seed, 0..{MAX_SEED}")
    view_batch_size: pydantic.PositiveInt | Literal["auto"] = pydantic.Field(
        4, description='windows per model call, or "auto": as many as fit the free CUDA memory (4 elsewhere)'
    )
    eta: float = 0.0
    fusion: Literal["latent", "x0", "x0_renoise"] | None = pydantic.Field(
        None, description="latent (MultiDiffusion), x0 (SyncTweedies) or x0_renoise (few-step models); None: the geometry's"
    )
    windows: Literal["overlap", "shifted"] = pydantic.Field(
        "overlap", description="overlap (MultiDiffusion) or shifted (SpotDiffusion: non-overlapping, shifted every step)"
    )
    max_megapixels: float | None = pydantic.Field(
        None, gt=0, description="refuse canvases above this many megapixels; None: the engine's default (64), inf: no limit"
    )
    checkpoint: CheckpointSpec | None = None
    init: InitSpec | None = pydantic.Field(None, description="start from an image ([init], docs/from-an-image.md)")
    output: str = "jointdiff.png"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: str | Path | None = None) -> Job:
        """A validated job. With ``base``, relative paths in ``data`` (output, checkpoint,
        model, LoRAs, condition and mask images, ...) are taken relative to that folder."""
        if base is not None:
            data = resolve_paths(data, base)
        try:
            job = cls.model_validate(dict(data))
        except pydantic.ValidationError as error:
            raise ConfigError(format_validation_error("job", error)) from None
        geometry, _, _ = job.build_plugins()  # fail on unknown plugins or options now, before any model loads
        if job.init is not None:  # the files read and placed; the size only where the model's family is known

            job.init.build(geometry, check_size=known_family(job.model.id, job.model.family) is not None)
        return job

    @classmethod
    def from_toml(cls, path: str | Path) -> Job:
        """A job from a TOML file; its relative paths are relative to the file's folder."""
        return cls.from_dict(_read_toml(path), base=Path(path).parent)

    @classmethod
    def from_file(cls, path: str | Path) -> Job:
        """A job from ``.toml``, ``.json`` or a PNG written by jointdiff (its embedded job);
        relative paths in a TOML or JSON file are relative to the file's folder."""
        data, base = read_job_file(path)
        return cls.from_dict(data, base=base)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def build_plugins(self):
        """Construct (geometry, conditioners, synchronizer) with validated options, and check
        the canvas and windows against the model family's latent format when the family is
        known before loading (a tiny model, ``family``, a local folder), else SD's."""
        geometry = create("geometry", self.geometry.name, self.geometry.options)
        conditioners = [create("conditioner", c.name, c.options) for c in self.conditioners]
        synchronizer = create("synchronizer", self.synchronizer.name, self.synchronizer.options)
        if not conditioners:
            raise ConfigError("job: conditioners is empty; add at least [[conditioners]] name = \"text\"")
        family = known_family(self.model.id, self.model.family)
        if self.model.scheduler is not None and family is not None:
            try:
                check_scheduler_name(self.model.scheduler, family)
            except ConfigError as error:
                raise ConfigError(f"job: model.{error}") from None
        _check_one_prompt(self.conditioners, conditioners)
        _check_fast_modes(self, geometry)
        check_geometry_maps(geometry, conditioners)
        _check_steps_run(self, family)
        geometry.setup(family.latent if family is not None else SD_LATENT)
        check_canvas_megapixels(geometry, DEFAULT_MAX_MEGAPIXELS if self.max_megapixels is None else self.max_megapixels)
        for conditioner in conditioners:
            conditioner.check_canvas(geometry)
        if family is not None and family.guidance_modes is not None and "cfg" not in family.guidance_modes:
            for spec, conditioner in zip(self.conditioners, conditioners):
                if getattr(conditioner.options, "negative_prompt", None):
                    raise ConfigError(
                        f"{spec.name}: negative_prompt = {conditioner.options.negative_prompt!r} cannot be used with "
                        f"model family {family.name!r} (guidance-distilled: no unconditional branch); remove it"
                    )
        return geometry, conditioners, synchronizer


def _check_fast_modes(job: Job, geometry: Any) -> None:
    """``windows = "shifted"`` and ``fusion = "x0_renoise"`` where they cannot apply
    (docs/fast-modes.md), and a fusion other than ``x0`` for a geometry that needs it, before
    any model loads: ConfigError naming the option."""
    try:
        check_fusion_option(geometry, job.fusion)
    except ConfigError as error:
        raise ConfigError(f"job: {error}") from None
    if job.windows == "overlap" and job.fusion != "x0_renoise":
        return  # nothing to check; returning first keeps validation free of torch (fewstep, shifted import it)
    # lazy: loads torch; jointdiff.jobs.spec must import without it
    from jointdiff.engine.fewstep import check_fewstep

    # lazy: loads torch; jointdiff.jobs.spec must import without it
    from jointdiff.engine.shifted import check_windows_option

    try:
        check_windows_option(job.windows, geometry, job.fusion)
        if job.fusion == "x0_renoise":
            check_fewstep(geometry, job.eta)
    except ConfigError as error:
        raise ConfigError(f"job: {error}") from None


def _check_steps_run(job: Job, family: type | None) -> None:
    """Work that would do nothing, or a mode used far from its purpose, is said before the
    model loads (a note, once): an init image whose ``strength`` leaves no step of ``steps``
    to run (the rule of the family's image-to-image pipeline; the lenient flow-matching one
    where the family is not known yet), ``x0_renoise`` with more than :data:`FEW_STEPS` steps."""
    if job.init is not None:
        steps, strength = job.steps, job.init.resolved_strength()
        flow = family is None or family.flow_matching
        start = int(max(steps - steps * strength, 0)) if flow else steps - min(int(steps * strength), steps)
        if start >= steps:
            fix = f"raise steps to at least {math.ceil(1 / strength)} or strength" if strength > 0 else "raise strength above 0"
            _note_once(
                f"init strength = {strength!r} with steps = {steps} runs no denoising step (the image comes back "
                f"only re-encoded): {fix}"
            )
    if job.fusion == "x0_renoise" and job.steps > FEW_STEPS:
        _note_once(
            f"fusion = 'x0_renoise' is for few-step models (1-{FEW_STEPS} steps) and this job has steps = {job.steps}; "
            "for an ordinary model use fusion = 'x0' or 'latent' (docs/fast-modes.md)"
        )


def _note_once(message: str) -> None:
    """A notice on logger ``jointdiff.jobs.spec`` (a ``jointdiff: note:`` line in the CLI),
    once per process: a job is validated again when it runs."""
    if message not in _noted:
        _noted.add(message)
        logger.warning(message)


def _check_one_prompt(specs: list[PluginSpec], conditioners: list[Any]) -> None:
    """A job takes exactly one conditioner that provides the prompt (``text``, ``tile_text``,
    ``regions``, ...): known from the classes, before any model loads."""
    providers = [spec.name for spec, c in zip(specs, conditioners) if type(c).prompt is not Conditioner.prompt]
    if len(providers) > 1:
        raise ConfigError(
            f"conditioners: {' and '.join(repr(n) for n in providers)} both provide the prompt; a job takes "
            "exactly one prompt conditioner (combine them into one, e.g. one 'regions' or one 'tile_text')"
        )
    if not providers:
        names = [spec.name for spec in specs]
        raise ConfigError(f"conditioners: {names} provide no prompt; add one prompt conditioner, e.g. [[conditioners]] name = \"text\"")


# -- reading job files -------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
}


def read_job_file(path: str | Path) -> tuple[dict[str, Any], Path | None]:
    """The raw job of a TOML or JSON file or a jointdiff PNG, and the folder its relative
    paths are relative to (the file's; None for a PNG, whose job was written with them
    resolved). The kind is told by the content, not the suffix."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"job {str(path)!r} is a folder; give a .toml or .json job file, or a PNG made by jointdiff")
    if not path.is_file():
        raise ConfigError(f"job file {str(path)!r} does not exist")
    with path.open("rb") as handle:
        head = handle.read(12)
    if head.startswith(PNG_SIGNATURE):
        return read_job_metadata(path), None
    kind = _image_kind(head)
    if kind is not None:
        raise ConfigError(
            f"job {str(path)!r} is a {kind} image, which carries no jointdiff job: only PNGs made by jointdiff "
            "carry one (give a .toml or .json job file, or such a PNG)"
        )
    if path.suffix.lower() == ".json":
        return _read_json(path), path.parent
    return _read_toml(path), path.parent


def _image_kind(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in IMAGE_SIGNATURES.items() if head.startswith(magic)), None)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"job file {str(path)!r} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"job file {str(path)!r} is not a {what} file (not UTF-8 text)") from None


def _read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {str(path)!r} does not exist")
    try:
        return tomllib.loads(_read_text(path, "TOML"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(Path(path), "JSON"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job must be a JSON object, got {type(data).__name__}")
    return data


# -- relative paths ----------------------------------------------------------------------

"""Plugin option names whose strings are always file paths."""
MAYBE_PATH_KEYS = frozenset({"model", "path", "taesd_path"})
"""Plugin option names whose strings may be paths or hub ids (see :func:`resolve_paths`)."""


def resolve_paths(data: Mapping[str, Any], base: str | Path) -> dict[str, Any]:
    """A copy of the raw job ``data`` with its relative paths made relative to ``base``:
    ``output``, ``checkpoint.path``, LoRA files, plugin options named ``image``/``mask``
    and the ``[init]`` table's (always paths) and, where they may also be hub ids or names (``model.id``,
    ``model.config``, plugin options ``model``/``path``/``taesd_path``), those that exist
    relative to ``base`` or start with ``./`` or ``../``."""
    base = Path(base).absolute()
    data = copy.deepcopy(dict(data))
    if "output" in data:
        data["output"] = _path(data["output"], base)
    if isinstance(data.get("checkpoint"), dict) and "path" in data["checkpoint"]:
        data["checkpoint"]["path"] = _path(data["checkpoint"]["path"], base)
    if isinstance(data.get("model"), dict):
        _resolve_model(data["model"], base)
    plugin_tables = [data.get("geometry"), data.get("synchronizer"), *(data.get("conditioners") or []), data.get("init")]
    for table in plugin_tables:
        _resolve_options(table, base)
    return data


def _resolve_model(model: dict[str, Any], base: Path) -> None:
    if isinstance(model.get("id"), str) and tiny_model_family(model["id"]) is None:
        model["id"] = _maybe_path(model["id"], base)
    if "config" in model:
        model["config"] = _maybe_path(model["config"], base)
    for lora in model.get("loras") or []:
        if isinstance(lora, dict) and "path" in lora:
            lora["path"] = _lora_path(lora["path"], base)


def _resolve_options(table: Any, base: Path) -> None:
    """Resolve path-like option values in a plugin table, nested tables and lists included."""
    if isinstance(table, list):
        for item in table:
            _resolve_options(item, base)
        return
    if not isinstance(table, dict):
        return
    for key, value in table.items():
        if key in PATH_KEYS:
            table[key] = [_path(v, base) for v in value] if isinstance(value, list) else _path(value, base)
        elif key in MAYBE_PATH_KEYS and isinstance(value, str):
            table[key] = _maybe_path(value, base)
        elif key != "name":
            _resolve_options(value, base)


def _relative(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and not value.startswith("~") and not Path(value).is_absolute()


def _join(base: Path, value: str) -> str:
    """``base/value`` with ``..`` folded (``examples/../out/x.png`` → ``out/x.png``)."""
    return os.path.normpath(base / value)


def _path(value: Any, base: Path) -> Any:
    return _join(base, value) if _relative(value) else value


def _maybe_path(value: Any, base: Path) -> Any:
    explicit = isinstance(value, str) and value.startswith(("./", "../", ".\\", "..\\"))
    if _relative(value) and (explicit or (base / value).exists()):
        return _join(base, value)
    return value


def _lora_path(value: Any, base: Path) -> Any:
    if _relative(value) and (looks_local(value) or (base / value).exists()):
        return _join(base, value)
    return value


# -- before loading ----------------------------------------------------------------------


def check_before_loading(job: Job) -> None:
    """What can be known before diffusers or the model loads: the device exists on this
    machine, a local model is a model. (Plugins and options are checked by
    :meth:`Job.from_dict`; the output by :func:`jointdiff.image.output.check_writable`.)"""
    resolve_device(job.model.device)
    check_model_source(job.model.id)
    check_family_fits(job.model.id, job.model.family)
    check_hub_loras(job.model.loras)
    if job.checkpoint is not None:
        check_checkpoint_path(job.checkpoint.path)


# -- the job of a composed engine --------------------------------------------------------


def load_job_model(spec: ModelSpec, pipeline: Any = None):
    """The :class:`~jointdiff.core.family.ModelFamily` of a job's ``[model]`` table: loaded from
    ``spec.id`` (or bound to ``pipeline``), with its scheduler, LoRAs, device and dtype."""
    with stdout_folded("loading the model"):  # a library's prints: one note, never on stdout
        return load_model(
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


def run_job(job: Job, pipeline: Any = None, *, progress: bool = True, callback=None, model: Any = None):
    """Run a job: load the model (unless ``pipeline`` or an already loaded ``model``, as
    :func:`load_job_model` returns it, is given), generate, return the
    :class:`~jointdiff.engine.loop.JointResult` (not yet saved; see :func:`jointdiff.image.output.save_result`)."""
    # lazy: loads torch; jointdiff.jobs.spec must import without it
    from jointdiff.engine.loop import JointDiffusion
    geometry, conditioners, synchronizer = job.build_plugins()
    if model is None:
        if pipeline is None:
            check_before_loading(job)
        model = load_job_model(job.model, pipeline)
    init = None
    if job.init is not None:  # placed on the canvas of this model's latent format
        geometry.setup(model.latent_format)
        init = job.init.build(geometry)
    engine = JointDiffusion(
        model, geometry, conditioners, synchronizer, init=init,
        view_batch_size=job.view_batch_size, eta=job.eta, fusion=job.fusion, windows=job.windows,
        **({} if job.max_megapixels is None else {"max_megapixels": job.max_megapixels}),
    )
    checkpoint = None
    if job.checkpoint is not None:
        # lazy: loads torch; jointdiff.jobs.spec must import without it
        from jointdiff.engine.distributed import Checkpoint

        spec = job.checkpoint
        checkpoint = Checkpoint(spec.path, spec.every, spec.resume, overwrite=spec.overwrite)
    result = engine(
        num_inference_steps=job.steps, seed=job.seed, progress=progress, callback=callback, checkpoint=checkpoint
    )
    result.metadata["job"] = job.to_dict()
    result.metadata["job"]["geometry"].update(filled_options(job.geometry, geometry))
    return result


def filled_options(spec: PluginSpec, plugin: Any) -> dict[str, Any]:
    """Options the job left out that the plugin filled in with other than their default
    (e.g. the ``mesh`` geometry's file ``sha256``), so that the saved job reruns the same."""
    given, fields = spec.options, type(plugin.options).model_fields
    dumped = plugin.options.model_dump(mode="json")
    return {key: value for key, value in dumped.items()
            if key not in given and key in fields and value != fields[key].default and value is not None}

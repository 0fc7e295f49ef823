"""LoRAs: several at once, loaded through diffusers' LoRA loaders (the peft backend).

Each LoRA of a job (``[model] loras = [{ path = "...", scale = 0.8 }, ...]``) is loaded as
its own named adapter (``lora_0``, ``lora_1``, ...) and all of them are activated together
with their scales. Problems are reported as one-line :class:`~jointdiff.utils.errors.ConfigError`
naming ``loras[i].path`` and its value:

* a local path (a file suffix such as ``.safetensors``, a leading ``.``, ``/`` or ``~``, or
  more than one ``/``) that does not exist — checked before any model loads by
  :func:`check_lora_paths`, which the job's :class:`LoraSpec` validation also uses;
* a pipeline whose family has no LoRA support;
* a LoRA that does not fit the model: diffusers refuses it, or it loads without error but
  none of its layers landed in the denoiser or a text encoder (its keys match nothing).

Anything else (``owner/name``) is taken as a Hugging Face hub repository.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pydantic
import pydantic_core

from jointdiff.utils.errors import ConfigError

__all__ = ["LoraSpec", "LORA_SUFFIXES", "check_lora_paths", "load_loras", "looks_local", "lora_path_problem"]

logger = logging.getLogger(__name__)

_DIFFUSERS_LORA_LOGGERS = ("diffusers.loaders.peft", "diffusers.loaders.lora_base")

LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
"""File suffixes that mark a LoRA path as a local file."""


# -- paths ---------------------------------------------------------------------------------


def looks_local(path: str) -> bool:
    """Whether ``path`` can only mean a local file or folder (not a hub repository id).

    Hub ids are ``owner/name``: a LoRA file suffix, a leading ``.``, ``/`` or ``~``, an
    absolute path, a backslash or a second ``/`` all mark a local path.
    """
    return (
        Path(path).suffix.lower() in LORA_SUFFIXES
        or path.startswith((".", "/", "~"))
        or os.path.isabs(path)
        or "\\" in path
        or path.count("/") >= 2
    )


def local_path(path: str) -> Path:
    """``path`` with ``~`` expanded."""
    return Path(path).expanduser()


def lora_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a LoRA (a local path that is missing, or a folder without
    weights), or None when it exists or may be a hub repository id."""
    if not path.strip():
        return "the path is empty"
    where = local_path(path)
    if not where.exists():
        return "no such LoRA file or folder" if looks_local(path) else None
    if where.is_dir() and not _weight_files(where):
        return f"the folder holds no LoRA weights file ({', '.join(LORA_SUFFIXES)})"
    return None


def weight_name_problem(path: str, weight_name: str | None) -> str | None:
    """Why ``weight_name`` cannot be found in the local LoRA folder ``path``, or None."""
    where = local_path(path)
    if weight_name is None or not where.is_dir():
        return None
    if not (where / weight_name).is_file():
        return f"the LoRA folder {path!r} has no file {weight_name!r}"
    return None


def validate_lora_path(path: str) -> str:
    """Pydantic check of ``LoraSpec.path``: the path, or a validation error saying why not."""
    problem = lora_path_problem(path)
    if problem is not None:
        raise pydantic_core.PydanticCustomError("lora_path", "{problem}", {"problem": problem})
    return path


def validate_weight_name(path: str | None, weight_name: str | None) -> str | None:
    """Pydantic check of ``LoraSpec.weight_name`` against the (already valid) ``path``."""
    problem = weight_name_problem(path, weight_name) if path is not None else None
    if problem is not None:
        raise pydantic_core.PydanticCustomError("lora_weight_name", "{problem}", {"problem": problem})
    return weight_name


def _weight_files(folder: Path) -> list[Path]:
    return [item for item in folder.iterdir() if item.is_file() and item.suffix.lower() in LORA_SUFFIXES]


class LoraSpec(pydantic.BaseModel):
    """One LoRA: a ``.safetensors`` file or diffusers LoRA folder, and its strength.

    A ``path`` that looks local (a suffix such as ``.safetensors``, a leading ``.``, ``/`` or
    ``~``) must exist when the job is read; anything else may be a hub repository id.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    path: str = pydantic.Field(min_length=1, description="local file or folder, or hub repository id")
    scale: float = pydantic.Field(1.0, allow_inf_nan=False, description="strength (negative: subtract)")
    weight_name: str | None = pydantic.Field(None, description="file inside a LoRA folder or hub repository")

    @pydantic.field_validator("path")
    @classmethod
    def _path_exists(cls, path: str) -> str:
        return validate_lora_path(path)

    @pydantic.field_validator("weight_name")
    @classmethod
    def _weight_name_exists(cls, weight_name: str | None, info: pydantic.ValidationInfo) -> str | None:
        return validate_weight_name(info.data.get("path"), weight_name)


def as_lora_spec(item: LoraSpec | Mapping[str, Any], index: int) -> LoraSpec:
    """A :class:`LoraSpec` from a spec or a mapping (``path``, ``scale``, ``weight_name``)."""
    if isinstance(item, LoraSpec):
        return item
    if not isinstance(item, Mapping):
        raise ConfigError(f"loras[{index}] = {item!r}: expected a table with path, scale and weight_name")
    try:
        return LoraSpec.model_validate(dict(item))
    except pydantic.ValidationError as error:
        raise ConfigError(_validation_message(index, error)) from None


def _validation_message(index: int, error: pydantic.ValidationError) -> str:
    parts = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            parts.append(f"loras[{index}]: unknown option {where!r} (options: path, scale, weight_name)")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            parts.append(f"loras[{index}].{where} = {problem.get('input')!r}: {message}")
    return "; ".join(parts)


def check_lora_paths(loras: Iterable[LoraSpec | Mapping[str, Any]]) -> list[LoraSpec]:
    """Check every LoRA's local path (and ``weight_name`` inside a local folder) without
    loading anything; returns the LoRAs as :class:`LoraSpec`. ConfigError names the first
    bad one as ``loras[i].path``."""
    specs = []
    for index, item in enumerate(loras):
        spec = as_lora_spec(item, index)
        problem = lora_path_problem(spec.path)
        if problem is not None:
            raise ConfigError(f"loras[{index}].path = {spec.path!r}: {problem}")
        problem = weight_name_problem(spec.path, spec.weight_name)
        if problem is not None:
            raise ConfigError(f"loras[{index}].weight_name = {spec.weight_name!r}: {problem}")
        specs.append(spec)
    return specs


# -- loading -------------------------------------------------------------------------------


def load_loras(model: Any, loras: Sequence[LoraSpec | Mapping[str, Any]]) -> list[str]:
    """Load ``loras`` into ``model`` (a :class:`~jointdiff.core.family.ModelFamily`, or a
    diffusers pipeline) and activate all of them with their scales.

    Returns the adapter names, one per LoRA. On any error the adapters loaded by this call
    are removed again and a one-line ConfigError naming ``loras[i].path`` is raised.
    """
    specs = check_lora_paths(loras)
    if not specs:
        return []
    pipeline = getattr(model, "pipeline", model)
    _check_support(model, pipeline)
    names = _adapter_names(pipeline, len(specs))
    loaded: list[str] = []
    try:
        for index, (spec, name) in enumerate(zip(specs, names)):
            _load_one(pipeline, spec, name, index)
            loaded.append(name)
        pipeline.set_adapters(names, adapter_weights=[spec.scale for spec in specs])
    except BaseException:
        _remove_adapters(pipeline, loaded)
        raise
    logger.info("loaded LoRAs %s", ", ".join(f"{spec.path} × {spec.scale}" for spec in specs))
    return names


def _check_support(model: Any, pipeline: Any) -> None:
    """ConfigError when the pipeline cannot load LoRAs (no loader, or no peft)."""
    family = getattr(model, "name", None) or type(pipeline).__name__
    if not callable(getattr(pipeline, "load_lora_weights", None)):
        raise ConfigError(f"loras: model family {family!r} ({type(pipeline).__name__}) has no LoRA support; remove loras")
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise ConfigError("loras: loading LoRAs needs the peft package (pip install peft)")


def _adapter_names(pipeline: Any, count: int) -> list[str]:
    """``lora_0`` .. ``lora_{count-1}``, skipping names the pipeline already uses."""
    taken = {name for names in _list_adapters(pipeline).values() for name in names}
    names: list[str] = []
    candidate = 0
    while len(names) < count:
        if f"lora_{candidate}" not in taken:
            names.append(f"lora_{candidate}")
        candidate += 1
    return names


def _list_adapters(pipeline: Any) -> dict[str, list[str]]:
    lister = getattr(pipeline, "get_list_adapters", None)
    return dict(lister()) if callable(lister) else {}


def _load_one(pipeline: Any, spec: LoraSpec, adapter_name: str, index: int) -> None:
    """Load one LoRA as ``adapter_name``; ConfigError when diffusers refuses it or when none
    of its layers landed in a component of the pipeline."""
    source = str(local_path(spec.path)) if local_path(spec.path).exists() else spec.path
    kwargs = {"weight_name": spec.weight_name} if spec.weight_name else {}
    where = f"loras[{index}].path = {spec.path!r}"
    try:
        with _quiet_loading(), warnings.catch_warnings(record=True) as caught:  # _quiet_loading's filters hold
            pipeline.load_lora_weights(source, adapter_name=adapter_name, **kwargs)
    except Exception as error:  # the one-line error says it all; the library's warnings are dropped
        mismatch = _SIZE_MISMATCH.search(str(error))
        if mismatch:
            raise ConfigError(
                f"{where}: its weights do not fit {type(pipeline).__name__} (layer {mismatch['layer']!r} is "
                f"{mismatch['theirs']} in the LoRA, {mismatch['ours']} in the model); it is a LoRA for another "
                "model family or size: use one made for this model"
            ) from error
        hint = "" if local_path(spec.path).exists() else " (no such local path; tried as a Hugging Face hub repository)"
        raise ConfigError(
            f"{where}: could not load the LoRA into {type(pipeline).__name__}{hint}: {_one_line(error)}"
        ) from error
    for warning in caught:  # loaded: the library's warnings are said as they were
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not injected_layers(pipeline, adapter_name):
        raise ConfigError(
            f"{where}: none of the LoRA's weights fit {type(pipeline).__name__} "
            "(its keys match no layer of the denoiser or text encoders); is it a LoRA for another model family?"
        )


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<layer>[\w.]+): copying a param with shape (?P<theirs>torch\.Size\(\[[\d, ]*\]\)) "
    r"from checkpoint, the shape in current model is (?P<ours>torch\.Size\(\[[\d, ]*\]\))"
)
"""torch's ``load_state_dict`` message for a weight of another shape (a LoRA for another model)."""


class _DropLoadingNotices(logging.Filter):
    """Drops diffusers' "No LoRA keys associated to <component>" warnings (a LoRA for the
    denoiser alone is normal; one that lands nowhere is refused by :func:`_load_one`) and
    its multi-line "Loading <adapter> was unsuccessful" log (the exception, re-raised as a
    one-line ConfigError with the original chained, says the same)."""

    PREFIXES = ("No LoRA keys associated to", "Loading lora_")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence the notices of loading several LoRAs on purpose (peft's "multiple adapters"
    warning, diffusers' notices above); other warnings and logs pass."""
    quiet = _DropLoadingNotices()
    loggers = [logging.getLogger(name) for name in _DIFFUSERS_LORA_LOGGERS]
    for each in loggers:
        each.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            yield
    finally:
        for each in loggers:
            each.removeFilter(quiet)


def injected_layers(pipeline: Any, adapter_name: str) -> dict[str, int]:
    """How many layers of each pipeline component hold adapter ``adapter_name`` (components
    without any are left out)."""
    counts = {}
    for component, module in _modules(pipeline):
        count = sum(_holds_adapter(layer, adapter_name) for layer in module.modules())
        if count:
            counts[component] = count
    return counts


def _modules(pipeline: Any) -> list[tuple[str, Any]]:
    import torch

    components = getattr(pipeline, "components", {}) or {}
    return [(name, module) for name, module in components.items() if isinstance(module, torch.nn.Module)]


def _holds_adapter(layer: Any, adapter_name: str) -> bool:
    """Whether ``layer`` is a peft tuner layer with weights of ``adapter_name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(layer, BaseTunerLayer):
        return False
    for attribute in layer.adapter_layer_names:
        weights = getattr(layer, attribute, None)
        if weights is not None and adapter_name in weights:
            return True
    return False


def _remove_adapters(pipeline: Any, names: Sequence[str]) -> None:
    """Best effort: delete the adapters ``names`` (after a failed load)."""
    present = {name for found in _list_adapters(pipeline).values() for name in found}
    doomed = [name for name in names if name in present]
    if doomed:
        try:
            pipeline.delete_adapters(doomed)
        except Exception as error:  # the ConfigError being raised matters more
            logger.warning("could not remove LoRA adapters %s: %s", doomed, _one_line(error))


def _one_line(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line: the first two non-empty lines, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2]) or "(no message)"
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(error).__name__}: {text}"

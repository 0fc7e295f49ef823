"""Loading models of every family: tiny, local folder, single file, hub id, pipeline object."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from jointdiff.core.family import ModelFamily
from jointdiff.core.registry import get_registry
from jointdiff.models.lora import as_lora_spec, load_loras, local_path, looks_local
from jointdiff.utils.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    import torch

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
}
FLOW_SCHEDULERS = {"flow_euler": "FlowMatchEulerDiscreteScheduler"}
DTYPE_NAMES = ("float32", "float16", "bfloat16")
"""The dtypes a job may name (``torch.float32``, ...; names, so a job is checked without torch)."""
DEVICE_TYPES = (
    "cpu", "cuda", "mps", "xpu", "hip", "meta", "xla", "hpu", "mtia", "maia", "ipu", "lazy", "vulkan",
    "ve", "fpga", "ideep", "mkldnn", "opengl", "opencl", "privateuseone",
)
"""The device types ``torch.device`` accepts (``TYPE`` or ``TYPE:N``), checked without torch."""
DEVICE_PATTERN = re.compile(r"([a-z]+)(?::(?:0|[1-9][0-9]*))?\Z")
OFFLOAD_MODES = ("none", "model", "sequential")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU. A device this machine lacks (``cuda``
    without CUDA, ``mps`` off Apple silicon, ``cuda:3`` with two GPUs) is a ConfigError."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parsed = parse_device(device)
    check_device_available(parsed)
    return parsed


def check_device_name(device: str) -> str:
    """``device`` when it names a torch device (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ... as
    :data:`DEVICE_TYPES`), checked without importing torch; ConfigError naming it otherwise.
    Whether this machine has it: :func:`check_device_available`, before loading."""
    match = DEVICE_PATTERN.match(device) if isinstance(device, str) else None
    if match is None or match.group(1) not in DEVICE_TYPES:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    return device


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`; ConfigError naming the value when it is none."""
    import torch

    if isinstance(device, str):
        check_device_name(device)
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from None


def check_device_available(device: torch.device) -> None:
    """ConfigError naming ``device`` when this machine cannot run it (checked before loading)."""
    problem = _device_problem(device)
    if problem is not None:
        raise ConfigError(f"device = {str(device)!r}: {problem}; use device = 'cpu' or 'auto'")


def _device_problem(device: torch.device) -> str | None:
    import torch

    if device.type == "cpu" or device.type == "meta":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            return f"CUDA is not available on this machine ({why})"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA device(s), numbered 0..{count - 1}"
        return None
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        return None if mps is not None and mps.is_available() else "MPS (Apple silicon) is not available on this machine"
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        return f"{device.type.upper()} is not available on this machine"
    return None


def check_dtype_name(dtype: str) -> str:
    """``dtype`` when it is ``"auto"`` or a name in :data:`DTYPE_NAMES`; ConfigError otherwise."""
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    return dtype


def schedulers_for(family: type | None) -> dict[str, str]:
    """Short scheduler names a model family takes: flow-matching families
    :data:`FLOW_SCHEDULERS`, the others :data:`SCHEDULERS`; both when the family is unknown."""
    if family is None:
        return {**SCHEDULERS, **FLOW_SCHEDULERS}
    return FLOW_SCHEDULERS if family.flow_matching else SCHEDULERS


def check_scheduler_name(name: str, family: type | None = None) -> str:
    """``name`` when ``family`` (None: not known yet) takes it; ConfigError listing the names."""
    allowed = schedulers_for(family)
    if name not in allowed:
        which = f" for model family {family.name!r}" if family is not None else ""
        raise ConfigError(f"scheduler must be one of {sorted(allowed)}{which}, got {name!r}")
    return name


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, family: type | None = None) -> torch.dtype:
    """``"auto"``: the family's CUDA dtype (float16 for UNets, bfloat16 for transformers) on
    CUDA, float32 elsewhere. A family's ``cuda_dtype`` is a dtype name (a ``torch.dtype`` is
    taken too)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        dtype = family.cuda_dtype if family is not None else "float16"
        return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    return getattr(torch, check_dtype_name(dtype))


def make_scheduler(name: str, base_config: Any, prediction_type: str | None = None, model: ModelFamily | None = None):
    """A diffusers scheduler by short name, built from the model's own scheduler config."""
    import diffusers

    if model is not None and model.flow_matching:
        if name not in FLOW_SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {sorted(FLOW_SCHEDULERS)} for model family {model.name!r}, got {name!r}")
        return getattr(diffusers, FLOW_SCHEDULERS[name]).from_config(base_config)
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    if name == "dpm++":
        overrides.setdefault("algorithm_type", "dpmsolver++")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base_config, **overrides)


def family_classes() -> dict[str, type]:
    """Every registered model family class by name (built-in and third-party)."""
    return {name: info.cls for name, info in get_registry().entries["family"].items()}


def family_class(name: str) -> type:
    """The family class registered as ``name``; ConfigError listing the families otherwise."""
    return get_registry().get("family", name)


def tiny_model_family(model: str) -> type | None:
    """The family that builds the built-in tiny model ``model`` (e.g. ``"tiny-flux"``), or None."""
    for cls in family_classes().values():
        if model in cls.tiny_models:
            return cls
    return None


def family_of_folder(path: Path) -> type | None:
    """The family of a local diffusers folder, from the pipeline class in ``model_index.json``."""
    index = path / "model_index.json"
    if not index.is_file():
        return None
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, json.JSONDecodeError):
        return None
    return family_for_class_name(class_name)


def family_for_class_name(class_name: str | None) -> type | None:
    for cls in family_classes().values():
        if class_name in cls.pipeline_classes:
            return cls
    return None


def known_family(model: Any, family: str | None = None) -> type | None:
    """The family of ``model`` when it can be known without loading anything (an explicit
    ``family``, a tiny model name, a local folder's ``model_index.json``, a pipeline object).
    A forced ``family`` that contradicts what the model shows is refused
    (:func:`check_family_fits`)."""
    if family is not None:
        check_family_fits(model, family)
        return family_class(family)
    return detected_family(model)


def detected_family(model: Any) -> type | None:
    """The family ``model`` itself shows without loading (a tiny model name, a local folder's
    ``model_index.json``, a pipeline object's class), or None."""
    if isinstance(model, str):
        return tiny_model_family(model) or family_of_folder(Path(model).expanduser())
    if isinstance(model, ModelFamily):
        return type(model)
    return family_for_class_name(type(model).__name__)


def check_family_fits(model: Any, family: str | None) -> None:
    """ConfigError when the forced ``family`` is not the family ``model`` shows before
    loading (``--family flux`` on the SD model ``tiny``); names both. A single-file
    checkpoint or a hub id shows nothing here; it is checked once loaded
    (:func:`check_pipeline_fits`)."""
    if family is None:
        return
    forced, detected = family_class(family), detected_family(model)
    if detected is not None and detected is not forced:
        what = f"model {model!r}" if isinstance(model, str) else f"the {type(model).__name__} given"
        raise ConfigError(
            f"family = {family!r} does not fit {what}, which is a {detected.name!r} model "
            f"({detected.pipeline_classes[0]}): remove the family setting (it is detected) or use a {family!r} model"
        )


def check_pipeline_fits(pipeline: Any, cls: type, model: Any) -> None:
    """ConfigError when a loaded ``pipeline`` is not of the (forced) family ``cls``: it is
    another family's pipeline, or lacks a component ``cls``'s stock pipeline requires
    (the parameters of its ``__init__`` without a default, e.g. ``transformer`` for FLUX)."""
    import inspect

    if cls.accepts(pipeline):
        return
    name, other = type(pipeline).__name__, family_for_class_name(type(pipeline).__name__)
    where = f"model {model!r}" if isinstance(model, str) else f"the {name} given"
    if other is not None:
        raise ConfigError(
            f"family = {cls.name!r} does not fit {where}: it loaded as a {name}, a {other.name!r} model; "
            f"remove the family setting or set family = {other.name!r}"
        )
    import diffusers

    stock = getattr(diffusers, cls.pipeline_classes[0], None)
    if stock is None:
        return
    needed = [p.name for p in inspect.signature(stock.__init__).parameters.values()
              if p.default is inspect.Parameter.empty and p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    missing = [part for part in needed if part not in getattr(pipeline, "components", {})]
    if missing:
        raise ConfigError(
            f"family = {cls.name!r} does not fit {where}: a {name} without {', '.join(missing)}, "
            f"which {cls.pipeline_classes[0]} needs; set the family of this model"
        )


def as_model(model: Any, family: str | None = None, options: Any = None) -> ModelFamily:
    """A :class:`ModelFamily` bound to ``model`` (returned as is when it already is one): the
    family is named by ``family`` or detected from the pipeline's class."""
    if isinstance(model, ModelFamily):
        return model
    cls = known_family(model, family)
    if cls is not None and family is not None:
        check_pipeline_fits(model, cls, model)
    if cls is None:
        supported = ", ".join(f"{name} ({', '.join(c.pipeline_classes[:1])})" for name, c in sorted(family_classes().items()))
        raise ConfigError(
            f"model: {type(model).__name__} is not a pipeline of a supported model family; supported: {supported}"
        )
    return cls(model, options)


def _import(target: str):
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _looks_like_path(model: str) -> bool:
    return Path(model).suffix in SINGLE_FILE_SUFFIXES or model.startswith((".", "/", "~")) or os.sep * 2 in model


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack")


def model_source_problem(model: str) -> str | None:
    """What is wrong with ``model`` as a local model, known without loading anything (a
    missing path, a folder that is no diffusers pipeline, a file that is no checkpoint), or
    None for a tiny model name, a usable-looking local model or a hub id."""
    if tiny_model_family(model) is not None:
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        problem = _folder_problem(path)
        return f"model folder {model!r} {problem}" if problem else None
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            return f"model file {model!r} is not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})"
        return None
    if _looks_like_path(model):
        return f"model path {model!r} does not exist"
    return None


def _folder_problem(path: Path) -> str | None:
    """Why the folder ``path`` is no loadable diffusers pipeline folder, or None."""
    index = path / "model_index.json"
    if not index.is_file():
        return "has no model_index.json: it is not a diffusers pipeline folder"
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        return f"has an unreadable model_index.json ({type(error).__name__}: {error})"
    if not isinstance(entries, dict):
        return "has a model_index.json that is not a JSON object"
    for name, value in entries.items():
        if name.startswith("_") or not (isinstance(value, list) and len(value) == 2 and value[0]):
            continue
        problem = _component_problem(path / name)
        if problem:
            return f"lists component {name!r} in model_index.json, but {problem}"
    return None


def _component_problem(folder: Path) -> str | None:
    if not folder.is_dir():
        return f"the folder {folder.name + '/'!r} is missing"
    files = [p.name for p in folder.iterdir()]
    if not files:
        return f"the folder {folder.name + '/'!r} is empty"
    if "config.json" in files and not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        return f"{folder.name + '/'!r} has config.json but no weights ({', '.join(WEIGHT_SUFFIXES[:2])})"
    return None


def check_model_source(model: Any) -> None:
    """ModelLoadError when ``model`` names a local model that cannot load (see
    :func:`model_source_problem`), or a hub id that cannot load because the hub is evidently
    out of reach and the id is not cached (:func:`check_hub_model`); checked before diffusers
    is imported."""
    if isinstance(model, str):
        problem = model_source_problem(model)
        if problem:
            raise ModelLoadError(problem)
        if tiny_model_family(model) is None and not Path(model).expanduser().exists():
            check_hub_model(model)


HUB_PROBE_TIMEOUT_S = 2.0
_hub_reach: dict[str, str | None] = {}


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub is evidently out of reach, or None: ``HF_HUB_OFFLINE`` is set,
    or the hub's host does not answer a TCP connection within :data:`HUB_PROBE_TIMEOUT_S`
    (not probed behind a proxy, which may reach it when we cannot). Asked once per process;
    without this, huggingface_hub retries for half a minute before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False"):
        return "HF_HUB_OFFLINE is set"
    if "reason" not in _hub_reach:
        _hub_reach["reason"] = _probe_hub()
    return _hub_reach["reason"]


def _probe_hub() -> str | None:
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as error:
        return f"no network: {host} cannot be reached ({type(error).__name__})"
    return None


def _cached(repo: str, filename: str) -> bool:
    """Whether the local hub cache holds ``filename`` of ``repo``; the hub is switched off for
    this process first (``HF_HUB_OFFLINE=1``, read by huggingface_hub when it is imported), so
    that loading reads the cache without retries."""
    if "huggingface_hub" not in sys.modules:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


def check_hub_loras(loras: Sequence[Any]) -> None:
    """ConfigError for a LoRA given as a hub id while the hub is out of reach
    (:func:`hub_unreachable`) and the id's weights are not in the local cache."""
    for index, item in enumerate(loras):
        spec = as_lora_spec(item, index)
        if looks_local(spec.path) or local_path(spec.path).exists():
            continue
        reason = hub_unreachable()
        if reason is None:
            return
        if not _cached(spec.path, spec.weight_name or "pytorch_lora_weights.safetensors"):
            raise ConfigError(
                f"loras[{index}].path = {spec.path!r} is a hub id, but the Hugging Face hub is out of reach ({reason}) "
                "and it is not in the local cache: pass a local LoRA file (.safetensors) or folder"
            )


def check_hub_model(model: str) -> None:
    """When the hub is out of reach (:func:`hub_unreachable`): ModelLoadError unless ``model``
    is in the local hub cache; if it is, the hub is switched off for this process
    (``HF_HUB_OFFLINE=1``) so that loading reads the cache without retries."""
    reason = hub_unreachable()
    if reason is None or _cached(model, "model_index.json"):
        return
    raise ModelLoadError(
        f"could not load model {model!r} from the Hugging Face hub (offline or unreachable: {reason}) and it is "
        "not in the local cache: pass a local diffusers folder, a single-file checkpoint (.safetensors/.ckpt), "
        "or 'tiny' for the built-in offline test model"
    )


def _load_from_string(model: str, dtype: torch.dtype, config: str | None, family: type | None):
    tiny = tiny_model_family(model)
    if tiny is not None:
        return _import(tiny.tiny_models[model])()
    check_model_source(model)
    import diffusers

    path = Path(model).expanduser()
    if family is None and not path.exists():
        family = _hub_family(model)
    loader = getattr(diffusers, family.pipeline_classes[0]) if family is not None else diffusers.DiffusionPipeline
    kwargs = {"torch_dtype": dtype, **(family.load_kwargs if family is not None else {})}
    if path.is_dir():
        return loader.from_pretrained(str(path), **kwargs)
    if path.is_file():
        single = {"torch_dtype": dtype}
        if config:
            single["config"] = config
        if family is None:
            loader = diffusers.StableDiffusionPipeline
        return loader.from_single_file(str(path), **single)
    return loader.from_pretrained(model, **kwargs)


def _hub_family(model: str) -> type | None:
    """The family of a hub id from its ``model_index.json`` (one small file), or None."""
    from huggingface_hub import hf_hub_download

    index = hf_hub_download(model, "model_index.json")
    class_name = json.loads(Path(index).read_text(encoding="utf-8")).get("_class_name")
    found = family_for_class_name(class_name)
    if found is None:
        raise ConfigError(f"model {model!r} is a {class_name}, which no model family supports; supported: {', '.join(sorted(family_classes()))}")
    return found


def load_model(
    model: Any = "tiny",
    *,
    family: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    scheduler: str | None = None,
    prediction_type: str | None = None,
    config: str | None = None,
    loras: Sequence[Any] = (),
    offload: str = "none",
    options: Any = None,
) -> ModelFamily:
    """Load a model and bind it to its family.

    ``model`` is a built-in tiny model name (``"tiny"``, ``"tiny-sdxl"``, ``"tiny-flux"``, ...),
    a local diffusers folder, a single-file checkpoint (``config`` names its diffusers config
    folder when offline; ``family`` names its family, SD by default), a hub id, a diffusers
    pipeline object or a :class:`ModelFamily`. ``family`` forces the family; otherwise it is
    detected from the pipeline class. ``scheduler`` replaces the scheduler by short name;
    ``loras`` are :class:`~jointdiff.models.lora.LoraSpec` (or dicts with ``path`` and ``scale``);
    ``offload`` is ``"none"``, ``"model"`` or ``"sequential"`` (accelerate's CPU offload).
    """
    cls = known_family(model, family) if not isinstance(model, ModelFamily) else type(model)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, cls)
    if isinstance(model, ModelFamily):
        bound = model
    else:
        pipeline = model
        if isinstance(model, str):
            try:
                pipeline = _load_from_string(model, dtype, config, cls)
            except (ModelLoadError, ConfigError):
                raise
            except Exception as error:
                raise ModelLoadError(_explain_load_failure(model, error)) from error
            _name(pipeline, model)
        if family is not None:
            check_pipeline_fits(pipeline, cls, model)
        bound = as_model(pipeline, family, options)
    pipeline = bound.pipeline
    if scheduler or prediction_type:
        name = scheduler or _scheduler_name(pipeline.scheduler)
        pipeline.scheduler = make_scheduler(name, pipeline.scheduler.config, prediction_type, bound)
    if loras:
        check_hub_loras(loras)
        load_loras(bound, loras)
    _place(bound, device, dtype, offload)
    return bound


def _name(pipeline: Any, model: str) -> None:
    """Record what the pipeline was loaded from where diffusers does (``name_or_path``),
    for tiny models too: the job saved with an image names its model."""
    config = getattr(pipeline, "config", None)
    if config is not None and not config.get("_name_or_path") and hasattr(pipeline, "register_to_config"):
        pipeline.register_to_config(_name_or_path=model)


def _place(model: ModelFamily, device: torch.device, dtype: torch.dtype, offload: str) -> None:
    """Move every component to ``device`` / ``dtype`` (the VAE stays float32 on the CPU in
    float16, which the CPU cannot run), or hand them to accelerate's offloading."""
    import torch

    if offload not in OFFLOAD_MODES:
        raise ConfigError(f"offload must be one of {list(OFFLOAD_MODES)}, got {offload!r}")
    if offload != "none" and device.type == "cpu":
        raise ConfigError(
            f"offload = {offload!r} keeps weights on the CPU and runs them on an accelerator; this job runs on the CPU "
            "(device = 'cpu'): use offload = 'none'"
        )
    pipeline = model.pipeline
    vae_dtype = torch.float32 if dtype == torch.float16 and device.type == "cpu" else dtype
    for name, module in pipeline.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        part_dtype = vae_dtype if name == "vae" else dtype
        if module.dtype != part_dtype:
            module.to(dtype=part_dtype)
        if offload == "none" and module.device != device:
            module.to(device=device)
    if offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    if offload != "none":
        model.execution_device = device  # the weights' own device is the CPU between calls


def load_pipeline(model: Any = "tiny", **kwargs: Any):
    """The diffusers pipeline of :func:`load_model` (same arguments)."""
    return load_model(model, **kwargs).pipeline


def _scheduler_name(scheduler: Any) -> str:
    for short, cls_name in {**SCHEDULERS, **FLOW_SCHEDULERS}.items():
        if type(scheduler).__name__ == cls_name:
            return short
    return "ddim"


def _explain_load_failure(model: str, error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    if Path(model).expanduser().exists():  # a local model: the hub has nothing to do with it
        kind = "folder" if Path(model).expanduser().is_dir() else "file"
        return f"could not load the local model {kind} {model!r}: {text}"
    offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
    network_words = (
        "connect", "offline", "resolve", "network", "not fully cached", "outgoing traffic",
        "cannot find the requested files", "LocalEntryNotFound",
    )
    if offline or any(word.lower() in text.lower() for word in network_words):
        return (
            f"could not load model {model!r} from the Hugging Face hub (offline or unreachable: {text}); "
            "pass a local diffusers folder, a single-file checkpoint (.safetensors/.ckpt), "
            "or 'tiny' for the built-in offline test model"
        )
    return f"could not load model {model!r}: {text}"

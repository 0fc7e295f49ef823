"""Loading Stable Diffusion 1.x/2.x pipelines: tiny, local folder, single file, hub id, object."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, ModelLoadError

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def make_scheduler(name: str, base_config: Any, prediction_type: str | None = None):
    """A diffusers scheduler by short name, built from the model's own scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    if name == "dpm++":
        overrides.setdefault("algorithm_type", "dpmsolver++")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base_config, **overrides)


def _check_components(pipeline: Any) -> None:
    missing = [c for c in REQUIRED_COMPONENTS if getattr(pipeline, c, None) is None]
    if missing:
        raise ConfigError(
            f"model must be a Stable Diffusion 1.x/2.x pipeline; {type(pipeline).__name__} lacks {missing}"
        )


def _load_from_string(model: str, dtype: torch.dtype, config: str | None):
    from diffusers import StableDiffusionPipeline

    if model == "tiny":
        from .tiny import build_tiny_pipeline

        return build_tiny_pipeline()
    path = Path(model).expanduser()
    kwargs = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if path.is_dir():
        return StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"model file {model!r} is not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})")
        single = {"torch_dtype": dtype}
        if config:
            single["config"] = config
        return StableDiffusionPipeline.from_single_file(str(path), **single)
    if path.suffix in SINGLE_FILE_SUFFIXES or model.startswith((".", "/", "~")) or os.sep * 2 in model:
        raise ModelLoadError(f"model path {model!r} does not exist")
    return StableDiffusionPipeline.from_pretrained(model, **kwargs)


def load_pipeline(
    model: Any = "tiny",
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    scheduler: str | None = None,
    prediction_type: str | None = None,
    config: str | None = None,
):
    """Return a diffusers Stable Diffusion pipeline on ``device`` in ``dtype``.

    ``model`` is ``"tiny"``, a local diffusers folder, a single-file checkpoint
    (``config`` names its diffusers config folder when offline), a hub id, or a pipeline
    object. ``scheduler`` replaces the model's scheduler by short name (see ``SCHEDULERS``);
    ``prediction_type`` overrides the scheduler's (e.g. ``"v_prediction"``).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if isinstance(model, str):
        try:
            pipeline = _load_from_string(model, dtype, config)
        except (ModelLoadError, ConfigError):
            raise
        except Exception as error:
            raise ModelLoadError(_explain_load_failure(model, error)) from error
    else:
        pipeline = model
    _check_components(pipeline)
    if scheduler or prediction_type:
        name = scheduler or _scheduler_name(pipeline.scheduler)
        pipeline.scheduler = make_scheduler(name, pipeline.scheduler.config, prediction_type)
    vae_dtype = torch.float32 if dtype == torch.float16 and device.type == "cpu" else dtype
    for part, part_dtype in (("unet", dtype), ("text_encoder", dtype), ("vae", vae_dtype)):
        module = getattr(pipeline, part)
        if module.device != device or module.dtype != part_dtype:
            module.to(device=device, dtype=part_dtype)
    return pipeline


def _scheduler_name(scheduler: Any) -> str:
    for short, cls_name in SCHEDULERS.items():
        if type(scheduler).__name__ == cls_name:
            return short
    return "ddim"


def _explain_load_failure(model: str, error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
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

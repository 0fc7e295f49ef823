"""Stable descriptions of what a job is made of, for checkpoint fingerprints and input
records: plugin options (tensors, arrays and images by a hash of their values), diffusers
configs, and the model's identity. Nothing here depends on a memory address or set order."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def _json(value: Any) -> str:
    """Stable JSON (sorted keys; sets sorted; other objects as text)."""
    return json.dumps(value, sort_keys=True, default=lambda v: sorted(map(str, v)) if isinstance(v, (set, frozenset)) else str(v))


def config_text(config: Any) -> str:
    """A diffusers config as stable JSON, without its private keys (``_use_default_values``
    is a list in set order, ``_name_or_path`` a local path, ``_diffusers_version``)."""
    return _json({k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")})


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def tensor_digest(tensor: Any) -> str:
    """``dtype(shape)#hash`` of a tensor's values (one device-to-host copy)."""
    import torch

    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{str(tensor.dtype).removeprefix('torch.')}{tuple(tensor.shape)}#{_digest(data)}"


def describe_value(value: Any) -> str:
    """A stable text of an option value: containers element by element, tensors, arrays and
    images by a hash of their values, modules by their class and config, other objects by
    their class (never a memory address)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, Path):
        return repr(str(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe_value(v) for v in value) + "]"
    import torch

    if isinstance(value, torch.Tensor):
        return tensor_digest(value)
    if type(value).__module__ == "numpy" or hasattr(value, "__array_interface__"):
        import numpy

        return "array" + tensor_digest(torch.as_tensor(numpy.asarray(value)))
    config = getattr(value, "config", None)
    if isinstance(config, dict):
        return f"<{type(value).__name__} {_digest(config_text(config).encode())}>"
    return f"<{type(value).__name__}>"


def describe_plugin(plugin: Any) -> str:
    """``name(options)`` of a plugin, from :func:`describe_value` of its options (prompts
    included), or its repr for objects without pydantic options."""
    options = getattr(plugin, "options", None)
    if hasattr(options, "model_dump"):
        return f"{getattr(plugin, 'name', type(plugin).__name__)}({describe_value(options.model_dump())})"
    return repr(plugin)


def model_identity(model: Any) -> str:
    """``family:source:options:config-hash``: the family's name, the pipeline's
    ``name_or_path`` (model id or folder), the family's options, a hash of the denoiser's
    config and the active LoRA adapters."""
    pipeline = model.pipeline
    source = getattr(pipeline, "name_or_path", None) or getattr(getattr(pipeline, "config", None), "_name_or_path", None)
    module = model.denoiser_module
    config = f"{type(module).__name__}{config_text(getattr(module, 'config', None))}"
    try:
        adapters = ",".join(pipeline.get_active_adapters()) if hasattr(pipeline, "get_active_adapters") else ""
    except Exception:  # no PEFT backend: no adapters
        adapters = ""
    options = describe_value(model.options.model_dump()) if hasattr(model.options, "model_dump") else ""
    return f"{model.name}:{source or ''}:{options}:{_digest(config.encode())}:{adapters}"

"""What a job composed in the browser may read: files under the configured roots only.

Every value of a job that names a file (the model, its config and LoRAs, plugin options such
as ``image``, ``mask``, ``masks``, ``path``, ``taesd_path``, the ``[init]`` image and mask) is
checked before the job is queued: a relative path is taken relative to the first root, and
the real path (symbolic links followed, ``..`` folded) must lie inside one of the roots, so
no one at the browser can read an arbitrary file on the server. Names that are not paths
(tiny models, hub ids such as ``org/model`` that are not local folders) pass unchanged.

A LoRA's ``weight_name`` must name a file inside its LoRA folder (no absolute value, nothing
that resolves outside). Options of third-party plugins are not known by name, so every other
string option value (in nested lists and tables too) that looks like a path (absolute, with
``~``, a path separator or ``..``, or naming an existing file relative to the working folder)
is confined the same way; prompts and plain words pass unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from jointdiff.image.output import PATH_KEYS
from jointdiff.jobs.spec import MAYBE_PATH_KEYS
from jointdiff.models.loading import tiny_model_family
from jointdiff.models.lora import looks_local
from jointdiff.utils.errors import ConfigError


def confine_paths(data: Mapping[str, Any], roots: Sequence[Path]) -> dict[str, Any]:
    """A copy of the raw job ``data`` with every file it names made absolute (relative to
    ``roots[0]``) and checked to lie inside ``roots``; ConfigError naming the first that
    does not. ``output`` and ``checkpoint`` are dropped: the queue places them itself."""
    roots = [Path(r).resolve() for r in roots]
    data = {k: v for k, v in dict(data).items() if k not in ("output", "checkpoint")}
    model = dict(data.get("model") or {})
    if isinstance(model.get("id"), str) and tiny_model_family(model["id"]) is None:
        model["id"] = _confine(model["id"], "model.id", roots, hub_id_allowed=True)
    if isinstance(model.get("config"), str):
        model["config"] = _confine(model["config"], "model.config", roots, hub_id_allowed=True)
    loras = []
    for i, lora in enumerate(model.get("loras") or []):
        if isinstance(lora, dict) and isinstance(lora.get("path"), str):
            local = looks_local(lora["path"])
            lora = {**lora, "path": _confine(lora["path"], f"model.loras[{i}].path", roots, hub_id_allowed=not local)}
            if isinstance(lora.get("weight_name"), str):
                _confine_weight_name(lora["path"], lora["weight_name"], f"model.loras[{i}].weight_name")
        loras.append(lora)
    if loras:
        model["loras"] = loras
    if model:
        data["model"] = model
    for key in ("geometry", "synchronizer", "init"):
        if isinstance(data.get(key), dict):
            data[key] = _confine_options(data[key], key, roots)
    if isinstance(data.get("conditioners"), list):
        data["conditioners"] = [_confine_options(c, f"conditioners[{i}]", roots) for i, c in enumerate(data["conditioners"])]
    return data


def _confine_options(table: Any, where: str, roots: list[Path]) -> Any:
    """Path-valued options anywhere in a plugin table (nested tables and lists included)."""
    if isinstance(table, list):
        return [_confine_options(item, f"{where}[{i}]", roots) for i, item in enumerate(table)]
    if isinstance(table, str) and _looks_like_path(table):  # a list item of an unknown option
        return _confine(table, where, roots, hub_id_allowed=True)
    if not isinstance(table, dict):
        return table
    out = {}
    for key, value in table.items():
        inner = f"{where}.{key}"
        if key in PATH_KEYS and isinstance(value, str):
            out[key] = _confine(value, inner, roots, hub_id_allowed=False)
        elif key in PATH_KEYS and isinstance(value, list):
            out[key] = [_confine(v, f"{inner}[{i}]", roots, False) if isinstance(v, str) else v for i, v in enumerate(value)]
        elif key in MAYBE_PATH_KEYS and isinstance(value, str):
            out[key] = _confine(value, inner, roots, hub_id_allowed=True)
        elif key not in TEXT_KEYS:
            out[key] = _confine_options(value, inner, roots)
        else:
            out[key] = value
    return out


TEXT_KEYS = frozenset({"name", "prompt", "prompts", "negative_prompt", "style_prompt"})
"""Option names whose strings are text, never files (a prompt may hold ``/`` or ``..``)."""


def _looks_like_path(value: str) -> bool:
    """Whether an option string of an unknown plugin may name a file: absolute, ``~``, a
    separator or ``..`` in it, or an existing file relative to the working folder."""
    if tiny_model_family(value) is not None or "\n" in value:
        return False
    return (os.path.isabs(value) or value.startswith("~") or "/" in value or "\\" in value
            or ".." in value or Path(value).is_file())


def _confine_weight_name(folder: str, weight_name: str, where: str) -> None:
    """ConfigError unless ``weight_name`` stays inside the LoRA ``folder`` (a confined local
    folder, or a hub id, where it must be relative and free of ``..``)."""
    bad = os.path.isabs(weight_name) or weight_name.startswith(("~", "\\")) or ".." in Path(weight_name).parts
    if not bad and Path(folder).is_dir():
        root = Path(folder).resolve()
        bad = not (root / weight_name).resolve().is_relative_to(root)
    if bad:
        raise ConfigError(f"{where} = {weight_name!r} must name a file inside the LoRA folder {folder!r}")


def _confine(value: str, where: str, roots: list[Path], hub_id_allowed: bool) -> str:
    """``value`` as an absolute path inside ``roots`` (or unchanged: a hub id, where allowed)."""
    if not value:
        return value
    explicit = value.startswith((".", "/", "~", "\\")) or os.path.isabs(value) or ".." in Path(value).parts
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    if hub_id_allowed and not explicit and not candidate.exists():
        if not Path(value).exists():
            return value  # a hub id (org/name), not a file here
        candidate = Path(value).absolute()  # where the loader would look: the working folder
    real = candidate.resolve()
    if not any(real == root or real.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise ConfigError(f"{where} = {value!r} is outside the folders this server may read ({allowed})")
    return str(real)

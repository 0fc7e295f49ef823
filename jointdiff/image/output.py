"""Writing results: PNGs that carry their job and seed, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from jointdiff.utils.errors import ConfigError
from jointdiff.utils.files import free_output, output_paths, save_image_atomic
from jointdiff.utils.version import VERSION

JOB_KEY = "jointdiff:job"
SEED_KEY = "jointdiff:seed"
VERSION_KEY = "jointdiff:version"
INPUTS_KEY = "jointdiff:inputs"
"""The job's input files (init image, masks, condition images): ``{"init.image": {"path":
..., "sha256": ...}, ...}`` as JSON, so a reproduction can tell whether an input changed."""
BATCH_KEY = "jointdiff:batch"
"""A batch job's fingerprint and image count (``{"fingerprint": ..., "images": n}`` as JSON):
how ``jointdiff batch`` tells a finished output of the same job (:mod:`jointdiff.jobs.batch`)."""


PATH_KEYS = frozenset({"image", "mask", "masks"})
"""Option keys whose values are input image files (recorded with their sha256 in the PNG)."""


def result_metadata(result: Any) -> dict[str, str]:
    """The PNG text chunks of a result: jointdiff's version, the seed and the job."""
    metadata = {VERSION_KEY: VERSION, SEED_KEY: str(result.metadata.get("seed"))}
    if result.metadata.get("job") is not None:
        metadata[JOB_KEY] = json.dumps(result.metadata["job"], sort_keys=True)
        inputs = input_files(result.metadata["job"])
        if inputs:
            metadata[INPUTS_KEY] = json.dumps(inputs, sort_keys=True)
    if result.metadata.get("batch") is not None:
        metadata[BATCH_KEY] = json.dumps(result.metadata["batch"], sort_keys=True)
    return metadata


def input_files(job: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """The image files a job reads (``[init]`` image and mask, plugin options ``image``,
    ``mask``, ``masks``), keyed by where they are in the job (``init.image``,
    ``conditioners[0].image``, ...), each with its path and the sha256 of its content (None
    when the file is gone)."""
    found: dict[str, dict[str, str | None]] = {}

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                inner = f"{where}.{key}" if where else str(key)
                if key in PATH_KEYS and isinstance(item, (str, list)):
                    for i, path in enumerate(item if isinstance(item, list) else [item]):
                        name = f"{inner}[{i}]" if isinstance(item, list) else inner
                        found[name] = {"path": str(path), "sha256": file_sha256(path)}
                elif key != "model":
                    walk(item, inner)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")

    walk(job, "")
    return found


def changed_inputs(png: str | Path) -> list[str]:
    """The inputs recorded in a jointdiff PNG (:data:`INPUTS_KEY`) whose file now has another
    content (or is gone): ``["init.image ('photo.jpg')", ...]``."""
    try:
        with Image.open(png) as image:
            text = getattr(image, "text", {}).get(INPUTS_KEY)
        inputs = json.loads(text) if text else {}
    except (OSError, ValueError):
        return []
    return [
        f"{where} ({entry.get('path')!r})" for where, entry in sorted(inputs.items())
        if isinstance(entry, dict) and entry.get("sha256") != file_sha256(entry.get("path", ""))
    ]


def file_sha256(path: str | Path) -> str | None:
    """The sha256 (hex) of a file's content, read in 1 MiB blocks; None when it cannot be read."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def save_result(result: Any, path: str | Path, *, overwrite: bool = True) -> list[Path]:
    """Save every image of a :class:`~jointdiff.engine.loop.JointResult` with its job and seed
    (PNG text chunks, read back by ``jointdiff run IMAGE.png``). With ``overwrite=False``
    existing files are kept and the images go to the first free ``stem-N`` name (the paths
    returned say where)."""
    metadata = result_metadata(result)
    count = len(result.images)
    for _ in range(100):
        target = Path(path) if overwrite else free_output(path, count)
        written: list[Path] = []
        try:
            for image, p in zip(result.images, output_paths(target, count)):
                written.append(save_image_atomic(image, p, metadata, overwrite=overwrite))
            companions = getattr(result, "companions", None)
            return written + list(companions(written[0])) if companions is not None and written else written
        except FileExistsError:  # another writer took the name meanwhile: ours go elsewhere
            for p in written:
                p.unlink()
    raise ConfigError(f"output {str(path)!r}: no free file name found")


def read_job_metadata(path: str | Path) -> dict[str, Any]:
    """The job embedded in a PNG written by jointdiff."""
    try:
        with Image.open(path) as image:
            text = image.text.get(JOB_KEY) if hasattr(image, "text") else None
    except FileNotFoundError:
        raise ConfigError(f"image {str(path)!r} does not exist") from None
    if text is None:
        raise ConfigError(
            f"image {str(path)!r} carries no jointdiff job: only PNGs made by jointdiff carry one "
            "(give a .toml or .json job file, or such a PNG)"
        )
    try:
        job = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"image {str(path)!r}: its jointdiff job is not valid JSON ({error})") from None
    if not isinstance(job, dict):
        raise ConfigError(f"image {str(path)!r}: its jointdiff job is not a JSON object")
    return job


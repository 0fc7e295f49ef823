"""Writing results: PNGs that carry their job and seed, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import ConfigError

JOB_KEY = "jointdiff:job"
SEED_KEY = "jointdiff:seed"
VERSION_KEY = "jointdiff:version"


def check_writable(path: str | Path) -> Path:
    """Fail early (before any model loads) when ``path`` cannot be written."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"output {str(path)!r} is a directory; give a file name such as {str(path / 'out.png')!r}")
    if not folder.is_dir():
        raise ConfigError(f"output folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"output folder {str(folder)!r} is not writable")
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ConfigError(f"output {str(path)!r} must end in .png, .jpg, .jpeg or .webp")
    return path


def output_paths(path: str | Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out_0.png``, ``out_1.png``… for several (e.g. faces)."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def save_image_atomic(image: Image.Image, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Save via a temporary file in the same folder and an atomic rename: a crash never
    leaves a half-written file at ``path``. PNGs get ``metadata`` as text chunks."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        kwargs: dict[str, Any] = {}
        if path.suffix.lower() == ".png" and metadata:
            info = PngImagePlugin.PngInfo()
            for key, value in metadata.items():
                info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))
            kwargs["pnginfo"] = info
        image.save(tmp, **kwargs)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_result(result: Any, path: str | Path) -> list[Path]:
    """Save every image of a :class:`~jointdiff.engine.JointResult` with its job and seed."""
    from . import __version__

    metadata = {VERSION_KEY: __version__, SEED_KEY: str(result.metadata.get("seed"))}
    if "job" in result.metadata:
        metadata[JOB_KEY] = json.dumps(result.metadata["job"], sort_keys=True)
    paths = output_paths(path, len(result.images))
    return [save_image_atomic(image, p, metadata) for image, p in zip(result.images, paths)]


def read_job_metadata(path: str | Path) -> dict[str, Any]:
    """The job embedded in a PNG written by jointdiff."""
    try:
        with Image.open(path) as image:
            text = image.text.get(JOB_KEY) if hasattr(image, "text") else None
    except FileNotFoundError:
        raise ConfigError(f"image {str(path)!r} does not exist") from None
    if text is None:
        raise ConfigError(f"image {str(path)!r} carries no jointdiff job metadata")
    return json.loads(text)


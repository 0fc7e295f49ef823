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
INPUTS_KEY = "jointdiff:inputs"
"""The job's input files (init image, masks, condition images): ``{"init.image": {"path":
..., "sha256": ...}, ...}`` as JSON, so a reproduction can tell whether an input changed."""


OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_writable(path: str | Path) -> Path:
    """Fail early (before any model loads) when ``path`` cannot be written: its folder is
    missing or read-only (tried by writing a probe file there), it is a folder, or its suffix
    is no image format."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"output {str(path)!r} is a directory; give a file name such as {str(path / 'out.png')!r}")
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"output {str(path)!r} must end in .png, .jpg, .jpeg or .webp")
    if not folder.is_dir():
        raise ConfigError(f"output folder {str(folder)!r} (of output {str(path)!r}) does not exist")
    _probe(folder, path)
    return path


def _probe(folder: Path, path: Path) -> None:
    """Write and remove a file in ``folder``: the only sure test of writability (permission
    bits, ACLs, read-only mounts, root squash)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".probe", dir=folder)
    except OSError as error:
        raise ConfigError(f"output folder {str(folder)!r} is not writable ({error.strerror or error})") from None
    os.close(fd)
    os.unlink(probe)


def output_paths(path: str | Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out_0.png``, ``out_1.png``… for several (e.g. faces)."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def _taken(path: Path, count: int | None) -> bool:
    """Whether writing ``count`` images (None: not known yet, one or several) to ``path``
    would replace a file."""
    counts = (1, 2) if count is None else (count,)
    return any(p.exists() for n in counts for p in output_paths(path, n))


def free_output(path: str | Path, count: int | None = None) -> Path:
    """``path`` when nothing is there, else the first free ``stem-1.png``, ``stem-2.png``, …
    (free for all ``count`` images; None: for one image or several)."""
    path = Path(path)
    candidate, number = path, 0
    while _taken(candidate, count):
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def save_image_atomic(
    image: Image.Image, path: str | Path, metadata: dict[str, Any] | None = None, *, overwrite: bool = True
) -> Path:
    """Save via a temporary file in the same folder and an atomic rename: a crash never
    leaves a half-written file at ``path``. PNGs get ``metadata`` as text chunks. With
    ``overwrite=False`` an existing ``path`` is never replaced (FileExistsError)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent or ".")
    except OSError as error:
        raise ConfigError(f"cannot write output {str(path)!r}: {error.strerror or error}") from None
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
        _place(tmp, path, overwrite)
    except FileExistsError:
        raise
    except OSError as error:
        raise ConfigError(f"cannot write output {str(path)!r}: {error.strerror or error}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _place(tmp: str, path: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``path``; without ``overwrite`` a hard link, which fails
    when ``path`` exists (no window in which another writer's file is replaced)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links
        if path.exists():
            raise FileExistsError(str(path)) from None
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def result_metadata(result: Any) -> dict[str, str]:
    """The PNG text chunks of a result: jointdiff's version, the seed and the job."""
    from . import __version__

    metadata = {VERSION_KEY: __version__, SEED_KEY: str(result.metadata.get("seed"))}
    if result.metadata.get("job") is not None:
        metadata[JOB_KEY] = json.dumps(result.metadata["job"], sort_keys=True)
        inputs = input_files(result.metadata["job"])
        if inputs:
            metadata[INPUTS_KEY] = json.dumps(inputs, sort_keys=True)
    return metadata


def input_files(job: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """The image files a job reads (``[init]`` image and mask, plugin options ``image``,
    ``mask``, ``masks``), keyed by where they are in the job (``init.image``,
    ``conditioners[0].image``, ...), each with its path and the sha256 of its content (None
    when the file is gone)."""
    from .job import PATH_KEYS

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
    """Save every image of a :class:`~jointdiff.engine.JointResult` with its job and seed
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
            return written
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


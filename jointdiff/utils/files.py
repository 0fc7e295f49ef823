"""Writing files safely: early checks that an output can be written, free names that never
replace a file, and atomic writes (a crash never leaves a half-written file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from PIL import Image, PngImagePlugin

from jointdiff.utils.errors import ConfigError

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


def check_checkpoint_path(path: str | Path) -> Path:
    """Fail early (before any model loads, not after the first step) when a checkpoint cannot
    be written at ``path``: its folder is missing or read-only, or it is a folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"checkpoint.path {str(path)!r} is a folder; give a file name such as {str(path / 'job.ckpt')!r}")
    if not folder.is_dir():
        raise ConfigError(f"checkpoint.path {str(path)!r}: its folder {str(folder)!r} does not exist; create it or change the path")
    try:
        _probe(folder, path)
    except ConfigError:
        raise ConfigError(f"checkpoint.path {str(path)!r}: its folder {str(folder)!r} is not writable") from None
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
    kwargs: dict[str, Any] = {}
    if path.suffix.lower() == ".png" and metadata:
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))
        kwargs["pnginfo"] = info
    return write_atomic(path, lambda tmp: image.save(tmp, **kwargs), overwrite=overwrite)


def write_text_atomic(text: str, path: str | Path, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) via a temporary file in the same folder and an atomic rename,
    as :func:`save_image_atomic`; with ``overwrite=False`` an existing ``path`` is never
    replaced (FileExistsError)."""
    return write_atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)


def _cannot_write_output(path: Path, error: OSError) -> str:
    return f"cannot write output {str(path)!r}: {error.strerror or error}"


def write_atomic(
    path: Path, write: Callable[[str], Any], *, overwrite: bool = True,
    describe: Callable[[Path, OSError], str] = _cannot_write_output,
) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, then move it there (:func:`_place`):
    a crash never leaves a half-written file at ``path``, and the temporary file never outlives
    the call. An OSError becomes a one-line ConfigError, ``describe(path, error)``."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent or ".")
    except OSError as error:
        raise ConfigError(describe(path, error)) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        _place(tmp, path, overwrite)
    except FileExistsError:
        raise
    except OSError as error:
        raise ConfigError(describe(path, error)) from None
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

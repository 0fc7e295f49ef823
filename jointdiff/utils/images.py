"""The one way an image file comes in: read as the user means it, whatever wrote it.

Every image jointdiff reads (init images, keep masks, region masks, ControlNet conditions,
inpainting images, ``jointdiff sky`` photos, panoramas for the viewer) goes through
:func:`load_array` (or :func:`load_image` / :func:`load_tensor` on top of it), which

* turns the picture upright by its EXIF orientation (a portrait phone photo is stored
  sideways with orientation 6 or 8; ``PIL.ImageOps.exif_transpose`` applies it);
* scales 16-bit and float images by their real range: 16-bit integers (``I;16``, 16-bit
  PNG and TIFF depth maps) by 1/65535, 32-bit integers by their bit range when they fit in
  16 bits, float images (``F``, float TIFF) kept when they lie in [0, 1] and otherwise
  stretched from their minimum to their maximum. ``Image.convert`` would clip all of these
  to 255, so a 16-bit depth map would come out almost white;
* expands palette images (with their transparency), and drops an alpha channel the caller
  did not ask for (said when some pixels were transparent);
* logs what it had to do on one line (logger ``jointdiff.images``; the CLI prints it as a
  ``jointdiff: note:`` on stderr): INFO when the reading was exact, WARNING when it lost
  something (transparency, a stretched float range).

Pillow does the decoding (every format it knows); numpy holds the values. Arrays are
``(h, w)`` for ``"L"`` and ``(h, w, C)`` otherwise, float32 in [0, 1]. Both libraries are
imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

logger = logging.getLogger("jointdiff.images")

Mode = Literal["RGB", "L", "RGBA"]
MODES = ("RGB", "L", "RGBA")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's convert("L")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def open_image_file(path: str | Path, what: str = "image") -> Image.Image:
    """The image file ``path`` opened and loaded; ConfigError naming ``what`` and the path
    when it is missing, a folder, or not an image Pillow reads."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder, not an image file")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            copy = image.copy()  # keeps info["exif"], so the orientation
            copy.format = image.format
            return copy
    except UnidentifiedImageError:
        raise ConfigError(f"{what} {str(path)!r} is not an image Pillow can read (PNG, JPEG, TIFF, WebP, ...)") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{what} {str(path)!r} cannot be read ({type(error).__name__}: {error})") from None
    except Image.DecompressionBombError as error:
        raise ConfigError(
            f"{what} {str(path)!r} is larger than Pillow reads by default ({error}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS from Python if you trust the file"
        ) from None


def load_array(source: str | Path | Image.Image, mode: Mode = "RGB", what: str = "image") -> np.ndarray:
    """``source`` (a path or a PIL image) as float32 in [0, 1]: ``(h, w)`` for ``"L"``,
    ``(h, w, 3)`` for ``"RGB"``, ``(h, w, 4)`` for ``"RGBA"``; upright, scaled by its real
    range, what was done logged on one line (see the module docstring)."""
    from PIL import Image

    if mode not in MODES:
        raise ConfigError(f"image mode must be one of {', '.join(MODES)}, got {mode!r}")
    label = what if not isinstance(source, (str, Path)) else f"{what} {str(source)!r}"
    image = open_image_file(source, what) if isinstance(source, (str, Path)) else source
    if not isinstance(image, Image.Image):
        raise ConfigError(f"{what} must be an image path or a PIL image, got {type(image).__name__}")
    notes: list[str] = []
    image = _upright(image, notes)
    values, alpha = _values(image, notes, label)
    array = _to_mode(values, alpha, mode, notes)
    _log(label, notes)
    return array


def load_image(source: str | Path | Image.Image, mode: Mode = "RGB", what: str = "image") -> Image.Image:
    """``source`` as an 8-bit PIL image in ``mode`` (rounded from :func:`load_array`)."""
    import numpy as np
    from PIL import Image

    array = load_array(source, mode, what)
    return Image.fromarray(np.round(array * 255.0).astype(np.uint8), mode)


def load_tensor(source: str | Path | Image.Image, mode: Mode = "RGB", what: str = "image") -> torch.Tensor:
    """``source`` as a float32 ``(C, h, w)`` tensor in [0, 1] (``C`` = 1 for ``"L"``)."""
    import torch

    tensor = torch.from_numpy(load_array(source, mode, what).copy())
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def _upright(image: Image.Image, notes: list[str]) -> Image.Image:
    from PIL import ImageOps

    orientation = image.getexif().get(0x0112)
    if orientation in (None, 1):
        return image
    notes.append(f"turned upright by its EXIF orientation {orientation}")
    return ImageOps.exif_transpose(image)


def _values(image: Image.Image, notes: list[str], label: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(values, alpha)``: values ``(h, w)`` or ``(h, w, 3)`` float32 in [0, 1], alpha
    ``(h, w)`` or None."""
    import numpy as np

    if image.mode in ("P", "PA"):
        notes.append("palette expanded")
        has_alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.mode in _SIXTEEN_BIT:
        notes.append("16-bit values scaled by 1/65535")
        return np.asarray(image, dtype=np.float32) / 65535.0, None
    if image.mode == "I":
        return _wide_integers(np.asarray(image, dtype=np.int64), notes), None
    if image.mode == "F":
        return _floats(np.asarray(image, dtype=np.float32), notes, label), None
    if image.mode == "1":
        image = image.convert("L")
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        notes.append(f"converted from {image.mode} to RGB")
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0
    if image.mode in ("LA", "RGBA"):
        return array[..., :-1].squeeze(-1) if image.mode == "LA" else array[..., :3], array[..., -1]
    return array, None


def _wide_integers(array: np.ndarray, notes: list[str]) -> np.ndarray:
    """32-bit integer pixels (how older Pillows open 16-bit PNGs): by 1/65535 when they fit
    in 16 bits, else stretched from 0 to their maximum."""
    import numpy as np

    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low >= 0 and high <= 65535:
        notes.append("16-bit values scaled by 1/65535")
        return (array / 65535.0).astype(np.float32)
    top = max(high, 1)
    notes.append(f"32-bit integers stretched from [{low}, {high}] to [0, 1]")
    return ((array - min(low, 0)) / (top - min(low, 0))).astype(np.float32)


def _floats(array: np.ndarray, notes: list[str], label: str) -> np.ndarray:
    """Float pixels: kept when in [0, 1], otherwise stretched from their minimum to their
    maximum (a depth map in metres); non-finite values are refused."""
    import numpy as np

    if not np.isfinite(array).all():
        raise ConfigError(f"{label} has NaN or infinite pixels; write it with finite values")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if low >= 0.0 and high <= 1.0:
        notes.append("float values kept (already in [0, 1])")
        return array
    notes.append(f"float values stretched from [{low:.4g}, {high:.4g}] to [0, 1]")
    return ((array - low) / (high - low if high > low else 1.0)).astype(np.float32)


def _to_mode(values: np.ndarray, alpha: np.ndarray | None, mode: str, notes: list[str]) -> np.ndarray:
    import numpy as np

    if mode == "L" and values.ndim == 3:
        values = values @ np.asarray(_LUMA, dtype=np.float32)
    elif mode != "L" and values.ndim == 2:
        values = np.repeat(values[..., None], 3, axis=-1)
    if mode == "RGBA":
        opaque = np.ones(values.shape[:2], dtype=np.float32) if alpha is None else alpha
        return np.concatenate([values, opaque[..., None]], axis=-1).astype(np.float32)
    if alpha is not None and float(alpha.min()) < 1.0:
        share = float((alpha < 1.0).mean())
        notes.append(f"alpha dropped ({share:.1%} of the pixels were transparent; their colour is used as is)")
    return np.ascontiguousarray(values, dtype=np.float32)


_said: set[str] = set()


def _log(label: str, notes: list[str]) -> None:
    """One line per image, said once per process (a job checked before it runs reads its
    images twice)."""
    line = f"{label}: {'; '.join(notes)}"
    if not notes or line in _said:
        return
    _said.add(line)
    lossy = any(note.startswith(("alpha dropped", "float values stretched", "32-bit")) for note in notes)
    logger.log(logging.WARNING if lossy else logging.INFO, "%s", line)



def unit_array(array: np.ndarray) -> np.ndarray:
    """An in-memory pixel array as float32 on the scale of its dtype: ``uint8`` by 1/255,
    ``uint16`` by 1/65535 (a 16-bit depth map), floats as they are."""
    import numpy as np

    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    return array.astype(np.float32)

"""Placing an image on a canvas: the :class:`~jointdiff.image.init_image.InitImage` of the common
"start from an image" jobs (see docs/from-an-image.md).

- :func:`place_on_sphere`: a perspective photo projected onto a 360° canvas (equirect or
  cubemap); its footprint is kept, the rest of the sphere is generated around it;
- :func:`place_on_canvas` and :func:`outpaint`: an image pasted on a larger plane canvas
  (strip, grid); the rest is generated;
- :func:`loop_panorama`: a panorama whose two ends do not meet, made to loop on a wrapped
  strip (or an equirect canvas) by regenerating a band across the wrap seam;
- :func:`make_tileable`: a photo made tileable on the ``torus`` by regenerating its borders;
- :func:`upscale`: an image upsampled (bicubic) and re-denoised at a moderate strength
  (SDEdit, Meng et al. 2022), e.g. on a larger equirect canvas.

Conventions (kornia / py360convert, as :mod:`jointdiff.surfaces.spherical`): images are ``(3, h, w)``
tensors in [-1, 1] (or PIL images, or paths: :func:`load_image`); results are
``(S, 3, H_px, W_px)`` canvases and ``(S, 1, H_px, W_px)`` keep masks in [0, 1] (1 = keep);
sizes are ``(h, w)``; pixel units ``*_px``; angles are degrees ``*_deg``; world axes ``x``
right, ``y`` up, ``z`` forward; yaw positive turns right, pitch positive up. Every
function takes an optional ``keep`` of the image itself ``(1, h, w)`` (white = keep; e.g.
to drop the ground of a photo), placed with it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from PIL import Image

from jointdiff.image.init_image import InitImage, pil_to_tensor
from jointdiff.surfaces import spherical
from jointdiff.utils import images
from jointdiff.utils.errors import ConfigError

ImageLike = Union[torch.Tensor, Image.Image, str, Path]
"""A ``(3, h, w)`` tensor in [-1, 1], a PIL image, or the path of an image file."""

DEFAULT_FEATHER_PX = 16
"""Feather of the placements' keep masks: the kept image fades into the generated content
over this many pixels inside its edge (:class:`InitImage`'s ``feather_px``)."""


# -- reading images --------------------------------------------------------------------------


def load_image(path: str | Path, name: str = "image", mode: str = "RGB") -> Image.Image:
    """The image file at ``path`` (any format PIL reads) in ``mode``, read by
    :func:`jointdiff.utils.images.load_image` (upright by its EXIF orientation, 16-bit and
    float images by their real range); ConfigError naming ``name`` when it does not exist,
    is a folder, or is not an image."""
    return images.load_image(path, mode, name)  # type: ignore[arg-type]


def as_image(image: ImageLike, name: str = "image") -> torch.Tensor:
    """``image`` as a float32 ``(3, h, w)`` tensor in [-1, 1]: a path is read
    (:func:`load_image`), a PIL image converted to RGB, a tensor ``(3, h, w)`` or
    ``(1, 3, h, w)`` in [-1, 1] checked."""
    if isinstance(image, (str, Path)):
        image = load_image(image, name)
    if isinstance(image, Image.Image):
        return pil_to_tensor(image, "RGB", name)[0] * 2 - 1
    if not isinstance(image, torch.Tensor):
        raise ConfigError(f"{name} must be a (3, h, w) tensor in [-1, 1], a PIL image or a path, got {type(image).__name__}")
    image = image.detach().float().cpu()
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        raise ConfigError(f"{name} must have shape (3, h, w), got {tuple(image.shape)}")
    if not bool(torch.isfinite(image).all()) or float(image.abs().max()) > 1.0 + 1e-3:
        raise ConfigError(f"{name} values must be finite and in [-1, 1], got [{float(image.min()):.3g}, {float(image.max()):.3g}]")
    return image.clamp(-1, 1)


def as_mask(mask: ImageLike | None, size: tuple[int, int], name: str = "keep") -> torch.Tensor:
    """A keep mask ``(1, h, w)`` in [0, 1] of an image of ``size = (h, w)``: None is all
    ones; a path or PIL image is read as grayscale (white = 1); a tensor ``(h, w)``,
    ``(1, h, w)`` or ``(1, 1, h, w)`` is checked. ConfigError when its size is not ``size``."""
    if mask is None:
        return torch.ones(1, *size)
    if isinstance(mask, (str, Path)):
        mask = load_image(mask, name, mode="L")
    if isinstance(mask, Image.Image):
        mask = pil_to_tensor(mask, "L", name)[0]
    if not isinstance(mask, torch.Tensor):
        raise ConfigError(f"{name} must be a mask tensor, a PIL image or a path, got {type(mask).__name__}")
    mask = mask.detach().float().cpu()
    while mask.ndim > 3 and mask.shape[0] == 1:
        mask = mask[0]
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.ndim != 3 or mask.shape[0] != 1 or tuple(mask.shape[1:]) != tuple(size):
        raise ConfigError(f"{name} must be a mask of the image's size (h, w) = {tuple(size)}, got shape {tuple(mask.shape)}")
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ConfigError(f"{name} values must be in [0, 1]")
    return mask


def _init(image: torch.Tensor, keep: torch.Tensor | None, strength: float, feather_px: int) -> InitImage:
    """An :class:`InitImage` of one canvas (``(S, 3, H, W)`` pixels) and its keep mask."""
    image = image if image.ndim == 4 else image[None]
    if keep is not None:
        keep = keep if keep.ndim == 4 else keep[None]
    return InitImage(image=image.contiguous(), strength=strength, keep=keep, feather_px=feather_px)


# -- on the sphere ---------------------------------------------------------------------------


def camera_rotation(yaw_deg: float, pitch_deg: float, roll_deg: float = 0.0) -> torch.Tensor:
    """Camera-to-world rotation ``(3, 3)`` (float64; columns: the camera's right, up and
    forward axes in the world): :func:`jointdiff.surfaces.spherical.view_rotation` after a roll about
    the forward axis, with py360convert's sign (``e2p(..., in_rot_deg=roll_deg)``): positive
    roll turns the camera's right axis down, so the photo lies turned clockwise on the
    canvas (seen from inside the sphere, up = up)."""
    roll = math.radians(roll_deg)
    c, s = math.cos(roll), math.sin(roll)
    roll_matrix = torch.tensor([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return spherical.view_rotation(yaw_deg, pitch_deg) @ roll_matrix


def project_to_photo(
    directions: torch.Tensor, rotation: torch.Tensor, fov_deg: float, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where world directions ``(..., 3)`` fall in a pinhole photo of ``size = (h, w)`` with
    horizontal field of view ``fov_deg`` (square pixels: the vertical one follows from the
    aspect) and camera-to-world ``rotation``: normalized photo coordinates ``(..., 2)``
    ``(u, v)`` (align_corners=False: ±1 are the outer pixel edges, ``v`` down) and a mask
    ``(...)`` of directions inside the frustum (in front, ``|u|, |v| <= 1``)."""
    camera = directions @ rotation.to(directions.dtype)  # world → camera: R^T d
    tan_x = math.tan(math.radians(fov_deg) / 2)
    tan_y = tan_x * size[0] / size[1]
    depth = camera[..., 2]
    ahead = depth > 1e-9
    safe = torch.where(ahead, depth, torch.ones_like(depth))
    u = camera[..., 0] / safe / tan_x
    v = -camera[..., 1] / safe / tan_y
    inside = ahead & (u.abs() <= 1) & (v.abs() <= 1)
    return torch.stack([u, v], dim=-1), inside


def check_fov(fov_deg: float) -> None:
    """ConfigError unless ``fov_deg`` (a pinhole photo's horizontal field of view) is in
    (0, 180); the vertical one, ``2 atan(tan(fov / 2) · h / w)``, is then below 180° too."""
    if isinstance(fov_deg, bool) or not isinstance(fov_deg, (int, float)) or not 0 < fov_deg < 180:
        raise ConfigError(f"fov_deg must be in (0, 180) degrees (horizontal field of view), got {fov_deg!r}")


def _antialiased(photo: torch.Tensor, fov_deg: float, canvas_px_per_rad: float) -> torch.Tensor:
    """The photo ``(C, h, w)`` shrunk (antialiased) when it is denser at its centre than the
    canvas, so that bilinear sampling does not alias."""
    photo_px_per_rad = photo.shape[-1] / (2 * math.tan(math.radians(fov_deg) / 2))
    scale = canvas_px_per_rad / photo_px_per_rad
    if scale >= 1:
        return photo
    size = (max(2, round(photo.shape[-2] * scale)), max(2, round(photo.shape[-1] * scale)))
    return F.interpolate(photo[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _sample_photo(photo: torch.Tensor, directions: torch.Tensor, rotation: torch.Tensor, fov_deg: float, size) -> torch.Tensor:
    """``(C + 1, ...)``: the photo ``(C, h', w')`` sampled (bilinear) at directions ``(..., 3)``,
    zero outside its frustum, and the frustum mask as the last channel."""
    uv, inside = project_to_photo(directions, rotation, fov_deg, size)
    grid = uv.clamp(-2, 2).reshape(1, -1, 1, 2).float()
    sampled = F.grid_sample(photo[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, :, 0]
    sampled = sampled.reshape(photo.shape[0], *inside.shape) * inside
    return torch.cat([sampled, inside[None].float()])


def sphere_footprint(
    photo: ImageLike, yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0, fov_deg: float = 90.0,
    *, width_px: int | None = None, face_px: int | None = None, keep: ImageLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The photo projected onto a 360° canvas: pixels ``(S, 3, H, W)`` (0, i.e. mid-grey,
    outside the photo) and its footprint ``(S, 1, H, W)`` times the photo's own ``keep``.

    The inverse of ``py360convert.e2p(canvas, fov, yaw_deg, pitch_deg, (h, w),
    in_rot_deg=roll_deg)``: each canvas pixel's direction is rotated into the camera frame
    and projected with the pinhole of horizontal ``fov_deg``; inside the frustum it samples
    the photo (``grid_sample``, bilinear). ``width_px``: an equirect canvas ``(1, 3,
    width_px / 2, width_px)``; ``face_px``: a cubemap ``(6, 3, face_px, face_px)`` in
    :mod:`jointdiff.surfaces.cube` face order. Exactly one of them.
    """
    photo = as_image(photo, "photo")
    size = tuple(photo.shape[-2:])
    check_fov(fov_deg)
    if keep is not None:  # sampled with the photo, as a fourth channel
        photo = torch.cat([photo, as_mask(keep, size, "keep")])
    rotation = camera_rotation(yaw_deg, pitch_deg, roll_deg)
    if (width_px is None) == (face_px is None):
        raise ConfigError(f"give exactly one of width_px (equirect) and face_px (cubemap), got width_px={width_px!r}, face_px={face_px!r}")
    if width_px is not None:
        if not isinstance(width_px, int) or width_px < 2 or width_px % 2:
            raise ConfigError(f"width_px must be an even positive integer (equirect: height = width / 2), got {width_px!r}")
        source = _antialiased(photo, fov_deg, width_px / (2 * math.pi))
        rows = [_sample_photo(source, d, rotation, fov_deg, size) for d in _equirect_row_blocks(width_px)]
        placed = torch.cat(rows, dim=1)[None]
    else:
        if not isinstance(face_px, int) or face_px < 1:
            raise ConfigError(f"face_px must be a positive integer, got {face_px!r}")
        source = _antialiased(photo, fov_deg, face_px / 2)
        placed = _sample_photo(source, spherical.cube_directions(face_px), rotation, fov_deg, size).transpose(0, 1)
    image, inside = placed[:, :3], placed[:, -1:]
    return image, (placed[:, 3:4] * inside).clamp(0, 1) if keep is not None else inside


def _equirect_row_blocks(width_px: int, block_rows: int = 256):
    """Directions ``(rows, width_px, 3)`` of an equirect canvas's pixel centres, a block of
    rows at a time (a 8192 px wide canvas has 33 M pixels: float64 grids of it at once
    would take gigabytes)."""
    height = width_px // 2
    lat_all = -90.0 * spherical.pixel_centres(height)
    lon = 180.0 * spherical.pixel_centres(width_px)
    for start in range(0, height, block_rows):
        lat = lat_all[start : start + block_rows]
        yield spherical.lonlat_to_directions(lon[None, :].expand(len(lat), -1), lat[:, None].expand(-1, width_px))


def place_on_sphere(
    photo: ImageLike, yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0, fov_deg: float = 90.0,
    width_px: int | None = None, *, face_px: int | None = None, keep: ImageLike | None = None,
    strength: float = 1.0, feather_px: int = DEFAULT_FEATHER_PX,
) -> InitImage:
    """Photo → 360° environment: the perspective ``photo`` (horizontal field of view
    ``fov_deg``, looking at ``yaw_deg``, ``pitch_deg``, rolled by ``roll_deg``) placed on an
    equirect canvas ``width_px`` wide (or a cubemap of ``face_px``); its footprint is kept
    and the rest of the sphere generated (strength 1: from noise). See
    :func:`sphere_footprint` for the projection. Use the same ``width_px`` / ``face_px`` as
    the ``equirect`` / ``cubemap`` geometry."""
    if width_px is None and face_px is None:
        raise ConfigError("place_on_sphere: give width_px (the equirect geometry's) or face_px (the cubemap's)")
    image, footprint = sphere_footprint(
        photo, yaw_deg, pitch_deg, roll_deg, fov_deg, width_px=width_px, face_px=face_px, keep=keep
    )
    return _init(image, footprint, strength, feather_px)


# -- on a plane ------------------------------------------------------------------------------


def _size(value: Any, name: str) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list)) or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigError(f"{name} must be (height, width) in pixels, two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def place_on_canvas(
    image: ImageLike, canvas_size_px: tuple[int, int], top_px: int = 0, left_px: int = 0, *,
    keep: ImageLike | None = None, strength: float = 1.0, feather_px: int = DEFAULT_FEATHER_PX,
) -> InitImage:
    """Outpainting on a plane canvas (``strip``, ``grid``): ``image`` ``(3, h, w)`` pasted on
    a canvas of ``canvas_size_px = (H, W)`` (the geometry's canvas size in pixels) with its
    top-left corner at ``(top_px, left_px)``; kept there, generated elsewhere. ConfigError
    when any part of it falls outside the canvas."""
    image = as_image(image)
    height, width = _size(canvas_size_px, "canvas_size_px")
    h, w = image.shape[-2:]
    for name, value in (("top_px", top_px), ("left_px", left_px)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer number of pixels, got {value!r}")
    if top_px < 0 or left_px < 0 or top_px + h > height or left_px + w > width:
        raise ConfigError(
            f"image of (h, w) = ({h}, {w}) at top_px = {top_px}, left_px = {left_px} does not fit inside the canvas "
            f"of (H, W) = ({height}, {width}): it must lie within rows 0..{height} and columns 0..{width}"
        )
    mask = as_mask(keep, (h, w))
    canvas = torch.zeros(3, height, width)
    kept = torch.zeros(1, height, width)
    canvas[:, top_px : top_px + h, left_px : left_px + w] = image
    kept[:, top_px : top_px + h, left_px : left_px + w] = mask
    return _init(canvas, kept, strength, feather_px)


def outpaint(
    image: ImageLike, left_px: int = 0, right_px: int = 0, up_px: int = 0, down_px: int = 0, *,
    keep: ImageLike | None = None, strength: float = 1.0, feather_px: int = DEFAULT_FEATHER_PX,
) -> InitImage:
    """:func:`place_on_canvas` on a canvas grown by ``left_px``, ``right_px``, ``up_px`` and
    ``down_px`` around ``image``: the canvas is ``(h + up + down, w + left + right)``, which a
    strip (one window across) or grid geometry must then have."""
    image = as_image(image)
    for name, value in (("left_px", left_px), ("right_px", right_px), ("up_px", up_px), ("down_px", down_px)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer number of pixels, got {value!r}")
    h, w = image.shape[-2:]
    size = (h + up_px + down_px, w + left_px + right_px)
    return place_on_canvas(image, size, up_px, left_px, keep=keep, strength=strength, feather_px=feather_px)


def _band(length: int, band_px: int, name: str, what: str) -> int:
    if not isinstance(band_px, int) or isinstance(band_px, bool) or band_px < 1:
        raise ConfigError(f"{name} must be a positive integer number of pixels, got {band_px!r}")
    if band_px >= length:
        raise ConfigError(f"{name} = {band_px} leaves nothing of the {what} ({length} px) to keep; use less than {length}")
    return band_px


def loop_panorama(
    pano: ImageLike, seam_px: int, direction: Literal["horizontal", "vertical"] = "horizontal", *,
    keep: ImageLike | None = None, strength: float = 1.0, feather_px: int = DEFAULT_FEATHER_PX,
) -> InitImage:
    """A panorama made to loop: for a canvas that wraps along its length (``strip`` with
    ``wrap = true``; also ``equirect``, whose longitude wraps), a band of ``seam_px`` across
    the wrap seam is regenerated and the rest kept.

    Geometry: on a wrapped canvas the last column *is* the first column's neighbour, so the
    band is simply the ``seam_px // 2`` first and the ``seam_px - seam_px // 2`` last columns
    (rows for ``direction = "vertical"``): the windows that cross the wrap denoise it as one
    piece, and the output stays registered with the input (no roll to undo). ConfigError
    when the pano is taller than long (a strip's length is its longer side) or the band
    leaves nothing.
    """
    pano = as_image(pano, "pano")
    axis = -1 if direction == "horizontal" else -2
    if direction not in ("horizontal", "vertical"):
        raise ConfigError(f"direction must be 'horizontal' or 'vertical', got {direction!r}")
    length, across = pano.shape[axis], pano.shape[-1 if axis == -2 else -2]
    if length < across:
        raise ConfigError(
            f"pano of (h, w) = {tuple(pano.shape[-2:])} is shorter along its {direction} length than across; "
            f"a {direction} loop needs a panorama at least as long as it is wide (or direction = "
            f"{'vertical' if direction == 'horizontal' else 'horizontal'!r})"
        )
    _band(length, seam_px, "seam_px", "panorama")
    mask = as_mask(keep, tuple(pano.shape[-2:])).clone()
    head, tail = seam_px // 2, seam_px - seam_px // 2
    mask.narrow(axis, 0, head).zero_()
    mask.narrow(axis, length - tail, tail).zero_()
    return _init(pano, mask, strength, feather_px)


def make_tileable(
    photo: ImageLike, border_px: int, *, keep: ImageLike | None = None, strength: float = 1.0,
    feather_px: int = DEFAULT_FEATHER_PX,
) -> InitImage:
    """A photo made tileable on the ``torus`` geometry (height_px, width_px = the photo's):
    the middle is kept and a band of ``border_px`` along all four edges regenerated. On the
    torus the bands of opposite edges meet across the wrap, so each seam lies in the middle
    of a ``2 · border_px`` band the windows denoise as one piece."""
    photo = as_image(photo, "photo")
    h, w = photo.shape[-2:]
    _band(min(h, w) // 2, border_px, "border_px", "photo's half side")
    mask = as_mask(keep, (h, w)).clone()
    mask[:, :border_px] = 0
    mask[:, h - border_px :] = 0
    mask[:, :, :border_px] = 0
    mask[:, :, w - border_px :] = 0
    return _init(photo, mask, strength, feather_px)


def upscale(
    image: ImageLike, factor: float | None = None, strength: float = 0.4, *,
    size_px: tuple[int, int] | None = None, keep: ImageLike | None = None, feather_px: int = 0,
) -> InitImage:
    """Upscaling (SDEdit, Meng et al. 2022): ``image`` upsampled bicubically by ``factor`` (or
    to ``size_px = (H, W)``, which must keep its aspect within 1 %) and re-denoised from
    ``strength`` (0.4: the last 40 % of the steps; higher adds more detail and departs
    more). Nothing is held (``keep`` None) unless a mask of the image is given. The canvas
    of the job (e.g. ``equirect`` ``width_px``) must have the new size."""
    image = as_image(image)
    h, w = image.shape[-2:]
    if (factor is None) == (size_px is None):
        raise ConfigError(f"upscale: give exactly one of factor and size_px, got factor={factor!r}, size_px={size_px!r}")
    if factor is not None:
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 1 <= factor <= 16:
            raise ConfigError(f"factor must be a number in [1, 16], got {factor!r}")
        size_px = (round(h * factor), round(w * factor))
    size = _size(size_px, "size_px")
    check_aspect((h, w), size, "image", "upscale")
    mask = None if keep is None else _resize(as_mask(keep, (h, w)), size, "bilinear").clamp(0, 1)
    return _init(_resize(image, size, "bicubic").clamp(-1, 1), mask, strength, feather_px)


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``(C, h, w)`` → ``(C, H, W)`` (align_corners=False, as PIL and diffusers resize)."""
    return F.interpolate(image[None], size=size, mode=mode, align_corners=False)[0]


def check_aspect(size: tuple[int, int], target: tuple[int, int], name: str, placement: str, tolerance: float = 0.01) -> None:
    """ConfigError when an image of ``size = (h, w)`` does not have the aspect of ``target``
    ``(H, W)`` within ``tolerance`` (relative)."""
    aspect, wanted = size[1] / size[0], target[1] / target[0]
    if abs(aspect / wanted - 1) > tolerance:
        raise ConfigError(
            f"{name} of (h, w) = {tuple(size)} (aspect {aspect:.3g}) does not fit the {placement} canvas of "
            f"(H, W) = {tuple(target)} (aspect {wanted:.3g}); crop or pad it to that aspect first"
        )

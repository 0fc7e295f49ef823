"""Start from an image: image-to-image and masked inpainting / outpainting on every geometry.

A job given an :class:`InitImage` does not start from pure noise (text-to-image) but from
the image's latents noised to an intermediate level (SDEdit, Meng et al. 2022; diffusers'
``StableDiffusionImg2ImgPipeline`` / ``FluxImg2ImgPipeline``), and may hold part of the
image fixed while the rest is generated (RePaint, Lugmayr et al. 2022; Blended Latent
Diffusion, Avrahami et al. 2023; diffusers' ``StableDiffusionInpaintPipeline`` with a plain
4-channel UNet):

1. the canvas image ``(S, 3, H_px, W_px)`` is encoded through the model family
   (:meth:`~jointdiff.core.family.ModelFamily.encode`, a posterior sample with a keyed
   generator per sheet, ``generator_for("init_image", sheet)``) by the geometry's
   :meth:`~jointdiff.core.geometry.Geometry.encode`, with circular context on wrapped axes;
2. ``strength`` picks the first step as diffusers' img2img does (:func:`start_step`); the
   initial canvas is ``family.add_noise(x0, noise, timesteps[start])`` with the job's unit
   noise. At ``strength = 1`` the canvas is the text-to-image one, ``noise · init_noise_sigma``
   (diffusers' inpaint pipelines' ``is_strength_max``), so strength 1 without a keep mask
   equals text-to-image exactly for every family;
3. with a ``keep`` mask, after every step the canvas is
   ``m ⊙ add_noise(x0, noise, t_next) + (1 − m) ⊙ canvas`` (``m ⊙ x0 + (1 − m) ⊙ canvas`` after
   the last one), with the *same* unit noise as the initial canvas (as diffusers' inpaint
   pipelines do: deterministic, and invariant to batching and resume); with ``x0`` fusion
   (SyncTweedies) the fused x̂0 is blended with ``x0`` instead, before the windows step.

Tensor conventions: pixels ``(S, 3, H_px, W_px)`` in [-1, 1]; masks ``(S, 1, H_px, W_px)`` in
[0, 1] (1 = keep the image there); latents ``(S, C, H, W)`` float32 in the family's canvas
latent space; ``f`` = the VAE factor (``H_px = f·H``).
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from jointdiff.utils import images

from jointdiff.core.context import keyed_generator
from jointdiff.models import tiled_decode
from jointdiff.utils.errors import ConfigError
from jointdiff.utils.fingerprint import tensor_digest

if TYPE_CHECKING:
    from jointdiff.core.family import ModelFamily
    from jointdiff.core.geometry import Geometry
    from jointdiff.engine.fusion import LatentFusion

ENCODE_PURPOSE = "init_image"
"""The key of the posterior noise of sheet ``s``: ``generator_for("init_image", s)``."""
RANGE_SLACK = 1e-3
"""How far outside [-1, 1] (pixels) or [0, 1] (masks) values may stray (rounding)."""


@dataclass(eq=False)
class InitImage:
    """An image to start from (and optionally to keep in part), for :class:`JointDiffusion`'s
    ``init``.

    ``image``: canvas pixels ``(S, 3, H_px, W_px)`` in [-1, 1], one per canvas sheet, at the
    geometry's canvas size in pixels (:func:`canvas_size_px`; ``(3, H_px, W_px)`` is taken as
    one sheet). ``strength`` in [0, 1] (diffusers' img2img sense): the job runs the last
    ``int(steps · strength)`` steps (:func:`start_step`); 1 starts from pure noise, 0 returns
    the image's VAE round trip. ``keep``: ``(S, 1, H_px, W_px)`` (or ``(H_px, W_px)`` for one
    sheet) in [0, 1], 1 where the image is held every step (inpainting: generate where 0;
    outpainting: keep the photo, generate around it); None: nothing held (plain img2img).
    ``feather_px``: the keep mask's edge is softened inward (:func:`feather_mask`: from about
    0 at its edge to 1 about ``feather_px`` pixels inside, never outside it), so generated
    content blends into the kept image.

    Shapes and values are checked on construction (one-line ConfigError naming the argument);
    the size against the canvas by :meth:`check` once the geometry is set up. Tensors are
    stored float32, detached.
    """

    image: torch.Tensor
    strength: float = 1.0
    keep: torch.Tensor | None = None
    feather_px: int = 0

    def __post_init__(self) -> None:
        self.image = _checked_image(self.image)
        if isinstance(self.strength, bool) or not isinstance(self.strength, numbers.Real) or not 0.0 <= self.strength <= 1.0:
            raise ConfigError(f"init strength must be a number in [0, 1], got {self.strength!r}")
        self.strength = float(self.strength)
        if isinstance(self.feather_px, bool) or not isinstance(self.feather_px, numbers.Integral) or self.feather_px < 0:
            raise ConfigError(f"init feather_px must be an integer >= 0, got {self.feather_px!r}")
        self.feather_px = int(self.feather_px)
        if self.keep is not None:
            self.keep = _checked_mask(self.keep, self.image.shape)

    @classmethod
    def from_pil(cls, image: Any, strength: float = 1.0, *, keep: Any = None, repaint: Any = None,
                 feather_px: int = 0) -> InitImage:
        """One-sheet canvases from a PIL image (converted to RGB, ``x / 127.5 − 1`` as
        diffusers' image processor) and optionally a mask, a PIL image (converted to
        grayscale, white = 1) or a tensor ``(H_px, W_px)`` / ``(1, 1, H_px, W_px)`` in [0, 1]:
        ``keep`` (1 = keep the image) or ``repaint`` (1 = generate there, diffusers'
        inpainting convention; ``keep = 1 − repaint``), not both."""
        if keep is not None and repaint is not None:
            raise ConfigError("init: give keep (1 = keep the image) or repaint (1 = generate there), not both")
        pixels = pil_to_tensor(image, "RGB", "init image") * 2 - 1
        mask = keep if keep is not None else repaint
        if mask is not None and not isinstance(mask, torch.Tensor):
            mask = pil_to_tensor(mask, "L", "init mask")
        if repaint is not None:
            mask = 1 - _checked_mask(mask, pixels.shape, "repaint")
        return cls(pixels, strength, mask, feather_px)

    @classmethod
    def from_files(cls, image: str | Path, strength: float = 1.0, *, keep: str | Path | None = None,
                   repaint: str | Path | None = None, feather_px: int = 0) -> InitImage:
        """:meth:`from_pil` of image files (ConfigError naming a file that cannot be read)."""
        return cls.from_pil(
            open_image(image, "init image"), strength,
            keep=open_image(keep, "init keep mask") if keep is not None else None,
            repaint=open_image(repaint, "init repaint mask") if repaint is not None else None,
            feather_px=feather_px,
        )

    def check(self, geometry: Geometry) -> None:
        """ConfigError unless the image (and so its mask) is ``(S, 3, f·H, f·W)``, the canvas
        of the set-up ``geometry`` in pixels (:func:`canvas_size_px`)."""
        sheets, height, width = canvas_size_px(geometry)
        got = tuple(self.image.shape)
        if got != (sheets, 3, height, width):
            raise ConfigError(
                f"init image has shape {got} but geometry {geometry.name!r} has a canvas of {sheets} sheet(s) of "
                f"{height}×{width} px: expected {(sheets, 3, height, width)}"
            )

    def describe(self) -> str:
        """A stable text of the init image (hashes of its tensors), for checkpoint fingerprints."""
        keep = tensor_digest(self.keep) if self.keep is not None else "None"
        return f"InitImage({tensor_digest(self.image)}, strength={self.strength!r}, keep={keep}, feather_px={self.feather_px})"


def _checked_image(image: Any) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise ConfigError(
            f"init image must be a tensor (S, 3, H_px, W_px) in [-1, 1] (or use InitImage.from_pil), got {type(image).__name__}"
        )
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3 or image.shape[0] < 1:
        raise ConfigError(f"init image must have shape (S, 3, H_px, W_px), got {tuple(image.shape)}")
    image = image.detach().float()
    if not bool(torch.isfinite(image).all()) or image.min() < -1 - RANGE_SLACK or image.max() > 1 + RANGE_SLACK:
        lo, hi = float(image.nan_to_num().min()), float(image.nan_to_num().max())
        raise ConfigError(f"init image values must be finite and in [-1, 1], got the range [{lo:.3g}, {hi:.3g}]")
    return image.clamp(-1, 1)


def _checked_mask(mask: Any, image_shape: torch.Size, what: str = "keep") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ConfigError(f"init {what} mask must be a tensor (S, 1, H_px, W_px) in [0, 1], got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None, None]
    sheets, _, height, width = image_shape
    if tuple(mask.shape) != (sheets, 1, height, width):
        raise ConfigError(
            f"init {what} mask has shape {tuple(mask.shape)} but the image is {tuple(image_shape)}: "
            f"expected {(sheets, 1, height, width)}"
        )
    mask = mask.detach().float()
    if not bool(torch.isfinite(mask).all()) or mask.min() < -RANGE_SLACK or mask.max() > 1 + RANGE_SLACK:
        raise ConfigError(f"init {what} mask values must be finite and in [0, 1], got the range "
                          f"[{float(mask.nan_to_num().min()):.3g}, {float(mask.nan_to_num().max()):.3g}]")
    return mask.clamp(0, 1)


def pil_to_tensor(image: Any, mode: str, what: str) -> torch.Tensor:
    """A PIL image → ``(1, channels, H, W)`` float32 in [0, 1] (``mode``: ``"RGB"`` or ``"L"``),
    read as :func:`jointdiff.utils.images.load_tensor` reads it (upright, 16-bit and float
    images by their real range)."""
    if not hasattr(image, "convert"):
        raise ConfigError(f"{what} must be a PIL image, got {type(image).__name__}")
    return images.load_tensor(image, mode, what)[None]


def open_image(path: str | Path, what: str) -> Any:
    """The image file ``path`` as a loaded PIL image (ConfigError naming it otherwise)."""
    return images.open_image_file(path, what)


def canvas_size_px(geometry: Geometry) -> tuple[int, int, int]:
    """``(S, H_px, W_px)`` of a set-up geometry's canvas in pixels: the size an init image
    (per sheet) must have."""
    sheets, height, width = geometry.canvas_shape_latent
    scale = geometry.latent_scale
    return sheets, scale * height, scale * width


def start_step(num_steps: int, strength: float, model=None) -> int:
    """The first step run (of ``num_steps``) for ``strength``, as the family's stock
    image-to-image pipeline picks it (:meth:`~jointdiff.core.family.ModelFamily.start_step`;
    without a model, ``StableDiffusionImg2ImgPipeline``'s rule)."""
    if model is not None:
        return model.start_step(num_steps, strength)
    return num_steps - min(int(num_steps * strength), num_steps)


# -- masks ---------------------------------------------------------------------------------


def _pad_axis(x: torch.Tensor, dim: int, pad: int, wrap: bool) -> torch.Tensor:
    """``x`` grown by ``pad`` along ``dim`` on both sides: circularly, or repeating the edge."""
    if pad == 0:
        return x
    size = x.shape[dim]
    if wrap:
        index = torch.arange(-pad, size + pad, device=x.device) % size
    else:
        index = torch.arange(-pad, size + pad, device=x.device).clamp(0, size - 1)
    return x.index_select(dim, index)


def _box_filter(x: torch.Tensor, radius: int, wraps: tuple[bool, bool], op: str) -> torch.Tensor:
    """Separable ``(2r+1)``-box mean (``op = "mean"``) or minimum (``"min"``) of ``(S, 1, H, W)``,
    circular along wrapped axes, edge-repeating along the others (a canvas border is no edge
    of the mask)."""
    k = 2 * radius + 1
    for dim, wrapped, kernel in ((-2, wraps[0], (k, 1)), (-1, wraps[1], (1, k))):
        padded = _pad_axis(x, dim, radius, wrapped)
        x = F.avg_pool2d(padded, kernel, stride=1) if op == "mean" else -F.max_pool2d(-padded, kernel, stride=1)
    return x


def feather_mask(keep: torch.Tensor, feather_px: int, wraps: tuple[bool, bool] = (False, False)) -> torch.Tensor:
    """Soften a keep mask ``(S, 1, H_px, W_px)`` inward: erode it by ``r = ⌈feather_px / 2⌉``
    pixels (minimum filter), then average over ``(2r+1)²`` boxes. The result stays 0 wherever
    ``keep`` is 0 (nothing outside the kept region is held) and, inside a binary region, ramps
    linearly from ``1/(2r+1)`` at its edge to 1 at ``2r`` pixels in. Circular along the
    ``wraps = (y, x)`` axes; per sheet (cube faces are softened each on its own)."""
    if feather_px <= 0:
        return keep
    radius = -(-feather_px // 2)
    return _box_filter(_box_filter(keep, radius, wraps, "min"), radius, wraps, "mean") * (keep > 0)


def latent_mask(keep: torch.Tensor, scale: int, feather_px: int = 0, wraps: tuple[bool, bool] = (False, False)) -> torch.Tensor:
    """The keep mask on the latent grid ``(S, 1, H, W)`` from pixels ``(S, 1, scale·H,
    scale·W)``: feathered (:func:`feather_mask`), then area-downsampled (the mean over each
    ``scale × scale`` cell; a cell half kept is held with weight ½)."""
    return F.avg_pool2d(feather_mask(keep.float(), feather_px, wraps), scale)


# -- the job's side ------------------------------------------------------------------------


def encode_image(pixels: torch.Tensor, model: ModelFamily, geometry: Geometry, seed: int,
                 tile_latent: int | None = None) -> torch.Tensor:
    """Canvas pixels ``(S, 3, H_px, W_px)`` → clean latents ``x0`` ``(S, C, H, W)`` float32 on
    the model's device, through the geometry's :meth:`~jointdiff.core.geometry.Geometry.encode`
    (circular context on wrapped axes) and the family's ``encode``: a posterior sample drawn
    with the generator keyed ``(seed, "init_image", sheet)`` (on the CPU, so the same on
    every device), as diffusers' img2img pipelines sample with theirs.

    Large encodes go in tiles by the rule of the final decode (``tile_latent`` as the
    engine's ``decode_tile_latent``: None tiles with the model's native window above
    :data:`~jointdiff.models.tiled_decode.AUTO_TILE_MEGAPIXELS`, 0 never, a number is the tile side
    in latent cells): :func:`encode_tiled`."""
    scale, native = geometry.latent_scale, model.latent_format.native_window

    def encode(sheet_pixels: torch.Tensor, sheet: int) -> torch.Tensor:
        shape = (1, 3, sheet_pixels.shape[-2] // scale, sheet_pixels.shape[-1] // scale)
        tile = tiled_decode.decode_plan(shape, scale, native, tile_latent)
        if tile is None:
            generator = keyed_generator(seed, ENCODE_PURPOSE, sheet)
            return model.encode(sheet_pixels.to(model.device), generator).float()
        return encode_tiled(sheet_pixels, model, seed, sheet, tile, scale)

    with torch.no_grad():
        return geometry.encode(pixels, encode).to(model.device, torch.float32)


def encode_tiled(pixels: torch.Tensor, model: ModelFamily, seed: int, sheet: int, tile_latent: int, scale: int) -> torch.Tensor:
    """Encode one sheet's pixels ``(1, 3, scale·H, scale·W)`` in tiles of ``tile_latent``
    cells overlapping by :func:`~jointdiff.models.tiled_decode.default_overlap`, blended with the
    tiled decode's linear ramps (a partition of unity per axis,
    :func:`~jointdiff.models.tiled_decode.axis_weights`); tile ``(i, j)`` samples its posterior with
    the generator keyed ``(seed, "init_image", sheet, i, j)``. The encoder's memory is one
    tile's; an encoder without spatial context is reproduced exactly. Returns ``(1, C, H, W)``."""
    height, width = pixels.shape[-2] // scale, pixels.shape[-1] // scale
    overlap = tiled_decode.default_overlap(tile_latent)
    rows = tiled_decode.axis_weights(height, tile_latent, overlap, 1)
    cols = tiled_decode.axis_weights(width, tile_latent, overlap, 1)
    th, tw = min(tile_latent, height), min(tile_latent, width)
    out = None
    for i, (top, weight_y) in enumerate(rows):
        for j, (left, weight_x) in enumerate(cols):
            crop = pixels[..., scale * top : scale * (top + th), scale * left : scale * (left + tw)]
            latents = model.encode(crop.to(model.device), keyed_generator(seed, ENCODE_PURPOSE, sheet, i, j)).float()
            if out is None:
                out = latents.new_zeros(latents.shape[0], latents.shape[1], height, width)
            weight = weight_y.to(latents.device)[:, None] * weight_x.to(latents.device)[None, :]
            out[..., top : top + th, left : left + tw] += latents * weight
    return out


@dataclass
class PreparedInit:
    """An init image ready for one job (``JobContext.init_image``; for plugins such as an
    inpainting model's conditioner). ``latents``: the image's clean latents ``x0`` ``(S, C,
    H, W)`` float32 on the model's device. ``keep``: the keep mask on the latent grid ``(S, 1,
    H, W)`` (feathered, area-downsampled), or None. ``keep_px``: the feathered pixel mask
    ``(S, 1, H_px, W_px)``, or None. ``first_step``: the index into the job's timesteps of the
    first step run (``len(timesteps)``: none, the result is ``x0``). ``init``: what it was made from."""

    init: InitImage
    latents: torch.Tensor
    keep: torch.Tensor | None
    keep_px: torch.Tensor | None
    first_step: int
    noise_scheduler: Any = field(default=None, repr=False)
    """A copy of the job's scheduler without a begin index, for ``add_noise`` (set by
    :func:`start_canvas`, after plugins' ``setup``)."""


def prepare(init: InitImage, model: ModelFamily, geometry: Geometry, seed: int, num_steps: int,
            tile_latent: int | None = None) -> PreparedInit:
    """Check ``init`` against the set-up ``geometry``, encode it (:func:`encode_image`, in
    tiles by ``tile_latent`` as the engine's ``decode_tile_latent``),
    bring its keep mask to the latent grid (:func:`latent_mask`) and find the first step
    (:func:`start_step` times the scheduler's order)."""
    init.check(geometry)
    keep = keep_px = None
    if init.keep is not None:
        keep_px = feather_mask(init.keep, init.feather_px, geometry.wraps()).to(model.device)
        keep = F.avg_pool2d(keep_px, geometry.latent_scale)
    order = int(getattr(model.scheduler, "order", 1) or 1)
    latents = encode_image(init.image, model, geometry, seed, tile_latent)
    return PreparedInit(init, latents, keep, keep_px, start_step(num_steps, init.strength, model) * order)


def start_canvas(prepared: PreparedInit, noise: torch.Tensor, model: ModelFamily, scheduler: Any) -> tuple[torch.Tensor, Any]:
    """The first canvas and the scheduler the window batches copy.

    ``noise``: the job's unit noise ``(S, C, H, W)``; ``scheduler``: the job's, with its
    timesteps set (left unchanged). Strength 1 (``first_step`` 0): ``noise ·
    initial_noise_sigma``, the text-to-image canvas (diffusers' inpaint pipelines'
    ``is_strength_max``; diffusers' img2img would add ``√ᾱ_T x0`` for VP models). Otherwise
    ``add_noise(x0, noise, timesteps[first_step])`` (img2img), or ``x0`` when no step is left.
    The returned scheduler is a copy whose begin index is ``first_step`` (as
    ``get_timesteps`` sets it)."""
    prepared.noise_scheduler = copy.deepcopy(scheduler)
    timesteps, first = scheduler.timesteps, prepared.first_step
    if first == 0:
        canvas = noise * model.initial_noise_sigma(scheduler)
    elif first >= len(timesteps):
        canvas = prepared.latents.clone()
    else:
        canvas = model.add_noise(prepared.latents, noise, timesteps[first], prepared.noise_scheduler).float()
    batch_scheduler = copy.deepcopy(scheduler)
    if first and hasattr(batch_scheduler, "set_begin_index"):
        batch_scheduler.set_begin_index(first)
    return canvas, batch_scheduler


class KeepBlend:
    """The keep mask's blend after every step (``fusion.keep``, see :mod:`jointdiff.engine.fusion`).

    ``latent`` fusion (the canvas holds ``x_{t_next}``): ``m ⊙ add_noise(x0, noise, t_next) +
    (1 − m) ⊙ canvas``, and ``m ⊙ x0 + (1 − m) ⊙ canvas`` after the last step (RePaint's /
    Blended Latent Diffusion's known-region replacement; diffusers' inpaint pipeline with a
    4-channel UNet). ``noise`` is the job's initial unit noise at every step (as diffusers'),
    so the blend is deterministic and keyed like the job. ``x0`` fusion (the canvas holds the
    fused x̂0, before the windows step toward it): ``m ⊙ x0 + (1 − m) ⊙ x̂0`` at every step.
    Only family methods (``add_noise``) are used."""

    def __init__(self, prepared: PreparedInit, noise: torch.Tensor, model: ModelFamily, x0_fusion: bool) -> None:
        self.mask = prepared.keep
        self.latents = prepared.latents
        self.noise = noise
        self.model = model
        self.scheduler = prepared.noise_scheduler
        self.x0_fusion = x0_fusion

    def __call__(self, canvas: torch.Tensor, step_index: int) -> torch.Tensor:
        timesteps = self.scheduler.timesteps
        if self.x0_fusion or step_index + 1 >= len(timesteps):
            target = self.latents
        else:
            target = self.model.add_noise(self.latents, self.noise, timesteps[step_index + 1], self.scheduler).float()
        mask = self.mask.to(canvas.device)
        return mask * target.to(canvas.device) + (1 - mask) * canvas


def attach(prepared: PreparedInit, fusion: LatentFusion, noise: torch.Tensor, model: ModelFamily, x0_fusion: bool) -> None:
    """Hook an init image into a job's fusion: resampled views of ``x0`` fusion start from
    the image noised to the first step (each with its own view noise,
    :meth:`~jointdiff.engine.fusion.TweedieFusion.start_from`), and the keep mask, if any, is
    blended after every step (:class:`KeepBlend`)."""
    first, scheduler = prepared.first_step, prepared.noise_scheduler
    start_from = getattr(fusion, "start_from", None)
    if start_from is not None and 0 < first < len(scheduler.timesteps):
        t = scheduler.timesteps[first]
        start_from(prepared.latents, lambda x0, unit: model.add_noise(x0, unit, t, scheduler).float())
    elif start_from is not None and first >= len(scheduler.timesteps):
        start_from(prepared.latents, lambda x0, unit: x0)
    if prepared.keep is not None:
        fusion.keep = KeepBlend(prepared, noise, model, x0_fusion)

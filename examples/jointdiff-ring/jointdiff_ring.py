# --8<-- [start:module-docstring]
"""jointdiff-ring: a ring (annulus) geometry for jointdiff.

The canvas is one looping strip in polar coordinates, ``(1, C, H, W)`` latents: row 0 is the
ring's outer edge and rows run inwards (``H`` = thickness), column 0 is at 12 o'clock and
columns run clockwise (``W`` = circumference of the middle circle). Windows are square crops
of that strip; along the ring they wrap across the seam, so the picture closes into a loop.
The output image maps the strip onto an annulus (a polar warp): a circular frieze, a wreath,
or, with a small hole, a "little planet". Windows follow MultiDiffusion (Bar-Tal et al.
2023): every window is denoised by the model and overlapping results are averaged (Eq. 5).
"""
# --8<-- [end:module-docstring]

from __future__ import annotations

import math
from typing import Sequence

import pydantic
import torch
import torch.nn.functional as F
from PIL import Image

from jointdiff import hookimpl
from jointdiff.errors import ConfigError
from jointdiff.families.base import LatentFormat
from jointdiff.geometry import DecodeFn, Geometry
from jointdiff.options import PluginOptions

# --8<-- [start:api]
# The plugin API this module was written against: jointdiff refuses to load it (and says
# why) if its own plugin API has a different major version or an older minor one.
REQUIRES_PLUGIN_API = "2.0"
# --8<-- [end:api]


# --8<-- [start:options]
class RingGeometry(Geometry):
    """A ring of overlapping square windows; the image is an annulus.

    Sizes: ``circumference_px`` is the length of the ring's middle circle and
    ``thickness_px`` its radial width, in pixels; windows and strides are in latent cells
    (unset: the model's native window, e.g. 64 cells for SD, and a quarter of it). The
    middle circle keeps the strip's scale; the outer half is stretched and the inner
    half squeezed along the ring by ``radius / middle radius``.
    """

    name = "ring"

    class Options(PluginOptions):
        circumference_px: int = pydantic.Field(4096, gt=0, description="length of the middle circle")
        thickness_px: int = pydantic.Field(512, gt=0, description="radial width of the ring")
        window_latent: int | None = pydantic.Field(
            None, gt=0, description="window side in latent cells; None: the model's native window"
        )
        stride_latent: int | None = pydantic.Field(
            None, gt=0, description="distance between windows in latent cells; None: window // 4"
        )

        @pydantic.model_validator(mode="after")
        def _check(self):
            if self.circumference_px <= math.pi * self.thickness_px:
                raise ValueError(
                    f"circumference_px ({self.circumference_px}) must exceed pi * thickness_px "
                    f"({math.pi * self.thickness_px:.0f}), or the ring has no hole"
                )
            return self

    @classmethod
    def example_options(cls) -> dict:
        """Small options for tests: 7 windows of 32 latent cells around a 896 px ring."""
        return {"circumference_px": 896, "thickness_px": 256, "window_latent": 32, "stride_latent": 16}
# --8<-- [end:options]

    # --8<-- [start:setup]
    def setup(self, latent: LatentFormat | int) -> None:
        super().setup(latent)  # stores latent_format and latent_scale
        o, scale, patch = self.options, self.latent_scale, self.latent_format.patch
        window = self.window_side(o.window_latent)  # None: the model's native window
        stride = max(patch, window // 4 // patch * patch) if o.stride_latent is None else o.stride_latent
        self.check_stride(stride, window)  # whole patches, at most the window
        for label, value in (("circumference_px", o.circumference_px), ("thickness_px", o.thickness_px)):
            if value % (scale * patch) or value // scale < window:
                raise ConfigError(
                    f"ring: {label} = {value} must be a multiple of {scale * patch} px (the VAE "
                    f"factor times the patch) and at least one window ({window * scale} px)"
                )
        self._window_side = window
        self._size = (o.thickness_px // scale, o.circumference_px // scale)
        rows = radial_starts(self._size[0], window, stride)
        columns = ring_starts(self._size[1], window, stride, patch)
        self.origins = [(top, left) for top in rows for left in columns]

    @property
    def canvas_shape_latent(self) -> tuple[int, int, int]:
        return (1, *self._size)

    @property
    def window_size_latent(self) -> tuple[int, int]:
        return (self._window_side, self._window_side)

    @property
    def num_windows(self) -> int:
        return len(self.origins)

    def window_origins_latent(self) -> torch.Tensor:
        """``(N, 2)`` ``(top, left)`` of the windows in latent cells (for positional ids)."""
        return torch.tensor(self.origins, dtype=torch.long)
    # --8<-- [end:setup]

    # --8<-- [start:extract-insert]
    def _columns(self, left: int, device: torch.device) -> torch.Tensor:
        """Canvas columns of a window starting at ``left``, wrapping around the ring."""
        return (left + torch.arange(self._window_side, device=device)) % self._size[1]

    def extract(self, canvas: torch.Tensor, window_ids: Sequence[int]) -> torch.Tensor:
        """Windows ``(B, C, h, w)`` cut from the canvas ``(1, C, H, W)``."""
        h = self._window_side
        crops = []
        for window_id in window_ids:
            top, left = self.origins[window_id]
            crops.append(canvas[0, :, top : top + h].index_select(-1, self._columns(left, canvas.device)))
        return torch.stack(crops)

    def insert(self, target: torch.Tensor, values: torch.Tensor, window_ids: Sequence[int]) -> None:
        """Add windows ``(B, C', h, w)`` into ``target`` ``(1, C', H, W)`` in place (the
        adjoint of :meth:`extract`). A window's columns are distinct, so ``index_add_`` adds
        each value once and stays deterministic on GPUs."""
        h = self._window_side
        for b, window_id in enumerate(window_ids):
            top, left = self.origins[window_id]
            target[0, :, top : top + h].index_add_(-1, self._columns(left, target.device), values[b])
    # --8<-- [end:extract-insert]

    # --8<-- [start:decode]
    def decode(self, canvas: torch.Tensor, decode: DecodeFn) -> torch.Tensor:
        """Decode ``(1, C, H, W)`` with a few columns of circular context on both sides, so
        the VAE's zero padding leaves no seam at 12 o'clock; returns ``(1, 3, f*H, f*W)``."""
        pad = min(8, canvas.shape[-1])
        looped = torch.cat([canvas[..., -pad:], canvas, canvas[..., :pad]], dim=-1)
        pixels = decode(looped)
        cut = pad * self.latent_scale
        return pixels[..., cut : pixels.shape[-1] - cut]

    def to_images(self, pixels: torch.Tensor) -> list[Image.Image]:
        """The strip ``(1, 3, H_px, W_px)`` in [-1, 1] warped onto an RGBA annulus, transparent
        outside the ring (``JointResult.pixels`` keeps the unrolled strip)."""
        rgb, inside = ring_warp(pixels[0].float().cpu())
        alpha = inside.float() * 2 - 1
        rgba = torch.cat([rgb, alpha[None]]).add(1).div(2).clamp(0, 1).mul(255).round().to(torch.uint8)
        return [Image.fromarray(rgba.permute(1, 2, 0).numpy())]  # 4 channels: RGBA
    # --8<-- [end:decode]


# --8<-- [start:layout]
def radial_starts(extent: int, window: int, stride: int) -> list[int]:
    """Window tops across the ring (latent cells): every ``stride``, plus one flush with the
    inner edge so that every row is covered."""
    starts = list(range(0, extent - window + 1, stride))
    if starts[-1] + window < extent:
        starts.append(extent - window)
    return starts


def ring_starts(extent: int, window: int, stride: int, patch: int = 1) -> list[int]:
    """Window lefts around the ring (latent cells). The stride used is the largest divisor
    of both ``extent`` and ``window`` not above ``stride`` (whole ``patch`` cells): then the
    layout repeats every stride, every column is covered by exactly ``window / stride``
    windows and the seam at 12 o'clock is like any other column."""
    if extent == window:
        return [0]
    used = max(d for d in range(patch, stride + 1, patch) if extent % d == 0 and window % d == 0)
    return list(range(0, extent, used))
# --8<-- [end:layout]


# --8<-- [start:warp]
def ring_warp(strip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Polar warp of a strip ``(C, H_px, W_px)`` onto a square ``(C, D, D)`` image, and the
    ``(D, D)`` mask of pixels inside the ring.

    The middle circle has radius ``W_px / 2pi``; an image pixel at radius ``r`` and angle
    ``theta`` (degrees clockwise from 12 o'clock) samples the strip bilinearly at column
    ``theta / 360 * W_px`` and row ``r_outer - r`` (pixel-edge coordinates).
    """
    channels, height, width = strip.shape
    r_outer = width / (2 * math.pi) + height / 2
    side = 2 * math.ceil(r_outer)
    centre = torch.arange(side, dtype=torch.float64) + 0.5 - side / 2
    dy, dx = torch.meshgrid(centre, centre, indexing="ij")
    radius = torch.hypot(dx, dy)
    theta_deg = torch.rad2deg(torch.atan2(dx, -dy)) % 360
    column = theta_deg / 360 * width + 1  # +1: the strip gets one wrapped column each side
    row = r_outer - radius
    padded = torch.cat([strip[..., -1:], strip, strip[..., :1]], dim=-1)
    grid = torch.stack([2 * column / (width + 2) - 1, 2 * row / height - 1], dim=-1)
    grid = grid[None].to(strip.dtype)
    rgb = F.grid_sample(padded[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    inside = (row >= 0) & (row <= height)
    return rgb, inside
# --8<-- [end:warp]


# --8<-- [start:hook]
@hookimpl
def register_geometries(register):
    register(RingGeometry)
# --8<-- [end:hook]

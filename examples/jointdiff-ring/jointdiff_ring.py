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

import pydantic
import torch
import torch.nn.functional as F
from PIL import Image

from jointdiff.plugin import TiledGeometry, WindowOptions, hookimpl, resolve_window_stride

# --8<-- [start:api]
# The plugin API this module was written against: jointdiff refuses to load it (and says
# why) if its own plugin API has a different major version or an older minor one.
REQUIRES_PLUGIN_API = "2.1"
# --8<-- [end:api]


# --8<-- [start:options]
class RingGeometry(TiledGeometry):
    """A ring of overlapping square windows; the image is an annulus.

    Sizes: ``circumference_px`` is the length of the ring's middle circle and
    ``thickness_px`` its radial width, in pixels; windows and strides are in latent cells
    (unset: the model's native window, e.g. 64 cells for SD, and a quarter of it). The
    middle circle keeps the strip's scale; the outer half is stretched and the inner
    half squeezed along the ring by ``radius / middle radius``.
    """

    name = "ring"

    class Options(WindowOptions):  # window_latent and stride_latent, in latent cells
        circumference_px: int = pydantic.Field(4096, gt=0, description="length of the middle circle")
        thickness_px: int = pydantic.Field(512, gt=0, description="radial width of the ring")
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

    # --8<-- [start:layout]
    def canvas_size_px(self) -> tuple[int, int]:
        """``(height, width)`` of the strip in pixels: across the ring, then around it."""
        return self.options.thickness_px, self.options.circumference_px

    def size_option_names(self) -> tuple[str, str]:
        return ("thickness_px", "circumference_px")  # named in errors about the sizes

    def wraps(self) -> tuple[bool, bool]:
        return (False, True)  # the strip loops around the ring, not across it

    def window_stride_latent(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Square windows; an unset stride is a quarter window (the base's default: 1/8)."""
        o = self.options
        window, stride = resolve_window_stride(self, o.window_latent, o.stride_latent, fraction=4)
        return (window, window), (stride, stride)
    # --8<-- [end:layout]

    # --8<-- [start:decode]
    def to_images(self, pixels: torch.Tensor) -> list[Image.Image]:
        """The strip ``(1, 3, H_px, W_px)`` in [-1, 1] warped onto an RGBA annulus, transparent
        outside the ring (``JointResult.pixels`` keeps the unrolled strip)."""
        rgb, inside = ring_warp(pixels[0].float().cpu())
        alpha = inside.float() * 2 - 1
        rgba = torch.cat([rgb, alpha[None]]).add(1).div(2).clamp(0, 1).mul(255).round().to(torch.uint8)
        return [Image.fromarray(rgba.permute(1, 2, 0).numpy())]  # 4 channels: RGBA
    # --8<-- [end:decode]


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

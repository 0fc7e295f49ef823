"""Built-in crop geometries: ``strip`` (horizontal or vertical, optionally looping) and ``grid``.

Window and stride are in latent cells; defaults follow MultiDiffusion / SyncDiffusion
(a 64-cell window, i.e. 512 px for SD's VAE factor 8, and stride 8).
"""

from __future__ import annotations

from typing import Literal

import pydantic

from jointdiff import hookimpl
from jointdiff.options import PluginOptions
from jointdiff.tiling import TiledGeometry


class WindowOptions(PluginOptions):
    window_latent: int = pydantic.Field(64, gt=0, description="window side in latent cells")
    stride_latent: int = pydantic.Field(8, gt=0, description="distance between windows in latent cells")

    @pydantic.model_validator(mode="after")
    def _stride_within_window(self):
        if self.stride_latent > self.window_latent:
            raise ValueError(
                f"stride_latent ({self.stride_latent}) must not exceed window_latent "
                f"({self.window_latent}), or cells between windows are never denoised"
            )
        return self


class StripGeometry(TiledGeometry):
    """A strip one window wide: a horizontal panorama (or a vertical scroll).

    ``wrap`` closes the strip along its length into a seamless loop (a cylindrical
    panorama): windows run across the edge, every cell is covered equally and the final
    decode has circular context.
    """

    name = "strip"

    class Options(WindowOptions):
        length_px: int = pydantic.Field(2048, gt=0, description="strip length in pixels")
        direction: Literal["horizontal", "vertical"] = "horizontal"
        wrap: bool = False

    @classmethod
    def example_options(cls) -> dict:
        """Small options for tests: a 512×1024 px strip of three windows."""
        return {"length_px": 1024, "stride_latent": 32}

    def canvas_size_px(self) -> tuple[int, int]:
        across = self.options.window_latent * self.latent_scale
        if self.options.direction == "horizontal":
            return across, self.options.length_px
        return self.options.length_px, across

    def window_stride_latent(self):
        o = self.options
        return (o.window_latent, o.window_latent), (o.stride_latent, o.stride_latent)

    def size_option_names(self) -> tuple[str, str]:
        across = "window_latent (times the VAE factor)"
        return ("length_px", across) if self.options.direction == "vertical" else (across, "length_px")

    def wraps(self) -> tuple[bool, bool]:
        horizontal = self.options.direction == "horizontal"
        return (self.options.wrap and not horizontal, self.options.wrap and horizontal)


class GridGeometry(TiledGeometry):
    """A 2D grid of overlapping windows over a canvas of any size (MultiDiffusion)."""

    name = "grid"

    class Options(WindowOptions):
        height_px: int = pydantic.Field(1024, gt=0)
        width_px: int = pydantic.Field(1024, gt=0)

    @classmethod
    def example_options(cls) -> dict:
        """Small options for tests: a 768×1024 px canvas of 2×3 windows."""
        return {"height_px": 768, "width_px": 1024, "stride_latent": 32}

    def canvas_size_px(self) -> tuple[int, int]:
        return self.options.height_px, self.options.width_px

    def window_stride_latent(self):
        o = self.options
        return (o.window_latent, o.window_latent), (o.stride_latent, o.stride_latent)


@hookimpl
def register_geometries(register):
    register(StripGeometry)
    register(GridGeometry)

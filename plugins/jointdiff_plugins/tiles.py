"""Built-in crop geometries: ``strip`` (horizontal or vertical, optionally looping) and ``grid``.

Window and stride are in latent cells. Unset, the window is the model's native one (64 cells
= 512 px for SD 1.x/2.x, 128 cells = 1024 px for SDXL or FLUX) and the stride ``window // 8``:
MultiDiffusion's and SyncDiffusion's 64-cell window and stride 8 with SD.
"""

from __future__ import annotations

from typing import Literal

import pydantic

from jointdiff.plugin import TiledGeometry, WindowOptions, hookimpl


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
        across = self._window[0] * self.latent_scale  # one window across: the resolved window_latent
        if self.options.direction == "horizontal":
            return across, self.options.length_px
        return self.options.length_px, across

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


@hookimpl
def register_geometries(register):
    register(StripGeometry)
    register(GridGeometry)

"""Sphere geometries for 360° environments: ``equirect`` and ``cubemap``.

The canvas covers the whole sphere, as an equirectangular latent ``(1, C, H, 2H)`` or as six
cube faces ``(6, C, N, N)``; the windows are *perspective views* (square field of view
``fov_deg`` at a yaw and pitch), resampled from the canvas and fused back by the core base
:class:`jointdiff.surfaces.sphere_base.SphereGeometry` (which recommends SyncTweedies' x̂0 fusion).
Angles and axes: :mod:`jointdiff.surfaces.spherical`; face order, orientation and names:
:mod:`jointdiff.surfaces.cube`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pydantic

from jointdiff.plugin import (
    ConfigError,
    DecodeFn,
    EncodeFn,
    SphereGeometry,
    SphereOptions,
    decode_wrapped,
    encode_wrapped,
    hookimpl,
)

if TYPE_CHECKING:
    import torch

DEFAULT_RINGS = ((0.0, 8), (45.0, 6), (-45.0, 6), (90.0, 1), (-90.0, 1))
"""``(pitch_deg, views)``: a ring of 8 views on the horizon, 6 at ±45° and one at each pole;
with 90° views, neighbours overlap by half a view on the horizon and more above it."""


class EquirectGeometry(SphereGeometry):
    """An equirectangular panorama: canvas ``(1, C, H, 2H)``, yaw −180° at column 0, yaw 0 at
    the centre, north pole on top; windows are perspective views on rings of constant pitch
    (``rings``) or at explicit angles (``views_deg``). Decoded with circular context along the
    width, so nothing marks the wrap at yaw ±180°."""

    name = "equirect"
    decode_padding_latent: int = 8

    class Options(SphereOptions):
        width_px: int = pydantic.Field(2048, gt=0, description="panorama width in pixels (height = width / 2)")
        rings: list[tuple[float, int]] = pydantic.Field(
            list(DEFAULT_RINGS), description="(pitch_deg, number of views) per ring of views, yaws evenly spaced"
        )
        yaw_offset_deg: float = pydantic.Field(0.0, description="yaw of the first view of every ring")
        views_deg: list[tuple[float, float]] | None = pydantic.Field(
            None, description="explicit (yaw_deg, pitch_deg) of every view, replacing rings"
        )

        @pydantic.field_validator("rings")
        @classmethod
        def _valid_rings(cls, rings):
            for pitch, count in rings:
                if not -90 <= pitch <= 90 or count < 1:
                    raise ValueError(f"each ring is (pitch_deg in [-90, 90], views >= 1), got {(pitch, count)}")
            return rings

    @classmethod
    def example_options(cls) -> dict:
        """Small options for tests: a 512×256 px panorama of 22 views of 16 latent cells."""
        return {"width_px": 512, "window_latent": 16}

    def setup_canvas(self) -> None:
        width, scale = self.options.width_px, self.latent_scale
        if width % (2 * scale):
            raise ConfigError(
                f"{self.name}: width_px = {width} must be a multiple of {2 * scale} "
                f"(twice the VAE factor, so that the height width / 2 fits the latent grid)"
            )
        self._size = (width // (2 * scale), width // scale)

    def view_angles_deg(self) -> list[tuple[float, float]]:
        o = self.options
        if o.views_deg is not None:
            return list(o.views_deg)
        views = []
        for pitch, count in o.rings:
            for j in range(count):
                yaw = (o.yaw_offset_deg + 360.0 * j / count + 180.0) % 360.0 - 180.0
                views.append((yaw, pitch))
        return views

    @property
    def canvas_shape_latent(self) -> tuple[int, int, int]:
        return (1, *self._size)

    def canvas_directions(self, scale: int) -> torch.Tensor:
        # lazy: loads torch; jointdiff_plugins.sphere must import without it
        from jointdiff.surfaces import spherical

        height, width = self._size
        return spherical.equirect_directions((scale * height, scale * width))[None]

    def padded_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        # lazy: loads torch; jointdiff_plugins.sphere must import without it
        from jointdiff.surfaces import spherical

        return spherical.pad_equirect(canvas)

    def canvas_grid(self, directions: torch.Tensor, scale: int) -> torch.Tensor:
        # lazy: loads torch; jointdiff_plugins.sphere must import without it
        from jointdiff.surfaces import spherical

        height, width = self._size
        return spherical.equirect_grid(spherical.directions_to_equirect_uv(directions), (scale * height, scale * width))

    def decode(self, canvas: torch.Tensor, decode: DecodeFn) -> torch.Tensor:
        """Decode with ``decode_padding_latent`` columns of circular context on both sides
        (:func:`jointdiff.core.geometry.decode_wrapped`), so the VAE's zero padding leaves no
        seam at yaw ±180°."""
        return decode_wrapped(canvas, decode, (False, True), self.decode_padding_latent, self.latent_scale)

    def encode(self, pixels: torch.Tensor, encode: EncodeFn) -> torch.Tensor:
        """Encode with ``decode_padding_latent`` columns of circular context on both sides,
        cropped off the latents (:func:`jointdiff.core.geometry.encode_wrapped`)."""
        return encode_wrapped(pixels, encode, self.wraps(), self.decode_padding_latent, self.latent_scale)

    def wraps(self) -> tuple[bool, bool]:
        """The longitude loops (yaw ±180°); the latitude does not."""
        return (False, True)


class CubemapGeometry(SphereGeometry):
    """Six cube faces ``(6, C, N, N)`` in the order, orientation and names of
    :mod:`jointdiff.surfaces.cube` (+X −X +Y −Y +Z −Z, +Z at yaw 0). Windows: the six faces (90°
    views; exact copies when the face is one window), the 12 edge midpoints
    (``edge_views``) and the 8 corners (``corner_views``), all resampled through the sphere.
    Decoded face by face with a border of the neighbouring faces, blended so the cube's
    edges leave no seam."""

    name = "cubemap"
    decode_padding_latent: int = 8

    class Options(SphereOptions):
        face_px: int = pydantic.Field(512, gt=0, description="side of every face in pixels")
        edge_views: bool = pydantic.Field(True, description="add views centred on the 12 edges")
        corner_views: bool = pydantic.Field(True, description="add views centred on the 8 corners")

    @classmethod
    def example_options(cls) -> dict:
        """Small options for tests: 128 px faces, 26 views of 16 latent cells."""
        return {"face_px": 128, "window_latent": 16}

    def setup_canvas(self) -> None:
        scale = self.latent_scale
        if self.options.face_px % scale:
            raise ConfigError(f"{self.name}: face_px = {self.options.face_px} is not a multiple of the VAE factor {scale}")
        self._n = self.options.face_px // scale

    def view_angles_deg(self) -> list[tuple[float, float]]:
        # The faces: a ring on the horizon (+Z, +X, −Z, −X), then the poles (+Y, −Y).
        views = [(yaw, 0.0) for yaw in (0.0, 90.0, 180.0, -90.0)] + [(0.0, 90.0), (0.0, -90.0)]
        if self.options.edge_views:
            views += [(yaw, 0.0) for yaw in (45.0, 135.0, -135.0, -45.0)]
            views += [(yaw, pitch) for pitch in (45.0, -45.0) for yaw in (0.0, 90.0, 180.0, -90.0)]
        if self.options.corner_views:
            corner = 35.264389682754654  # atan(1 / sqrt 2): the elevation of a cube corner
            views += [(yaw, pitch) for pitch in (corner, -corner) for yaw in (45.0, 135.0, -135.0, -45.0)]
        return views

    @property
    def canvas_shape_latent(self) -> tuple[int, int, int]:
        return (6, self._n, self._n)

    def canvas_directions(self, scale: int) -> torch.Tensor:
        # lazy: loads torch; jointdiff_plugins.sphere must import without it
        from jointdiff.surfaces import spherical

        return spherical.cube_directions(scale * self._n)

    def padded_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        # lazy: loads torch; jointdiff_plugins.sphere must import without it
        from jointdiff.surfaces import spherical

        return spherical.pad_cube(canvas)

    def canvas_grid(self, directions: torch.Tensor, scale: int) -> torch.Tensor:
        # lazy: loads torch; jointdiff_plugins.sphere must import without it
        from jointdiff.surfaces import spherical

        face, uv = spherical.directions_to_cube(directions)
        return spherical.cube_grid(face, uv, scale * self._n)

    def decode(self, canvas: torch.Tensor, decode: DecodeFn) -> torch.Tensor:
        """Decode the faces, each grown by ``decode_padding_latent`` cells of its neighbours,
        and blend the overlaps (:func:`jointdiff.surfaces.cube.decode_padded_faces`). Returns
        ``(6, 3, f*N, f*N)``."""
        # lazy: loads torch; jointdiff_plugins.sphere must import without it
        from jointdiff.surfaces import cube

        return cube.decode_padded_faces(canvas, decode, self.decode_padding_latent, self.latent_scale)


@hookimpl
def register_geometries(register):
    register(EquirectGeometry)
    register(CubemapGeometry)

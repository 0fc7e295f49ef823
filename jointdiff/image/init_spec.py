"""The ``[init]`` table of a job: start from an image (docs/job-spec.md, docs/from-an-image.md).

Example (a photo → a 360° sky on the ``equirect`` geometry)::

    [init]
    image = "photo.jpg"          # relative to the job file
    strength = 1.0               # 1: generate from noise, the photo held; < 1: img2img
    feather_px = 16

    [init.placement]
    kind = "sphere"
    yaw_deg = 0.0
    pitch_deg = 0.0
    fov_deg = 90.0

Placements (``kind``; :mod:`jointdiff.image.placement`): ``sphere`` (equirect, cubemap),
``canvas`` (strip, grid: outpainting), ``loop`` (a wrapped strip or equirect: a panorama made
to loop), ``tileable`` (torus), ``upscale`` (any one-sheet canvas of the image's aspect).
Without a placement the image (and mask) must have the canvas's size. This module needs only
pydantic; the images are read when the job is checked (:meth:`InitSpec.build`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import pydantic

from jointdiff.surfaces.sphere_base import SphereGeometry
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    from jointdiff.core.geometry import Geometry
    from jointdiff.image.init_image import InitImage

DEFAULT_FEATHER_PX = 16
"""The ``[init]`` table's default ``feather_px`` (as :data:`jointdiff.image.placement.DEFAULT_FEATHER_PX`)."""


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class SpherePlacement(_Strict):
    """A perspective photo on a 360° canvas (:func:`jointdiff.image.placement.place_on_sphere`)."""

    kind: Literal["sphere"]
    yaw_deg: float = pydantic.Field(0.0, ge=-360.0, le=360.0, description="where the photo looks: positive turns right")
    pitch_deg: float = pydantic.Field(0.0, ge=-90.0, le=90.0, description="positive looks up")
    roll_deg: float = pydantic.Field(0.0, ge=-180.0, le=180.0, description="as py360convert's in_rot_deg")
    fov_deg: float = pydantic.Field(90.0, gt=0.0, lt=180.0, description="the photo's horizontal field of view")


class CanvasPlacement(_Strict):
    """An image pasted on a plane canvas (:func:`jointdiff.image.placement.place_on_canvas`)."""

    kind: Literal["canvas"]
    top_px: int = pydantic.Field(0, ge=0)
    left_px: int = pydantic.Field(0, ge=0)


class LoopPlacement(_Strict):
    """A panorama made to loop (:func:`jointdiff.image.placement.loop_panorama`)."""

    kind: Literal["loop"]
    seam_px: int = pydantic.Field(128, gt=0, description="width of the band regenerated across the wrap seam")


class TileablePlacement(_Strict):
    """A photo made tileable (:func:`jointdiff.image.placement.make_tileable`)."""

    kind: Literal["tileable"]
    border_px: int = pydantic.Field(64, gt=0, description="band regenerated along every edge")


class UpscalePlacement(_Strict):
    """An image upsampled to the canvas and re-denoised (:func:`jointdiff.image.placement.upscale`)."""

    kind: Literal["upscale"]


Placement = Annotated[
    Union[SpherePlacement, CanvasPlacement, LoopPlacement, TileablePlacement, UpscalePlacement],
    pydantic.Field(discriminator="kind"),
]


class InitSpec(_Strict):
    """Start from an image: ``image`` (a file), ``strength``, an optional ``mask`` (a file of
    the image's size, white = keep), ``feather_px`` and a ``placement``."""

    image: str = pydantic.Field(min_length=1, description="image file (PNG, JPEG, WebP, ...), relative to the job file")
    strength: float | None = pydantic.Field(
        None, ge=0.0, le=1.0,
        description="1: from noise (kept parts held); < 1: img2img. None: 0.4 for upscale, 0.8 for a plain "
        "img2img (no placement, no mask), else 1",
    )
    mask: str | None = pydantic.Field(None, description="keep mask of the image (white = keep), placed with it")
    feather_px: int = pydantic.Field(DEFAULT_FEATHER_PX, ge=0, description="soften the keep mask this far inside its edge")
    placement: Placement | None = None

    def resolved_strength(self) -> float:
        """``strength``, or its default for the placement (see the field)."""
        if self.strength is not None:
            return self.strength
        if isinstance(self.placement, UpscalePlacement):
            return 0.4
        return 0.8 if self.placement is None and self.mask is None else 1.0

    def build(self, geometry: Geometry, check_size: bool = True) -> InitImage:
        """The :class:`~jointdiff.image.init_image.InitImage` for a set-up ``geometry``: the files
        read, the image placed on its canvas (:mod:`jointdiff.image.placement`), its size checked
        (unless ``check_size`` is False: the canvas of a model whose family is not known yet).
        ConfigError naming ``init.<field>`` for a file that cannot be read or a placement the
        geometry cannot take."""
        # lazy: loads torch; jointdiff.image.init_spec must import without it
        from jointdiff.image import placement as pl

        # lazy: loads torch; jointdiff.image.init_spec must import without it
        from jointdiff.image.init_image import InitImage, canvas_size_px

        sheets, height, width = canvas_size_px(geometry)
        image = pl.load_image(self.image, "init.image")
        mask = None if self.mask is None else pl.as_mask(self.mask, (image.height, image.width), "init.mask")
        kind = None if self.placement is None else self.placement.kind
        args = {"keep": mask, "strength": self.resolved_strength(), "feather_px": self.feather_px}
        if kind in ("canvas", "loop", "tileable", "upscale") and sheets != 1:
            raise ConfigError(f"init.placement: kind {kind!r} places one image; geometry {geometry.name!r} has {sheets} sheets")
        if kind is None:
            keep = None if mask is None else mask[None]
            init = InitImage(pl.as_image(image, "init.image"), args["strength"], keep, self.feather_px)
        elif kind == "sphere":
            init = self._sphere(image, geometry, args)
        elif kind == "canvas":
            init = pl.place_on_canvas(image, (height, width), self.placement.top_px, self.placement.left_px, **args)
        elif kind == "loop":
            init = pl.loop_panorama(image, self.placement.seam_px, _loop_direction(geometry), **args)
        elif kind == "tileable":
            _require_wraps(geometry, (True, True), "tileable", "torus")
            init = pl.make_tileable(image, self.placement.border_px, **args)
        else:
            init = pl.upscale(image, size_px=(height, width), **args)
        if check_size:
            init.check(geometry)
        return init

    def _sphere(self, image: Any, geometry: Geometry, args: dict[str, Any]) -> InitImage:
        # lazy: loads torch; jointdiff.image.init_spec must import without it
        from jointdiff.image import placement as pl

        # lazy: loads torch; jointdiff.image.init_spec must import without it
        from jointdiff.image.init_image import canvas_size_px
        if not isinstance(geometry, SphereGeometry):
            raise ConfigError(
                f"init.placement: kind 'sphere' needs a 360° geometry (equirect, cubemap), got {geometry.name!r}"
            )
        sheets, height, width = canvas_size_px(geometry)
        size = {"face_px": height} if sheets == 6 else {"width_px": width}
        p = self.placement
        return pl.place_on_sphere(image, p.yaw_deg, p.pitch_deg, p.roll_deg, p.fov_deg, **size, **args)


def _require_wraps(geometry: Geometry, wraps: tuple[bool, bool], kind: str, what: str) -> None:
    if tuple(geometry.wraps()) != wraps:
        raise ConfigError(f"init.placement: kind {kind!r} needs a geometry that wraps like a {what}, got {geometry.name!r}")


def _loop_direction(geometry: Geometry) -> str:
    """``horizontal`` for a canvas that wraps along x (a wrapped strip, equirect), ``vertical``
    along y; ConfigError for one that does not wrap along exactly one axis."""
    wraps = tuple(geometry.wraps())
    if wraps == (False, True):
        return "horizontal"
    if wraps == (True, False):
        return "vertical"
    raise ConfigError(
        f"init.placement: kind 'loop' needs a canvas that wraps along one axis (strip with wrap = true, equirect), "
        f"got {geometry.name!r}"
    )

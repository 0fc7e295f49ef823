"""A reusable base for geometries whose windows are perspective views of a spherical canvas
(the ``equirect`` and ``cubemap`` geometries).

The canvas covers the whole sphere (any layout: an equirectangular latent ``(1, C, H, 2H)``,
six cube faces ``(6, C, N, N)``, ...); the windows are *perspective views* (square field of
view ``fov_deg`` at a yaw and pitch), the images a text-to-image model is trained on.
Subclasses say where the views look and how the canvas is laid out (the abstract methods of
:class:`SphereGeometry`); this base does the rest:

- :meth:`SphereGeometry.extract` resamples the canvas at the direction of every view pixel
  (``grid_sample``, bilinear, batched; grids cached per resolution and device);
- :meth:`SphereGeometry.insert` is the inverse warp: every canvas cell inside a view's
  frustum samples the view where the cell projects. The weights are the view's coverage
  mask, optionally feathered toward its border, so the fused canvas is a weighted mean of
  the views that see each cell.

Interpolating noisy latents shrinks their variance, so these geometries recommend
SyncTweedies' x̂0 fusion (Kim et al., NeurIPS 2024): ``preferred_fusion = "x0"`` (see
:mod:`jointdiff.engine.fusion`). Angles and axes: :mod:`jointdiff.surfaces.spherical`; cube faces:
:mod:`jointdiff.surfaces.cube`.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Sequence

import pydantic

from jointdiff.core.family import LatentFormat
from jointdiff.core.geometry import Geometry
from jointdiff.core.options import PluginOptions
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch


class SphereOptions(PluginOptions):
    """The options :class:`SphereGeometry` reads; subclasses' ``Options`` derive from it."""

    window_latent: int | None = pydantic.Field(
        None,
        gt=0,
        description="view side in latent cells; None: the model's native window (64 for SD 1.x/2.x, "
        "128 for SDXL and FLUX)",
    )
    fov_deg: float = pydantic.Field(90.0, gt=0.0, lt=180.0, description="field of view of every view (square)")
    feather: float = pydantic.Field(
        0.25, ge=0.0, le=1.0, description="fraction of the view's half-width over which its weight ramps down to its border (0: hard mask)"
    )


class SphereGeometry(Geometry):
    """Base of geometries whose windows are perspective views of a spherical canvas.

    Subclasses (with ``Options`` derived from :class:`SphereOptions`) implement the abstract
    methods: the canvas size (:meth:`setup_canvas`, :attr:`canvas_shape_latent`), the views'
    ``(yaw_deg, pitch_deg)`` (:meth:`view_angles_deg`), the canvas cell directions
    (:meth:`canvas_directions`), and how to pad and address the canvas for ``grid_sample``
    (:meth:`padded_canvas`, :meth:`canvas_grid`); extraction, insertion, weights and the
    coverage check live here. Tensors are ``(B, C, h, w)``; canvases ``(S, C, H, W)``,
    possibly ``k`` times the latent resolution (pixel-space inputs).
    """

    preferred_fusion = "x0"
    """The fusion these geometries are meant for (SyncTweedies' x̂0, see the module docstring)."""
    resamples = True
    round_trip_atol = 0.1
    """Tolerance of the conformance round trip on :meth:`smooth_test_canvas` (amplitude ≈ 5)
    at :meth:`example_options` sizes; a canvas shifted by one cell misses it by ≈ 0.4 or more."""

    @abstractmethod
    def setup_canvas(self) -> None:
        """Compute the canvas size from :attr:`latent_scale` (called by :meth:`setup` once the
        latent format is known, before the views); ConfigError naming the option for sizes
        that do not fit."""

    @abstractmethod
    def view_angles_deg(self) -> list[tuple[float, float]]:
        """``(yaw_deg, pitch_deg)`` of every view, in window order (:mod:`jointdiff.surfaces.spherical`)."""

    @abstractmethod
    def canvas_directions(self, scale: int) -> torch.Tensor:
        """Directions ``(S, k*H, k*W, 3)`` of the canvas cell centres at ``k`` = ``scale``."""

    @abstractmethod
    def padded_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        """The canvas as one padded image ``(1, C, H', W')`` that :meth:`canvas_grid` addresses."""

    @abstractmethod
    def canvas_grid(self, directions: torch.Tensor, scale: int) -> torch.Tensor:
        """``grid_sample`` coordinates ``(..., 2)`` in :meth:`padded_canvas` of directions
        ``(..., 3)`` on a canvas ``k`` = ``scale`` times the latent resolution."""

    def setup(self, latent: LatentFormat | int) -> None:
        """Views for the model's latent format: their side is ``window_latent`` (None: the
        model's native window), whole patches within the model's window sizes; then the
        canvas (:meth:`setup_canvas`), the views and the coverage check."""
        super().setup(latent)
        self._window_side = self.window_side(self.options.window_latent, "window_latent")
        self.setup_canvas()
        self.views_deg = [(float(yaw), float(pitch)) for yaw, pitch in self.view_angles_deg()]
        self._extract_grids: dict[tuple[int, str], torch.Tensor] = {}
        self._insert_maps: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._weights: dict[str, torch.Tensor] = {}
        self._check_coverage()

    @property
    def window_size_latent(self) -> tuple[int, int]:
        return (self._window_side, self._window_side)

    @property
    def num_windows(self) -> int:
        return len(self.views_deg)

    def _scale_of(self, canvas: torch.Tensor) -> int:
        sheets, height, width = self.canvas_shape_latent
        scale = canvas.shape[-2] // height
        if canvas.shape[0] != sheets or scale < 1 or tuple(canvas.shape[-2:]) != (scale * height, scale * width):
            raise ValueError(
                f"canvas of shape {tuple(canvas.shape)} is not ({sheets}, C, k*{height}, k*{width}) "
                f"for geometry {self.name!r}"
            )
        return scale

    def extract_grids(self, scale: int, device: torch.device | str) -> torch.Tensor:
        """``(N, k*h, k*w, 2)`` sampling grids of all views into :meth:`padded_canvas` (cached)."""
        import torch

        # lazy: loads torch; jointdiff.surfaces.sphere_base must import without it
        from jointdiff.surfaces import spherical

        key = (scale, str(device))
        if key not in self._extract_grids:
            size = (scale * self._window_side,) * 2
            grids = [
                self.canvas_grid(spherical.perspective_directions(yaw, pitch, self.options.fov_deg, size), scale)
                for yaw, pitch in self.views_deg
            ]
            self._extract_grids[key] = torch.stack(grids).float().to(device)
        return self._extract_grids[key]

    def insert_maps(self, scale: int, device: torch.device | str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per view: the canvas cells inside its frustum as gather indices ``(3, M)``
        (sheet, row, col) and where they fall in the view, a grid ``(1, 1, M, 2)`` (cached)."""
        # lazy: loads torch; jointdiff.surfaces.sphere_base must import without it
        from jointdiff.surfaces import spherical

        key = (scale, str(device))
        if key not in self._insert_maps:
            directions = self.canvas_directions(scale)
            maps = []
            for yaw, pitch in self.views_deg:
                uv, inside = spherical.project_to_view(directions, yaw, pitch, self.options.fov_deg)
                cells = inside.nonzero().T
                grid = uv[inside][None, None].float()
                maps.append((cells.to(device), grid.to(device)))
            self._insert_maps[key] = maps
        return self._insert_maps[key]

    def extract(self, canvas: torch.Tensor, window_ids: Sequence[int]) -> torch.Tensor:
        """Views ``(B, C, k*h, k*w)`` of ``canvas`` ``(S, C, k*H, k*W)``, bilinear."""
        # lazy: loads torch; jointdiff.surfaces.sphere_base must import without it
        from jointdiff.surfaces import spherical

        scale = self._scale_of(canvas)
        grids = self.extract_grids(scale, canvas.device)[list(window_ids)]
        return spherical.sample(self.padded_canvas(canvas), grids)

    def insert(self, target: torch.Tensor, values: torch.Tensor, window_ids: Sequence[int]) -> None:
        """Inverse warp: each canvas cell inside view ``i``'s frustum adds ``values[i]``
        sampled (bilinear) where the cell projects. Linear in ``values``."""
        # lazy: loads torch; jointdiff.surfaces.sphere_base must import without it
        from jointdiff.surfaces import spherical

        scale = self._scale_of(target)
        maps = self.insert_maps(scale, target.device)
        cells_last = target.permute(0, 2, 3, 1)  # a view: index_put_ writes into target
        for b, window_id in enumerate(window_ids):
            cells, grid = maps[window_id]
            sampled = spherical.sample(values[b : b + 1], grid)[0, :, 0].T  # (M, C)
            cells_last.index_put_(tuple(cells), sampled.to(target.dtype), accumulate=True)

    def window_weights(self, window_ids: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """``(B, 1, h, w)``: 1 inside, ramping linearly toward the view's border over the
        outer ``feather`` of its half-width (positive at every pixel centre)."""
        import torch

        # lazy: loads torch; jointdiff.surfaces.sphere_base must import without it
        from jointdiff.surfaces import spherical

        key = str(device)
        if key not in self._weights:
            size = self._window_side
            centres = spherical.pixel_centres(size).abs()
            border = 1 - torch.maximum(centres[:, None], centres[None, :])
            feather = self.options.feather
            weight = (border / feather).clamp(max=1) if feather > 0 else torch.ones_like(border)
            self._weights[key] = weight.float()[None, None].to(device)
        return self._weights[key].expand(len(window_ids), -1, -1, -1)

    def smooth_test_canvas(self, channels: int, seed: int = 0) -> torch.Tensor:
        """A canvas ``(S, channels, H, W)`` smooth on the sphere (random polynomials of degree
        ≤ 2 in the cell directions): bilinear resampling keeps it up to a small error, where
        it blurs noise away, so fusion round trips are checked on it."""
        import torch

        directions = self.canvas_directions(1)
        x, y, z = (directions / directions.norm(dim=-1, keepdim=True)).float().unbind(-1)
        basis = torch.stack([torch.ones_like(x), x, y, z, x * y, y * z, z * x, x * x - y * y, 3 * z * z - 1], dim=-1)
        coefficients = torch.randn(channels, basis.shape[-1], generator=torch.Generator().manual_seed(seed))
        return torch.einsum("shwk,ck->schw", basis, coefficients)

    def _check_coverage(self) -> None:
        import torch

        # lazy: loads torch; jointdiff.surfaces.sphere_base must import without it
        from jointdiff.surfaces import spherical

        covered = torch.zeros(self.canvas_shape_latent, dtype=torch.bool)
        for cells, _ in self.insert_maps(1, "cpu"):
            covered[tuple(cells)] = True
        if not bool(covered.all()):
            sheet, row, col = (int(i) for i in (~covered).nonzero()[0])
            lon, lat = spherical.directions_to_lonlat(self.canvas_directions(1)[sheet, row, col])
            raise ConfigError(
                f"{self.name}: the views (fov_deg = {self.options.fov_deg}, {self.num_windows} views) leave "
                f"{int((~covered).sum())} canvas cells uncovered, e.g. at yaw {float(lon):.1f}°, pitch "
                f"{float(lat):.1f}°: add views or widen the field of view"
            )

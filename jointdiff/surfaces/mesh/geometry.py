"""The ``mesh`` geometry: the canvas is a mesh's UV texture in latent space, the windows are
rendered views of the mesh (SyncMVD, Liu et al. 2023; SyncTweedies, Kim et al. NeurIPS 2024).

- Canvas ``(S, C, T, T)``: one ``T × T`` latent texture per material (``texture_latent``).
- Windows: square views ``(B, C, h, w)`` from the cameras of
  :mod:`~jointdiff.surfaces.mesh.cameras` (SyncMVD's ten by default).
- ``extract`` renders the texture into the views (bilinear gather,
  :func:`~jointdiff.surfaces.mesh.sampling.render`); ``insert`` is its exact adjoint
  (:func:`~jointdiff.surfaces.mesh.sampling.splat`) followed by a fixed copy of the nearest
  seen texel into every texel no view sees, so it stays linear and every texel is covered.
  On seen texels ``⟨extract(T), V⟩ = ⟨T, insert(V)⟩`` holds exactly.
- Weights (:meth:`MeshGeometry.window_weights`): ``mask × |cos(view angle)|^cos_power``
  (SyncMVD's weighting); pixels showing no surface weigh 0, so they never reach the texture,
  and :meth:`MeshGeometry.window_coverage` tells the x̂0 fusion to leave them to the view.
- Fusion: x̂0 (SyncTweedies), ``fuse_until`` of the steps (SyncMVD: 0.8), then every view
  finishes alone.
- Decode: the final latent texture is rendered into the views, each view is decoded by the
  VAE, and the texture is baked from the decoded views in pixel space at ``texture_px``
  (:func:`~jointdiff.surfaces.mesh.sampling.bake`), filled and island-padded.

Heavy modules (numpy, torch, trimesh) are imported inside the methods, so the plugin module
that registers this class stays light to import.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import pydantic

from jointdiff.core.family import LatentFormat
from jointdiff.core.geometry import DecodeFn, Geometry
from jointdiff.core.options import PluginOptions
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from PIL import Image


class MeshOptions(PluginOptions):
    """Options of the ``mesh`` geometry."""

    path: str = pydantic.Field(description="the mesh file: OBJ (+ MTL), glTF/GLB, PLY, ...")
    sha256: str | None = pydantic.Field(None, description="the file's SHA-256; filled in when None, checked when given")
    normalize: bool = pydantic.Field(True, description="centre the mesh and scale it to the unit sphere (False: its own frame)")
    max_faces: int = pydantic.Field(500_000, gt=0, description="refuse meshes with more faces")
    cameras: list[tuple[float, float, float, float]] | None = pydantic.Field(
        None, description="(elevation_deg, azimuth_deg, distance, fov_deg) per view; None: SyncMVD's ten views"
    )
    projection: Literal["perspective", "orthographic"] = pydantic.Field("perspective", description="camera projection")
    ortho_half_height: float = pydantic.Field(1.1, gt=0, description="orthographic views: half-side of the square seen, world units")
    window_latent: int | None = pydantic.Field(None, gt=0, description="view side in latent cells; None: the model's native window")
    texture_latent: int = pydantic.Field(128, gt=0, description="side of every latent texture sheet, in latent cells")
    texture_px: int = pydantic.Field(1024, gt=0, description="side of every output texture, in pixels")
    cos_power: float = pydantic.Field(2.0, ge=0, description="view weights |cos(view angle)|^cos_power")
    fuse_until: float = pydantic.Field(0.8, ge=0, le=1, description="fraction of the steps the views are fused (SyncMVD: 0.8)")
    backend: Literal["auto", "embree", "triangle"] = pydantic.Field("auto", description="ray casting: Embree or trimesh's numpy caster")

    @pydantic.model_validator(mode="after")
    def _cameras_are_possible(self):
        """Every camera: 0 < fov_deg < 180 and distance > 0; outside the unit sphere
        (distance > 1) when the mesh is normalised to it."""
        for index, (elevation_deg, azimuth_deg, distance, fov_deg) in enumerate(self.cameras or []):
            shown = f"cameras[{index}] = {(elevation_deg, azimuth_deg, distance, fov_deg)!r}"
            if not 0 < fov_deg < 180:
                raise ValueError(f"{shown}: fov_deg must be in (0, 180), got {fov_deg!r}")
            if not distance > 0:
                raise ValueError(f"{shown}: distance must be > 0, got {distance!r}")
            if self.normalize and not distance > 1:
                raise ValueError(f"{shown}: distance must be > 1 (outside the unit sphere the mesh is normalised to), "
                                 f"got {distance!r}")
        return self


class MeshGeometry(Geometry):
    """Texture a mesh (see the module docstring). Tensors ``(B, C, h, w)``; canvases
    ``(S, C, k·T, k·T)`` at ``k`` = 1 (latents) or the VAE factor (pixel conditions)."""

    name = "mesh"
    Options = MeshOptions
    resamples = True
    preferred_fusion = "x0"
    window_maps = ("depth", "normal", "mask")
    conformance_exempt = {
        "round_trip": "unseen texels are copies of their nearest seen texel, not themselves; tests/test_mesh.py "
        "checks the round trip on seen texels and the adjoint identity",
        "pixel_scale": "view pixels that show no surface are 0, not the canvas's constant; tests/test_mesh.py "
        "checks the maps at the pixel scale",
        "decode": "the texture is baked from decoded views at texture_px, not decoded cell by cell; "
        "tests/test_mesh.py checks the bake against a known texture",
    }
    """Checks of :func:`jointdiff.testing.geometry.check_geometry` that do not apply, and why."""

    def __init__(self, options: MeshOptions | dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        from jointdiff.surfaces.mesh import asset  # lazy: numpy and trimesh; importing the plugin must not

        path = Path(self.options.path).expanduser().absolute()
        if not path.is_file():
            raise ConfigError(f"mesh: path = {str(path)!r} is not a file")
        digest = asset.file_sha256(path)
        if self.options.sha256 is not None and self.options.sha256 != digest:
            raise ConfigError(f"mesh: path = {str(path)!r} has sha256 {digest}, not sha256 = {self.options.sha256!r} (the file changed)")
        self.asset = asset.load_mesh_cached(str(path), digest, self.options.normalize, self.options.max_faces)
        self.options = self.options.model_copy(update={"path": str(path), "sha256": digest})

    @classmethod
    def example_options(cls) -> dict:
        """A cube with a UV layout shipped with jointdiff, small views and textures."""
        cube = Path(__file__).parents[1] / "assets" / "mesh" / "example_cube.obj"
        return {"path": str(cube), "window_latent": 16, "texture_latent": 32, "texture_px": 128}

    @property
    def fuse_until(self) -> float:
        return self.options.fuse_until

    def cameras(self) -> list:
        from jointdiff.surfaces.mesh import cameras  # lazy: numpy; importing the plugin must not

        half = self.options.ortho_half_height if self.options.projection == "orthographic" else None
        if self.options.cameras is None:
            return cameras.default_cameras(ortho_half_height=half)
        return [cameras.Camera(el, az, d, fov, half) for el, az, d, fov in self.options.cameras]

    def setup(self, latent: LatentFormat | int) -> None:
        """Views for the model's latent format, and their maps at the latent size (kept while
        the view side is unchanged): ConfigError now when a material is seen by no view."""
        super().setup(latent)
        side = self.window_side(self.options.window_latent, "window_latent")
        if side != getattr(self, "_side", None):
            self._side = side
            self._cameras = self.cameras()
            self._scales: dict[tuple[int, str], dict[str, Any]] = {}
            self._view_maps: dict[int, list] = {}
        self._final: dict[int, torch.Tensor] = {}
        self._state(1, "cpu")

    @property
    def canvas_shape_latent(self) -> tuple[int, int, int]:
        side = self.options.texture_latent
        return (self.asset.num_sheets, side, side)

    @property
    def window_size_latent(self) -> tuple[int, int]:
        return (self._side, self._side)

    @property
    def num_windows(self) -> int:
        return len(self._cameras)

    def view_maps(self, scale: int) -> list:
        """:class:`~jointdiff.surfaces.mesh.raster.ViewMaps` of every view at ``scale ×`` the latent view size (cached)."""
        from jointdiff.surfaces.mesh import raster  # lazy: numpy and trimesh; importing the plugin must not

        if scale not in self._view_maps:
            self._view_maps[scale] = raster.rasterize_views(self.asset, self._cameras, scale * self._side, self.options.backend)
        return self._view_maps[scale]

    def _state(self, scale: int, device) -> dict[str, Any]:
        """Taps, weights, coverage and fill index of every view at ``scale`` on ``device`` (cached)."""
        import numpy as np
        import torch

        from jointdiff.surfaces.mesh import sampling  # lazy: torch; importing the plugin must not

        key = (scale, str(device))
        if key not in self._scales:
            maps = self.view_maps(scale)
            sheets, side, _ = self.canvas_shape_latent
            taps = sampling.view_taps(maps, (scale * side, scale * side))
            mask = torch.from_numpy(np.stack([m.mask for m in maps])).float()[:, None]
            cos = torch.from_numpy(np.stack([np.abs(m.cos) for m in maps])).float()[:, None]
            weights = mask * cos**self.options.cos_power
            reach = torch.zeros(sheets, 1, scale * side, scale * side, dtype=torch.float64)
            sampling.splat(reach, weights.double(), taps)
            what = "latent texture" if scale == 1 else "texture"
            index = sampling.fill_index((reach[:, 0] > 0).numpy(), what, self.asset.sheet_names)
            self._scales[key] = {"taps": taps.to(device), "mask": mask.to(device), "weights": weights.to(device),
                                 "fill": torch.from_numpy(index).to(device), "seen": (reach[:, 0] > 0).to(device)}
        return self._scales[key]

    def _scale_of(self, canvas: torch.Tensor) -> int:
        sheets, side, _ = self.canvas_shape_latent
        scale = canvas.shape[-1] // side
        if canvas.shape[0] != sheets or scale < 1 or tuple(canvas.shape[-2:]) != (scale * side, scale * side):
            raise ValueError(f"canvas of shape {tuple(canvas.shape)} is not ({sheets}, C, k*{side}, k*{side}) for geometry 'mesh'")
        return scale

    def seen_texels(self, scale: int = 1, device="cpu") -> torch.Tensor:
        """``(S, k·T, k·T)`` bool: the texels some view's surface pixels read (the rest are filled)."""
        return self._state(scale, device)["seen"]

    def extract(self, canvas: torch.Tensor, window_ids: Sequence[int]) -> torch.Tensor:
        """Views ``(B, C, k·h, k·w)`` of ``canvas`` ``(S, C, k·T, k·T)`` (0 where no surface)."""
        from jointdiff.surfaces.mesh import sampling  # lazy: torch; importing the plugin must not

        scale = self._scale_of(canvas)
        taps = self._state(scale, canvas.device)["taps"].select(window_ids)
        return sampling.render(canvas, taps, (scale * self._side, scale * self._side))

    def insert(self, target: torch.Tensor, values: torch.Tensor, window_ids: Sequence[int]) -> None:
        """Add the adjoint of :meth:`extract` of ``values``, then copy into every unseen texel
        what its nearest seen texel received (linear in ``values``)."""
        import torch

        from jointdiff.surfaces.mesh import sampling  # lazy: torch; importing the plugin must not

        scale = self._scale_of(target)
        state = self._state(scale, target.device)
        # One window at a time, as one-window calls would: the sums do not depend on batching.
        for b, window_id in enumerate(window_ids):
            splatted = torch.zeros(target.shape, dtype=torch.float64, device=target.device)
            sampling.splat(splatted, values[b : b + 1].double(), state["taps"].select([window_id]))
            target += sampling.apply_fill(splatted, state["fill"]).to(target.dtype)

    def window_weights(self, window_ids: Sequence[int], device="cpu") -> torch.Tensor:
        """``(B, 1, h, w)``: ``|cos(view angle)|^cos_power`` on the surface, 0 elsewhere (SyncMVD)."""
        return self._state(1, device)["weights"][list(window_ids)]

    def window_coverage(self, window_ids: Sequence[int], device="cpu") -> torch.Tensor:
        """``(B, 1, h, w)``: 1 where the view shows the surface; elsewhere the x̂0 fusion keeps
        the view's own prediction (its background)."""
        return self._state(1, device)["mask"][list(window_ids)]

    def window_map(self, name: str, window_ids: Sequence[int], scale: int = 1) -> torch.Tensor:
        """``depth`` (:func:`depth_map`: nearest surface 1, farthest :data:`DEPTH_FLOOR`, background 0), ``normal``
        (``(n + 1) / 2`` in the camera frame: x right, y up, z toward the camera; background
        0) or ``mask``, ``(B, C, scale·h, scale·w)`` float32 (see :meth:`Geometry.window_map`)."""
        import numpy as np
        import torch

        if name not in self.window_maps:
            return super().window_map(name, window_ids, scale)
        maps = self.view_maps(int(scale))
        out = []
        for window_id in window_ids:
            view, camera = maps[window_id], self._cameras[window_id]
            if name == "mask":
                out.append(view.mask[None].astype(np.float32))
            elif name == "depth":
                out.append(depth_map(view.depth, view.mask)[None])
            else:
                local = view.normal @ camera.axes()
                flip = np.where((local[..., 2] < 0)[..., None], -1.0, 1.0)  # the side the camera sees
                out.append((np.where(view.mask[..., None], (local * flip + 1) / 2, 0.0)).transpose(2, 0, 1).astype(np.float32))
        return torch.from_numpy(np.stack(out))

    def final_windows(self, window_ids: Sequence[int], latents: torch.Tensor) -> None:
        """Keep the views' own final latents for :meth:`decode` (SyncMVD bakes those)."""
        for b, window_id in enumerate(window_ids):
            self._final[window_id] = latents[b].detach()

    def decode(self, canvas: torch.Tensor, decode: DecodeFn) -> torch.Tensor:
        """Decode every view with the VAE and bake the texture from the decoded views in pixel
        space (``texture_px``), filled and island-padded: ``(S, 3, texture_px, texture_px)`` in
        [-1, 1]. The views are their own final latents when the job handed them over
        (:meth:`final_windows`, used once), else renderings of ``canvas``."""
        import torch

        final, self._final = self._final, {}
        if len(final) == self.num_windows and not canvas.is_meta:
            views = torch.stack([final[i] for i in range(self.num_windows)]).to(canvas.device, canvas.dtype)
        else:
            views = self.extract(canvas, range(self.num_windows))
        pixels = torch.cat([decode(views[i : i + 1]).float() for i in range(len(views))])
        if pixels.is_meta:  # the cost estimate counts the decoder calls (jointdiff.cost.budget)
            side = self.options.texture_px
            return torch.empty(self.asset.num_sheets, pixels.shape[1], side, side, device="meta")
        return self.bake(pixels)

    def texel_maps(self) -> list:
        """:class:`~jointdiff.surfaces.mesh.raster.TexelMaps` of every sheet at ``texture_px`` (cached)."""
        from jointdiff.surfaces.mesh import raster  # lazy: numpy and trimesh; importing the plugin must not

        if not hasattr(self, "_texels"):
            size = (self.options.texture_px,) * 2
            self._texels = [raster.rasterize_uv(self.asset, s, size, self.options.backend) for s in range(self.asset.num_sheets)]
        return self._texels

    def bake(self, views_px: torch.Tensor) -> torch.Tensor:
        """Texture ``(S, C, texture_px, texture_px)`` from every view's pixels ``(N, C, f·h, f·w)``
        (:func:`~jointdiff.surfaces.mesh.sampling.bake`), unseen texels and the gutters
        between UV islands filled from the nearest seen texel."""
        import torch

        from jointdiff.surfaces.mesh import sampling  # lazy: torch; importing the plugin must not

        scale = views_px.shape[-1] // self._side
        tolerance = 0.01 * self._scene_size()
        texture, seen = sampling.bake(views_px, self._cameras, self.view_maps(scale), self.texel_maps(),
                                      self.options.cos_power, tolerance)
        index = torch.from_numpy(sampling.fill_index(seen.numpy(), "baked texture", self.asset.sheet_names))
        return sampling.apply_fill(texture, index).to(views_px.device)

    def _scene_size(self) -> float:
        import numpy as np

        vertices = self.asset.vertices
        return float(np.linalg.norm(vertices.max(0) - vertices.min(0)))

    def setup_work(self) -> dict[str, int]:
        """Rays cast once per job (views at the latent and pixel sizes, texels of the bake)
        and the bake's texel × view look-ups, for the cost estimate."""
        side, views = self._side, self.num_windows
        texels = self.asset.num_sheets * self.options.texture_px**2
        pixel_side = side * self.latent_scale
        return {"rays": views * (side**2 + pixel_side**2) + texels, "bake_samples": views * texels}

    def write_companions(self, images: list[Image.Image], path: Path) -> list[Path]:
        """Next to the saved textures (``path``: the first): ``<stem>.glb``, ``<stem>.obj``
        (+ MTL and its PNGs) and ``<stem>_turntable.png``."""
        from jointdiff.surfaces.mesh import export  # lazy: trimesh; importing the plugin must not

        path = Path(path)
        stem = path.with_name(path.stem.removesuffix("_0")) if len(images) > 1 else path.with_suffix("")
        written = list(export.export_textured(self.asset, images, stem).values())
        preview = stem.with_name(f"{stem.name}_turntable.png")
        export.turntable(self.asset, images, backend=self.options.backend).save(preview)
        return [*written, preview]

    def smooth_test_canvas(self, channels: int, seed: int = 0) -> torch.Tensor:
        """A canvas ``(S, channels, T, T)`` smooth in UV (random bilinear polynomials)."""
        import torch

        sheets, side, _ = self.canvas_shape_latent
        g = torch.Generator().manual_seed(seed)
        y = torch.linspace(0, 1, side, dtype=torch.float64)[:, None]
        x = torch.linspace(0, 1, side, dtype=torch.float64)[None, :]
        c = torch.randn(sheets, channels, 4, 1, 1, generator=g, dtype=torch.float64)
        return c[:, :, 0] + c[:, :, 1] * x + c[:, :, 2] * y + c[:, :, 3] * x * y


DEPTH_FLOOR = 0.2
"""The depth map's value at the farthest surface of a view: the surface stays apart from the
background (0), so a ControlNet sees the silhouette on every view."""


def depth_map(depth: "np.ndarray", mask: "np.ndarray") -> "np.ndarray":
    """A view's depth map as depth ControlNets take it: ``(h, w)`` float32, 1 at the nearest
    surface, :data:`DEPTH_FLOOR` at the farthest, 0 where no surface is. A view of one flat
    face square to the camera (all surface at one depth) is 1 on the surface."""
    import numpy as np

    out = np.zeros(depth.shape, np.float32)
    if mask.any():
        surface = depth[mask]
        near, far = float(surface.min()), float(surface.max())
        span = far - near
        relative = (far - surface) / span if span > 1e-6 * max(abs(far), 1.0) else np.ones_like(surface)
        out[mask] = DEPTH_FLOOR + (1.0 - DEPTH_FLOOR) * relative
    return out

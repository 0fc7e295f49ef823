"""Texture plugins: ``torus``, ``atlas`` and ``cube_texture`` geometries, the ``tile_text``
conditioner.

A *torus* canvas wraps in both directions: windows run across the right edge into the left
one and across the bottom into the top, so the MultiDiffusion fusion (Bar-Tal et al. 2023,
Eq. 5) never sees an edge and the texture repeats without a seam; the final VAE decode gets
circular context too (:meth:`jointdiff.core.tiling.TiledGeometry.decode`).

An *atlas* is several tori generated in one job: canvas ``(S, C, H, W)`` with one sheet per
tile, windows that wrap within their own sheet, and one prompt per tile (``tile_text``). The
tiles are independent unless a synchronizer couples them: SyncDiffusion (Lee et al. 2023)
pulls every window, whatever its tile, toward one anchor window's appearance, so the tiles
share lighting and palette. Packing into one image with a UV manifest is
:mod:`jointdiff.surfaces.textures`.

A *cube texture* (``cube_texture``) covers the six faces of a cube or skybox: windows inside
each face plus windows that straddle each of the 12 edges, seeing both faces unfolded flat
(face order and orientation: :mod:`jointdiff.surfaces.cube`), so the texture continues across edges.

Window and stride are in latent cells (as ``grid``: unset, the model's native window and
``window // 8``); tile and face sizes are in pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import pydantic

from jointdiff.plugin import (
    Conditioner,
    ConfigError,
    DecodeFn,
    Geometry,
    LatentFormat,
    PluginOptions,
    Prompt,
    TiledGeometry,
    WindowOptions,
    axis_starts,
    encode_text,
    hookimpl,
    resolve_window_stride,
)
from jointdiff.surfaces.textures import AtlasLayout, TileSource

if TYPE_CHECKING:
    import torch


class TorusGeometry(TiledGeometry):
    """A canvas that wraps in both directions: one seamlessly tileable texture.

    Canvas ``(S, C, H, W)`` with ``S = num_tiles`` sheets (1 here), every sheet a torus;
    window ``i`` lies on sheet :meth:`tile_of` ``(i)`` at origin ``(top, left)`` in latent
    cells and may run past the right/bottom edge, continuing at the left/top.
    """

    name = "torus"

    class Options(WindowOptions):
        height_px: int = pydantic.Field(512, gt=0, description="texture height in pixels")
        width_px: int = pydantic.Field(512, gt=0, description="texture width in pixels")

    @classmethod
    def example_options(cls) -> dict:
        """Small options for tests: a 512×512 px texture of 2×2 windows."""
        return {"height_px": 512, "width_px": 512, "stride_latent": 32}

    @property
    def num_tiles(self) -> int:
        return 1

    def canvas_size_px(self) -> tuple[int, int]:
        return self.options.height_px, self.options.width_px

    def wraps(self) -> tuple[bool, bool]:
        return (True, True)

    def setup(self, latent: LatentFormat | int) -> None:
        """Windows of one tile (every tile has the same, :func:`jointdiff.core.tiling.axis_starts`
        with both axes wrapped), repeated for each sheet. The windows must overlap: windows
        that only touch would leave their borders (the wrap edge among them) as seams."""
        super().setup(latent)  # checks the sizes against the latent format and the window
        for axis, extent, window, asked, used in zip(
            ("height", "width"), self._size, self._window, self._stride, self.stride_used_latent
        ):
            if used >= window:
                raise ConfigError(
                    f"stride_latent = {asked} leaves no overlap between windows across the tile {axis} "
                    f"({extent} latent cells, window {window}): the wrap edge would be a seam; "
                    f"use a stride below {window}"
                )
        self.tile_origins = self.origins
        self.origins = self.tile_origins * self.num_tiles

    @property
    def canvas_shape_latent(self) -> tuple[int, int, int]:
        return (self.num_tiles, *self._size)

    def tile_of(self, window_id: int) -> int:
        """The tile (canvas sheet) window ``window_id`` belongs to; windows are tile-major."""
        if not 0 <= window_id < self.num_windows:
            raise ConfigError(f"window_id must be in [0, {self.num_windows}), got {window_id!r}")
        return window_id // len(self.tile_origins)

    def sheet_of(self, window_id: int) -> int:
        """The canvas sheet of a window (:meth:`tile_of`), where the base class cuts it."""
        return self.tile_of(window_id)


class AtlasGeometry(TorusGeometry):
    """Several seamlessly tileable textures of one size, generated jointly (one sheet each).

    ``tiles`` tiles of ``tile_height_px × tile_width_px``; each wraps on its own (windows
    never mix tiles). :meth:`to_images` gives one image per tile; :meth:`layout` says where
    each goes in the packed atlas (``columns`` per row, ``gutter_px`` of wrapped border).
    """

    name = "atlas"

    class Options(WindowOptions):
        tiles: int = pydantic.Field(4, gt=0, description="number of textures")
        tile_height_px: int = pydantic.Field(512, gt=0)
        tile_width_px: int = pydantic.Field(512, gt=0)
        columns: int | None = pydantic.Field(None, gt=0, description="tiles per atlas row (default: near-square)")
        gutter_px: int = pydantic.Field(0, ge=0, description="wrapped border around each tile in the atlas")

        @pydantic.model_validator(mode="after")
        def _columns_within_tiles(self):
            if self.columns is not None and self.columns > self.tiles:
                raise ValueError(f"columns ({self.columns}) must not exceed tiles ({self.tiles})")
            return self

    @classmethod
    def example_options(cls) -> dict:
        """Small options for tests: two 512×512 px tiles of 2×2 windows each."""
        return {"tiles": 2, "tile_height_px": 512, "tile_width_px": 512, "stride_latent": 32}

    @property
    def num_tiles(self) -> int:
        return self.options.tiles

    def size_option_names(self) -> tuple[str, str]:
        return ("tile_height_px", "tile_width_px")

    def canvas_size_px(self) -> tuple[int, int]:
        return self.options.tile_height_px, self.options.tile_width_px

    def layout(self) -> AtlasLayout:
        """The atlas packing of the tiles (pixel and UV rectangles: :mod:`jointdiff.surfaces.textures`)."""
        o = self.options
        return AtlasLayout.for_tiles(o.tiles, (o.tile_height_px, o.tile_width_px), o.columns, o.gutter_px)


class CubeTextureGeometry(Geometry):
    """Six square faces, continuous across the cube's 12 edges (a cube texture or skybox).

    Canvas ``(6, C, N, N)``, faces in :mod:`jointdiff.surfaces.cube` order (+X, −X, +Y, −Y, +Z, −Z)
    and orientation. Windows are crops inside each face (as ``grid``) plus, for every edge,
    windows reaching ``k = stride, 2·stride, … < window`` cells past it onto the adjoining
    face, unfolded flat; each window is a gather of ``(face, row, col)`` cells.
    """

    name = "cube_texture"
    decode_padding_latent: int = 8

    class Options(WindowOptions):
        face_px: int = pydantic.Field(512, gt=0, description="side of each square face in pixels")

    @classmethod
    def example_options(cls) -> dict:
        """Small options for tests: 256 px faces, one window per face and one per edge."""
        return {"face_px": 256, "window_latent": 32, "stride_latent": 16}

    def setup(self, latent: LatentFormat | int) -> None:
        """Face and edge windows for the model's latent format: the window and stride are
        whole patches (unset: the native window and ``window // 8``), ``face_px`` a multiple
        of the VAE factor times the patch and at least one window."""
        super().setup(latent)
        o = self.options
        self._window_side, self._stride_side = resolve_window_stride(self, o.window_latent, o.stride_latent)
        scale, patch = self.latent_scale, self.latent_format.patch
        if o.face_px % (scale * patch):
            factor = f"the VAE factor {scale}" if patch == 1 else f"{scale * patch} (the VAE factor {scale} times the patch {patch})"
            raise ConfigError(f"{self.name}: face_px = {o.face_px} is not a multiple of {factor}")
        self._n = o.face_px // scale
        if self._n < self._window_side:
            raise ConfigError(
                f"{self.name}: face_px = {o.face_px} is {self._n} latent cells, "
                f"smaller than one window ({self._window_side})"
            )
        import torch  # here, after the size checks: a job with a bad size is refused without torch

        self.window_specs = self._face_windows() + self._edge_windows()
        self._cells = torch.stack([self.window_cells(i) for i in range(len(self.window_specs))])

    def _face_windows(self) -> list[tuple[int, int, int]]:
        """``(face, top, left)`` of the windows inside each face (latent cells)."""
        starts, _ = axis_starts(self._n, self._window_side, self._stride_side, False, "face")
        return [(face, top, left) for face in range(6) for top in starts for left in starts]

    def _edge_windows(self) -> list[tuple[int, int, int]]:
        """``(face, top, left)`` of windows reaching past one side of ``face`` (negative or
        beyond the face), for each edge once (from the first face that has it)."""
        import torch

        # lazy: loads torch; jointdiff_plugins.textures must import without it
        from jointdiff.surfaces import cube

        n, w, stride = self._n, self._window_side, self._stride_side
        along, _ = axis_starts(n, w, stride, False, "face")
        probes = {"right": (0, n), "bottom": (n, 0), "left": (0, -1), "top": (-1, 0)}
        windows, seen = [], set()
        for face in range(6):
            for side, (row, col) in probes.items():
                other = int(cube.unfold_cells(face, torch.tensor(row), torch.tensor(col), n)[0])
                if frozenset((face, other)) in seen:
                    continue
                seen.add(frozenset((face, other)))
                for past in range(stride, w, stride):
                    across = n - w + past if side in ("right", "bottom") else -past
                    for start in along:
                        windows.append((face, start, across) if side in ("right", "left") else (face, across, start))
        return windows

    def window_cells(self, window_id: int, scale: int = 1) -> torch.Tensor:
        """``(3, k*h, k*w)`` LongTensor: face, row and column of every cell of a window on a
        canvas ``k`` times the latent resolution (``k`` = 1 for latents)."""
        import torch

        # lazy: loads torch; jointdiff_plugins.textures must import without it
        from jointdiff.surfaces import cube

        face, top, left = self.window_specs[window_id]
        size = scale * self._window_side
        local = torch.arange(size)
        rows = (scale * top + local)[:, None].expand(size, size)
        cols = (scale * left + local)[None, :].expand(size, size)
        return torch.stack(cube.unfold_cells(face, rows, cols, scale * self._n))

    def _scale_of(self, canvas: torch.Tensor) -> int:
        scale = canvas.shape[-1] // self._n
        if canvas.shape[0] != 6 or scale < 1 or tuple(canvas.shape[-2:]) != (scale * self._n, scale * self._n):
            raise ValueError(
                f"canvas of shape {tuple(canvas.shape)} is not (6, C, k*N, k*N) for faces of N = {self._n} latent cells"
            )
        return scale

    def _cells_of(self, window_id: int, scale: int) -> torch.Tensor:
        return self._cells[window_id] if scale == 1 else self.window_cells(window_id, scale)

    @property
    def canvas_shape_latent(self) -> tuple[int, int, int]:
        return (6, self._n, self._n)

    @property
    def window_size_latent(self) -> tuple[int, int]:
        return (self._window_side, self._window_side)

    @property
    def num_windows(self) -> int:
        return len(self._cells)

    def extract(self, canvas: torch.Tensor, window_ids: Sequence[int]) -> torch.Tensor:
        """Windows ``(B, C, k*h, k*w)`` of ``canvas`` ``(6, C, k*N, k*N)``: latents (k = 1) or
        a pixel-space input such as a condition image or mask (k = VAE factor)."""
        import torch

        scale = self._scale_of(canvas)
        cells = torch.stack([self._cells_of(i, scale) for i in window_ids]).to(canvas.device)
        faces, rows, cols = cells.unbind(1)  # each (B, k*h, k*w)
        return canvas[faces, :, rows, cols].permute(0, 3, 1, 2)

    def insert(self, target: torch.Tensor, values: torch.Tensor, window_ids: Sequence[int]) -> None:
        scale = self._scale_of(target)
        cells_last = target.permute(0, 2, 3, 1)  # a view: index_put_ writes into target
        for b, window_id in enumerate(window_ids):
            index = tuple(self._cells_of(window_id, scale).to(target.device).unbind(0))
            cells_last.index_put_(index, values[b].permute(1, 2, 0), accumulate=True)

    def decode(self, canvas: torch.Tensor, decode: DecodeFn) -> torch.Tensor:
        """Decode the faces, each with a border of its neighbours' latents, stacked into one
        tall image, and fuse the overlapping borders so no seam remains along the cube's
        edges (:func:`jointdiff.surfaces.cube.decode_padded_faces`). Returns ``(6, 3, f*N, f*N)``."""
        # lazy: loads torch; jointdiff_plugins.textures must import without it
        from jointdiff.surfaces import cube

        return cube.decode_padded_faces(canvas, decode, self.decode_padding_latent, self.latent_scale)


class TileTextConditioner(Conditioner):
    """One prompt per texture tile, with classifier-free guidance (Ho & Salimans 2022).

    The geometry says which tile each window belongs to (``num_tiles`` and
    ``tile_of(window_id)``, as ``torus`` and ``atlas`` do; a geometry without tiles counts
    as one tile); ``prompts`` needs one entry per tile. ``style_prompt`` is appended to every
    prompt (e.g. a shared art direction).
    """

    name = "tile_text"

    class Options(PluginOptions):
        prompts: list[str] = pydantic.Field(min_length=1, description="one prompt per tile, in tile order")
        style_prompt: str = pydantic.Field("", description="appended to every tile's prompt")
        negative_prompt: str | None = pydantic.Field(None, description="what to steer away from (classifier-free guidance families only)")
        guidance_scale: float | None = pydantic.Field(
            None, ge=0.0, allow_inf_nan=False, description="None: the model family's default"
        )

    @classmethod
    def example_options(cls) -> dict:
        return {"prompts": ["a test texture"]}

    def full_prompts(self) -> list[str]:
        style = self.options.style_prompt.strip()
        return [f"{p}, {style}" if style else p for p in self.options.prompts]

    def check_geometry(self, geometry) -> None:
        """Raise :class:`ConfigError` unless ``geometry`` has exactly one tile per prompt."""
        tiles = geometry.num_tiles if isinstance(geometry, TileSource) else 1
        if tiles != len(self.options.prompts):
            what = f"{tiles} tiles" if isinstance(geometry, TileSource) else "no tiles (it counts as one)"
            raise ConfigError(
                f"tile_text: prompts has {len(self.options.prompts)} entries but geometry "
                f"{getattr(geometry, 'name', geometry)!r} has {what}; give one prompt per tile "
                f"(geometries with tiles: 'torus', 'atlas')"
            )

    def setup(self, context) -> None:
        self.check_geometry(context.geometry)
        prompts = self.full_prompts()
        o = self.options
        embeds, negative, scale = encode_text(context, prompts, [o.negative_prompt] * len(prompts), o.guidance_scale, "tile_text")
        tile_of = context.geometry.tile_of if isinstance(context.geometry, TileSource) else None
        self._prompt = Prompt(embeds, negative, scale, window_prompt=tile_of)

    def prompt(self) -> Prompt:
        return self._prompt


@hookimpl
def register_geometries(register):
    register(TorusGeometry)
    register(AtlasGeometry)
    register(CubeTextureGeometry)


@hookimpl
def register_conditioners(register):
    register(TileTextConditioner)

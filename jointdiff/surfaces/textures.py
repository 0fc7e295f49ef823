"""Textures for 3D assets: seam metrics, repeated previews, atlases with a UV manifest.

Conventions (as kornia): tensors are ``(B, C, H, W)`` (or ``(C, H, W)``); sizes are
``(h, w)``; pixel rectangles are ``(x, y, width, height)`` with the origin at the top-left
corner of the image, ``x`` to the right and ``y`` down, covering columns ``x .. x+width-1``
and rows ``y .. y+height-1``.

UV coordinates follow glTF 2.0 (and its ``KHR_texture_transform`` extension): ``(0, 0)`` is
the *upper-left corner* of the image, ``u`` grows to the right and ``v`` grows *down*,
``(1, 1)`` is the lower-right corner. They name pixel *edges*: pixel column ``x`` spans
``u ∈ [x / W, (x + 1) / W]``. DirectX, Vulkan, Metal and Unreal use the same orientation;
OpenGL, Blender and Unity put ``(0, 0)`` at the lower-left corner with ``v`` up, so the
manifest also gives ``v_bottom_left = 1 − v``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, Sequence, runtime_checkable

from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image


@runtime_checkable
class TileSource(Protocol):
    """A geometry whose windows each belong to one texture tile (torus, atlas)."""

    @property
    def num_tiles(self) -> int: ...

    def tile_of(self, window_id: int) -> int: ...


def _as_chw(image: torch.Tensor | np.ndarray | Image.Image) -> torch.Tensor:
    """Any image to a float ``(B, C, H, W)`` tensor; arrays and PIL images are ``(H, W, C)``."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image[..., None] if image.ndim == 2 else image
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise ConfigError(f"image must be a PIL image, an (H, W, C) array or a (B, C, H, W) tensor, got {image!r:.80}")
    image = image.detach().float().cpu()
    return image if image.ndim == 4 else image[None]


def seam_ratio(
    image: torch.Tensor | np.ndarray | Image.Image, axis: Literal["x", "y"], period: int = 1
) -> float:
    """How visible the wrap seam of a tileable image is along one axis.

    The *seam difference* is the mean absolute difference between the last and the first
    column (``axis="x"``: right edge → left edge) or row (``axis="y"``: bottom → top), i.e.
    the pixels that meet when the image is repeated. It is divided by the median of the same
    difference over every pair of neighbouring interior columns (rows) ``(j, j+1)`` with
    ``(j + 1) % period == 0`` (``period = 8`` compares only pairs at the same phase of an SD
    VAE's 8-pixel upsampling grid, where the seam lies). About 1: the seam looks like any
    other column boundary; well above 1: a visible seam.

    ``image``: ``(B, C, H, W)`` / ``(C, H, W)`` tensor, ``(H, W, C)`` array or PIL image.
    """
    import torch

    if axis not in ("x", "y"):
        raise ConfigError(f"axis must be 'x' or 'y', got {axis!r}")
    pixels = _as_chw(image)
    if axis == "y":
        pixels = pixels.transpose(-1, -2)
    length = pixels.shape[-1]
    if not isinstance(period, int) or period < 1 or length < period + 1:
        raise ConfigError(f"period must be an integer in [1, {length - 1}] for this image, got {period!r}")
    interior = (pixels[..., 1:] - pixels[..., :-1]).abs().mean(dim=(0, 1, 2))
    phase = (torch.arange(1, length) % period) == 0
    reference = float(interior[phase].median())
    seam = float((pixels[..., 0] - pixels[..., -1]).abs().mean())
    if reference == 0.0:
        return 1.0 if seam == 0.0 else math.inf
    return seam / reference


def seam_report(image: torch.Tensor | np.ndarray | Image.Image, period: int = 1) -> dict[str, float]:
    """:func:`seam_ratio` along both axes: ``{"x": ..., "y": ...}``."""
    return {axis: seam_ratio(image, axis, period) for axis in ("x", "y")}


def repeat_preview(tile: Image.Image, repeat: int = 3) -> Image.Image:
    """The tile repeated ``repeat × repeat`` times, so a seam shows as a cross-hatched grid."""
    import numpy as np
    from PIL import Image

    if not isinstance(repeat, int) or repeat < 1:
        raise ConfigError(f"repeat must be a positive integer, got {repeat!r}")
    array = np.asarray(tile.convert("RGB"))
    return Image.fromarray(np.tile(array, (repeat, repeat, 1)))


def wrap_pad(tile: Image.Image, pad_px: int) -> Image.Image:
    """Pad a tileable image on every side with its own wrapped continuation (an atlas
    gutter: bilinear filtering and mipmaps at the tile's border then see the right texels)."""
    import numpy as np
    from PIL import Image

    if pad_px == 0:
        return tile.convert("RGB")
    array = np.asarray(tile.convert("RGB"))
    return Image.fromarray(np.pad(array, ((pad_px, pad_px), (pad_px, pad_px), (0, 0)), mode="wrap"))


@dataclass(frozen=True)
class AtlasLayout:
    """Where each tile sits in the atlas image: a row-major grid of equal cells.

    ``tile_size_px`` is ``(h, w)`` of one tile; each cell holds the tile plus a gutter of
    ``gutter_px`` on every side (filled by :func:`wrap_pad`). Tile ``i`` is in row
    ``i // columns``, column ``i % columns``; unused cells of the last row stay black.
    """

    count: int
    tile_size_px: tuple[int, int]
    columns: int
    gutter_px: int = 0

    def __post_init__(self) -> None:
        for label, value in (("count", self.count), ("columns", self.columns)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"atlas {label} must be a positive integer, got {value!r}")
        if self.columns > self.count:
            raise ConfigError(f"atlas columns = {self.columns} exceeds the number of tiles ({self.count})")
        if not isinstance(self.gutter_px, int) or self.gutter_px < 0:
            raise ConfigError(f"gutter_px must be a non-negative integer, got {self.gutter_px!r}")
        if min(self.tile_size_px) < 1:
            raise ConfigError(f"tile_size_px must be positive, got {self.tile_size_px!r}")

    @classmethod
    def for_tiles(
        cls, count: int, tile_size_px: tuple[int, int], columns: int | None = None, gutter_px: int = 0
    ) -> AtlasLayout:
        """A near-square grid (``ceil(sqrt(count))`` columns) unless ``columns`` is given."""
        if columns is None and isinstance(count, int) and count > 0:
            columns = math.ceil(math.sqrt(count))
        return cls(count, tuple(tile_size_px), columns, gutter_px)

    @property
    def rows(self) -> int:
        return math.ceil(self.count / self.columns)

    @property
    def size_px(self) -> tuple[int, int]:
        """``(h, w)`` of the whole atlas image."""
        h, w = self.tile_size_px
        return (self.rows * (h + 2 * self.gutter_px), self.columns * (w + 2 * self.gutter_px))

    def rect_px(self, index: int) -> tuple[int, int, int, int]:
        """``(x, y, width, height)`` of tile ``index`` (gutter excluded), top-left origin."""
        if not 0 <= index < self.count:
            raise ConfigError(f"tile index must be in [0, {self.count}), got {index!r}")
        h, w = self.tile_size_px
        row, col = divmod(index, self.columns)
        g = self.gutter_px
        return (col * (w + 2 * g) + g, row * (h + 2 * g) + g, w, h)

    def uv_rect(self, index: int) -> dict[str, list[float]]:
        """UV corners of tile ``index``: glTF (top-left origin, v down) and bottom-left origin."""
        x, y, w, h = self.rect_px(index)
        height, width = self.size_px
        u0, u1, v0, v1 = x / width, (x + w) / width, y / height, (y + h) / height
        return {
            "uv_min": [u0, v0],
            "uv_max": [u1, v1],
            "uv_min_bottom_left": [u0, 1.0 - v1],
            "uv_max_bottom_left": [u1, 1.0 - v0],
            "khr_texture_transform": {"offset": [u0, v0], "scale": [u1 - u0, v1 - v0]},
        }


def pack_atlas(tiles: Sequence[Image.Image], layout: AtlasLayout) -> Image.Image:
    """Paste ``tiles`` (each ``layout.tile_size_px``, with wrapped gutters) into one RGB image."""
    from PIL import Image

    if len(tiles) != layout.count:
        raise ConfigError(f"pack_atlas got {len(tiles)} tiles for a layout of {layout.count}")
    height, width = layout.size_px
    atlas = Image.new("RGB", (width, height))
    for index, tile in enumerate(tiles):
        if (tile.height, tile.width) != layout.tile_size_px:
            raise ConfigError(
                f"tile {index} is {tile.height}x{tile.width} px, the layout expects {layout.tile_size_px}"
            )
        x, y, _, _ = layout.rect_px(index)
        atlas.paste(wrap_pad(tile, layout.gutter_px), (x - layout.gutter_px, y - layout.gutter_px))
    return atlas


CONVENTIONS = {
    "rect_px": "x, y, width, height in pixels; origin at the top-left corner of the atlas, "
    "x right, y down; covers columns x..x+width-1 and rows y..y+height-1",
    "uv": "glTF 2.0 / KHR_texture_transform: (0, 0) is the upper-left corner of the atlas, "
    "u right, v down, (1, 1) the lower-right corner; u = x / width_px, v = y / height_px "
    "(pixel edges, not pixel centres)",
    "uv_bottom_left": "OpenGL / Blender / Unity: (0, 0) is the lower-left corner, v up; "
    "v_bottom_left = 1 - v",
    "khr_texture_transform": "offset and scale that map a mesh's [0, 1] UVs onto the tile: "
    "uv_atlas = offset + scale * uv",
}


def atlas_manifest(
    layout: AtlasLayout,
    names: Sequence[str],
    prompts: Sequence[str] | None = None,
    image: str = "atlas.png",
    files: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The JSON manifest of an atlas: every tile's pixel rectangle and UV rectangle."""
    if len(names) != layout.count:
        raise ConfigError(f"names has {len(names)} entries for {layout.count} tiles")
    height, width = layout.size_px
    tiles = []
    for index, name in enumerate(names):
        x, y, w, h = layout.rect_px(index)
        entry: dict[str, Any] = {"index": index, "name": name}
        if prompts is not None:
            entry["prompt"] = prompts[index]
        if files is not None:
            entry["file"] = files[index]
        entry["rect_px"] = {"x": x, "y": y, "width": w, "height": h}
        entry.update(layout.uv_rect(index))
        tiles.append(entry)
    return {
        "image": image,
        "width_px": width,
        "height_px": height,
        "gutter_px": layout.gutter_px,
        "conventions": CONVENTIONS,
        "tiles": tiles,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "tile"


def export_textures(
    tiles: Sequence[Image.Image],
    folder: str | Path,
    names: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    layout: AtlasLayout | None = None,
    preview_repeat: int = 3,
) -> dict[str, Any]:
    """Write each tile, its ``preview_repeat``² preview, the atlas and its JSON manifest.

    Files: ``NN_name.png``, ``NN_name_preview.png``, ``atlas.png``, ``atlas.json`` in
    ``folder`` (created). ``names`` default to slugs of ``prompts`` or ``tile_NN``. Returns
    the manifest, with the paths of the written files under ``"files"``.
    """
    if not tiles:
        raise ConfigError("export_textures needs at least one tile, got 0")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if names is None:
        names = [_slug(p) for p in prompts] if prompts is not None else [f"tile_{i:02d}" for i in range(len(tiles))]
    if layout is None:
        layout = AtlasLayout.for_tiles(len(tiles), (tiles[0].height, tiles[0].width))
    files = [f"{i:02d}_{_slug(name)}.png" for i, name in enumerate(names)]
    for tile, file in zip(tiles, files):
        tile.save(folder / file)
        repeat_preview(tile, preview_repeat).save(folder / file.replace(".png", "_preview.png"))
    pack_atlas(tiles, layout).save(folder / "atlas.png")
    manifest = atlas_manifest(layout, names, prompts, "atlas.png", files)
    (folder / "atlas.json").write_text(json.dumps(manifest, indent=2))
    written = [folder / f for f in files] + [folder / f.replace(".png", "_preview.png") for f in files]
    return {**manifest, "files": [str(p) for p in written + [folder / "atlas.png", folder / "atlas.json"]]}


def export_cube(faces: Sequence[Image.Image], folder: str | Path) -> list[str]:
    """Write six cube faces (a ``cube_texture`` or ``cubemap`` job's images, in
    :mod:`jointdiff.surfaces.cube` order) as ``face_px.png`` … ``face_nz.png`` and ``cross.png`` (the
    horizontal cross) in ``folder`` (created), with the cube-map writer
    :func:`jointdiff.surfaces.export360.save_faces`. Returns the written paths."""
    # lazy: loads torch; jointdiff.surfaces.textures must import without it
    from jointdiff.surfaces.export360 import save_faces

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = save_faces(faces, folder / "face.png") + save_faces(faces, folder / "cross.png", "dice")
    return [str(p) for p in paths]

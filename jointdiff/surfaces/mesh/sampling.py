"""Moving values between a mesh's texture and its rendered views (SyncMVD, Liu et al. 2023;
SyncTweedies, Kim et al. NeurIPS 2024).

- :func:`render` (``extract``): every view pixel that shows the surface samples the texture
  bilinearly at its UV (clamped at the texture's border); pixels showing no surface get 0.
  It is a gather with fixed taps, so it is linear.
- :func:`splat` is its exact adjoint: every view pixel adds its value, times the same four
  bilinear weights, into the texels it read. ``⟨render(T), V⟩ = ⟨T, splat(V)⟩``.
- :func:`fill_index` / :func:`apply_fill`: texels that no view sees take the value of the
  nearest seen texel of their sheet (a Voronoi fill, as SyncMVD), a fixed copy, so linear too.
- :func:`bake`: the final texture in pixel space, gathered texel by texel from the decoded
  views (each texel's surface point projected into every view that sees it, weighted by
  ``cos(view angle)^k``), then filled, which also pads every UV island.

Conventions: textures ``(S, C, H, W)`` (S sheets = materials), row 0 at the top (``v = 1``);
views ``(B, C, h, w)``; texel ``(row, col)`` is centred at ``u = (col + ½) / W``,
``v = 1 − (row + ½) / H``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from jointdiff.surfaces.mesh.cameras import Camera, project
from jointdiff.surfaces.mesh.raster import TexelMaps, ViewMaps
from jointdiff.utils.errors import ConfigError


@dataclass
class Taps:
    """The bilinear taps of ``B`` views of ``n`` pixels each into a texture ``(S, H, W)``:
    ``sheet``, ``row``, ``col`` ``(B, n, 4)`` long and ``weight`` ``(B, n, 4)`` (0 off the surface)."""

    sheet: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    weight: torch.Tensor

    def select(self, ids) -> Taps:
        ids = torch.as_tensor(list(ids), dtype=torch.long, device=self.sheet.device)
        return Taps(self.sheet[ids], self.row[ids], self.col[ids], self.weight[ids])

    def to(self, device) -> Taps:
        return Taps(*(t.to(device) for t in (self.sheet, self.row, self.col, self.weight)))


def view_taps(maps: list[ViewMaps], size: tuple[int, int]) -> Taps:
    """The :class:`Taps` of views (their ``uv`` and ``sheet`` maps) into textures of ``size = (H, W)``."""
    height, width = size
    uv = np.stack([m.uv.reshape(-1, 2) for m in maps])
    sheet = np.stack([m.sheet.reshape(-1) for m in maps])
    x = uv[..., 0] * width - 0.5
    y = (1 - uv[..., 1]) * height - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    cols = np.stack([x0, x0 + 1, x0, x0 + 1], -1).clip(0, width - 1).astype(np.int64)
    rows = np.stack([y0, y0, y0 + 1, y0 + 1], -1).clip(0, height - 1).astype(np.int64)
    weight = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    on = sheet >= 0
    weight = weight * on[..., None]
    sheets = np.repeat(np.maximum(sheet, 0)[..., None], 4, -1)
    return Taps(*(torch.from_numpy(a) for a in (sheets, rows * on[..., None], cols * on[..., None], weight)))


def render(texture: torch.Tensor, taps: Taps, size: tuple[int, int]) -> torch.Tensor:
    """Views ``(B, C, h, w)`` of ``texture`` ``(S, C, H, W)`` through ``taps`` (bilinear; 0 off the surface)."""
    values = texture[taps.sheet, :, taps.row, taps.col]  # (B, n, 4, C)
    out = (values * taps.weight[..., None].to(texture.dtype)).sum(2)
    return out.permute(0, 2, 1).reshape(out.shape[0], texture.shape[1], *size)


def splat(target: torch.Tensor, views: torch.Tensor, taps: Taps) -> None:
    """Add the adjoint of :func:`render` of ``views`` ``(B, C, h, w)`` into ``target`` ``(S, C, H, W)``."""
    channels = views.shape[1]
    values = views.reshape(views.shape[0], channels, -1).permute(0, 2, 1)  # (B, n, C)
    contributions = values[:, :, None, :] * taps.weight[..., None].to(views.dtype)  # (B, n, 4, C)
    texels = target.permute(0, 2, 3, 1)  # a view: index_put_ writes into target
    texels.index_put_((taps.sheet.reshape(-1), taps.row.reshape(-1), taps.col.reshape(-1)),
                      contributions.reshape(-1, channels).to(target.dtype), accumulate=True)


def fill_index(seen: np.ndarray, what: str = "texture", names: list[str] | None = None) -> np.ndarray:
    """For a mask of seen texels ``(S, H, W)``, the flat index ``(S·H·W,)`` of the nearest seen
    texel of the same sheet for every texel (itself when seen). ConfigError when a sheet has none."""
    from scipy import ndimage

    sheets, height, width = seen.shape
    index = np.empty(seen.shape, dtype=np.int64)
    for s in range(sheets):
        if not seen[s].any():
            name = names[s] if names else str(s)
            raise ConfigError(f"mesh: cameras: no view sees sheet {s} of the {what} (material {name!r}): add cameras that see it")
        rows, cols = ndimage.distance_transform_edt(~seen[s], return_distances=False, return_indices=True)
        index[s] = s * height * width + rows * width + cols
    return index.reshape(-1)


def apply_fill(texture: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``texture`` ``(S, C, H, W)`` with every texel replaced by the texel ``index`` names."""
    sheets, channels, height, width = texture.shape
    flat = texture.permute(0, 2, 3, 1).reshape(-1, channels)[index]
    return flat.reshape(sheets, height, width, channels).permute(0, 3, 1, 2)


def bake(views: torch.Tensor, cameras: list[Camera], view_maps: list[ViewMaps], texels: list[TexelMaps],
         cos_power: float, depth_tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Texture ``(S, C, H, W)`` from views ``(B, C, h, w)`` (their pixel-size ``view_maps``):
    each texel with a surface point is projected into every view; where the view's depth
    there matches (within ``depth_tolerance``) the texel is visible and takes the view's
    bilinear value, weighted by ``|cos|^cos_power``. Returns the weighted mean and
    the seen mask ``(S, H, W)``; unseen texels are 0 (fill them with :func:`fill_index`)."""
    sheets = len(texels)
    height, width = texels[0].face.shape
    out = torch.zeros(sheets, views.shape[1], height, width, dtype=torch.float64)
    total = torch.zeros(sheets, 1, height, width, dtype=torch.float64)
    for s, tex in enumerate(texels):
        on = tex.face.reshape(-1) >= 0
        points, normals = tex.point.reshape(-1, 3)[on], tex.normal.reshape(-1, 3)[on]
        for b, (camera, maps) in enumerate(zip(cameras, view_maps)):
            value, weight = _texel_samples(views[b], camera, maps, points, normals, cos_power, depth_tolerance)
            flat_out = out[s].reshape(views.shape[1], -1)
            flat_out[:, torch.from_numpy(on)] += value * weight
            total[s].reshape(-1)[torch.from_numpy(on)] += weight
    seen = (total > 0)[:, 0]
    return (out / total.clamp(min=1e-300)).to(views.dtype), seen


def _texel_samples(view, camera, maps: ViewMaps, points, normals, cos_power, depth_tolerance):
    """Bilinear values ``(C, N)`` of one view at texel points ``(N, 3)`` and their weights ``(N,)``."""
    uv, depth = project(camera, points)
    size = maps.depth.shape[0]
    col = np.clip(np.floor((uv[:, 0] + 1) * size / 2), 0, size - 1).astype(np.int64)
    row = np.clip(np.floor((uv[:, 1] + 1) * size / 2), 0, size - 1).astype(np.int64)
    inside = (np.abs(uv) <= 1).all(1) & maps.mask[row, col]
    visible = inside & (np.abs(maps.depth[row, col] - depth) <= depth_tolerance)
    to_camera = camera.position - points if camera.ortho_half_height is None else np.broadcast_to(camera.axes()[:, 2], points.shape)
    to_camera = to_camera / np.linalg.norm(to_camera, axis=1, keepdims=True)
    cos = np.abs(np.einsum("ij,ij->i", normals, to_camera))  # either winding
    weight = np.where(visible, cos**cos_power, 0.0)
    grid = torch.from_numpy(uv).to(view.dtype)[None, None]
    value = F.grid_sample(view[None].to(grid.dtype), grid.to(view.device), mode="bilinear", padding_mode="border",
                          align_corners=False)[0, :, 0]
    return value.double().cpu(), torch.from_numpy(weight)

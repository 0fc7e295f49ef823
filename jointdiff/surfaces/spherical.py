"""Directions on the sphere, and how equirectangular images, cube faces and perspective views
sample each other: the math under the ``equirect`` and ``cubemap`` geometries.

Conventions (kornia style, and the same as py360convert's):

- World axes: ``x`` points right (east), ``y`` up, ``z`` forward (yaw 0, pitch 0). Direction
  vectors are ``(..., 3)`` tensors in that order, float64 while computing grids.
- Angles are degrees and carry ``_deg``. **Yaw** (longitude) 0 is the canvas's centre column,
  positive yaw turns right (east, toward larger columns), ±180° is the left/right edge where
  the canvas wraps. **Pitch** (latitude) positive is up; ±90° are the poles (top/bottom row).
- Images are ``(B, C, H, W)``; sizes are ``(h, w)``. Pixel ``(row, col)`` has its centre at
  ``((col + ½) / W, (row + ½) / H)`` of the image, as ``grid_sample(..., align_corners=False)``
  reads normalized coordinates: ``u = 2 (col + ½) / W − 1`` runs over ``[−1, 1]`` left to
  right, ``v`` top to bottom.
- Equirectangular: column ``col`` has longitude ``(u · 180)°``, row ``row`` latitude
  ``(−v · 90)°`` (top row north).
- Perspective view of square field of view ``fov_deg`` looking at ``(yaw, pitch)``, no roll:
  pixel ``(u, v)`` sees the camera ray ``(u·t, −v·t, 1)`` with ``t = tan(fov/2)``, turned up
  by ``pitch`` about the x axis and then right by ``yaw`` about the y axis. At pitch ±90° the
  yaw sets which way the view's top points (yaw 0: toward −z at the north pole).
- Cube faces: the order (+X −X +Y −Y +Z −Z), orientation and names of :mod:`jointdiff.surfaces.cube`
  (the OpenGL cube-map convention), whose tables :data:`jointdiff.surfaces.cube.NORMALS`,
  :data:`~jointdiff.surfaces.cube.COLUMN_AXES` (the direction of increasing column) and
  :data:`~jointdiff.surfaces.cube.ROW_AXES` (increasing row, i.e. downward in the face image) this
  module samples with. The face of yaw 0, pitch 0 is +Z; a 90° view at ``(yaw, pitch)``
  sees exactly a face, oriented as its image: +X (90°, 0°), −X (−90°, 0°), +Y (0°, 90°),
  −Y (0°, −90°), +Z (0°, 0°), −Z (180°, 0°).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange

from jointdiff.surfaces import cube


def pixel_centres(size: int, dtype=torch.float64) -> torch.Tensor:
    """Normalized centres ``2 (i + ½) / size − 1`` of ``size`` pixels (align_corners=False)."""
    return (2 * torch.arange(size, dtype=dtype) + 1) / size - 1


def lonlat_to_directions(lon_deg: torch.Tensor, lat_deg: torch.Tensor) -> torch.Tensor:
    """Unit directions ``(..., 3)`` of longitudes and latitudes in degrees."""
    lon, lat = torch.deg2rad(lon_deg), torch.deg2rad(lat_deg)
    return torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()], dim=-1)


def directions_to_lonlat(directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Longitude in ``(−180, 180]`` and latitude in ``[−90, 90]`` (degrees) of ``(..., 3)``."""
    x, y, z = directions.unbind(-1)
    lon = torch.rad2deg(torch.atan2(x, z))
    lat = torch.rad2deg(torch.atan2(y, torch.hypot(x, z)))
    return lon, lat


def equirect_directions(size: tuple[int, int]) -> torch.Tensor:
    """Directions ``(H, W, 3)`` of the pixel centres of an equirectangular image of
    ``size = (H, W)`` (row 0 north, column 0 at yaw −180°)."""
    height, width = size
    lat = -90.0 * pixel_centres(height)
    lon = 180.0 * pixel_centres(width)
    return lonlat_to_directions(lon[None, :].expand(height, width), lat[:, None].expand(height, width))


def directions_to_equirect_uv(directions: torch.Tensor) -> torch.Tensor:
    """Normalized equirectangular coordinates ``(..., 2)`` = ``(u, v)`` of directions:
    ``u = lon / 180°`` and ``v = −lat / 90°`` (align_corners=False)."""
    lon, lat = directions_to_lonlat(directions)
    return torch.stack([lon / 180.0, -lat / 90.0], dim=-1)


def view_rotation(yaw_deg: float, pitch_deg: float) -> torch.Tensor:
    """Camera-to-world rotation ``(3, 3)`` of a view at ``(yaw, pitch)``: its columns are the
    world directions of the camera's right, up and forward axes."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    pitch_up = torch.tensor([[1, 0, 0], [0, cp, sp], [0, -sp, cp]], dtype=torch.float64)
    yaw_right = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    return yaw_right @ pitch_up


def perspective_directions(yaw_deg: float, pitch_deg: float, fov_deg: float, size: tuple[int, int]) -> torch.Tensor:
    """Unit world directions ``(h, w, 3)`` seen by the pixel centres of a square-FOV
    perspective view of ``size = (h, w)`` looking at ``(yaw_deg, pitch_deg)``."""
    tan_half = math.tan(math.radians(fov_deg) / 2)
    height, width = size
    u = pixel_centres(width)[None, :].expand(height, width)
    v = pixel_centres(height)[:, None].expand(height, width)
    rays = torch.stack([u * tan_half, -v * tan_half, torch.ones_like(u)], dim=-1)
    rays = rays @ view_rotation(yaw_deg, pitch_deg).T
    return rays / rays.norm(dim=-1, keepdim=True)


def project_to_view(
    directions: torch.Tensor, yaw_deg: float, pitch_deg: float, fov_deg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where directions ``(..., 3)`` fall in a view: normalized view coordinates ``(..., 2)``
    (``(u, v)``, align_corners=False) and a mask ``(...)`` of those inside its frustum
    (in front of the camera and ``|u|, |v| <= 1``, i.e. within the view's outer pixel edges)."""
    camera = directions @ view_rotation(yaw_deg, pitch_deg)  # world → camera: R^T d
    tan_half = math.tan(math.radians(fov_deg) / 2)
    depth = camera[..., 2]
    ahead = depth > 1e-9
    safe = torch.where(ahead, depth, torch.ones_like(depth))
    u = camera[..., 0] / safe / tan_half
    v = -camera[..., 1] / safe / tan_half
    inside = ahead & (u.abs() <= 1) & (v.abs() <= 1)
    return torch.stack([u, v], dim=-1), inside


def cube_directions(face_size: int) -> torch.Tensor:
    """Directions ``(6, N, N, 3)`` (not unit: points on the cube ``max |·| = 1``) of the cell
    centres of six ``N × N`` faces (:func:`jointdiff.surfaces.cube.face_directions`)."""
    return cube.face_directions(face_size)


def directions_to_cube(directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The face (LongTensor ``(...)``) each direction ``(..., 3)`` hits and its normalized
    coordinates ``(..., 2)`` = ``(u, v)`` on that face (align_corners=False), as
    :func:`jointdiff.surfaces.cube.face_coordinates`."""
    face, u, v = cube.face_coordinates(directions)
    return face, torch.stack([u, v], dim=-1)


def pad_equirect(image: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, C, H + 2, W + 2)``: one pixel of what lies beyond each edge on
    the sphere (columns wrap; above the top row is the top row half a turn away)."""
    half = image.shape[-1] // 2
    top = image[..., :1, :].roll(half, dims=-1)
    bottom = image[..., -1:, :].roll(half, dims=-1)
    tall = torch.cat([top, image, bottom], dim=-2)
    return torch.cat([tall[..., -1:], tall, tall[..., :1]], dim=-1)


def equirect_grid(uv: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Turn equirectangular ``uv`` ``(..., 2)`` into ``grid_sample`` coordinates of the
    padded image :func:`pad_equirect` of an ``(H, W)`` image."""
    height, width = size
    col = (uv[..., 0] + 1) * width / 2 + 0.5  # pixel index in the padded image (+1 − ½)
    row = (uv[..., 1] + 1) * height / 2 + 0.5
    return torch.stack([(2 * col + 1) / (width + 2) - 1, (2 * row + 1) / (height + 2) - 1], dim=-1)


@functools.lru_cache(maxsize=8)
def cube_pad_index(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather indices ``(face, row, col)``, each ``(6, N + 2, N + 2)``, of the six faces of
    side ``N = size`` grown by one cell taken from their neighbours across each edge
    (:func:`jointdiff.surfaces.cube.padded_face_index`)."""
    parts = [cube.padded_face_index(face, size, 1) for face in range(6)]
    return tuple(torch.stack(index) for index in zip(*parts))


def pad_cube(faces: torch.Tensor) -> torch.Tensor:
    """Six faces ``(6, C, N, N)`` → one tall image ``(1, C, 6 (N + 2), N + 2)`` of the faces,
    each grown by one cell of its neighbours, so that bilinear sampling is continuous across
    the cube's edges."""
    index = tuple(i.to(faces.device) for i in cube_pad_index(faces.shape[-1]))
    padded = faces[index[0], :, index[1], index[2]]  # (6, N + 2, N + 2, C)
    return rearrange(padded, "f h w c -> 1 c (f h) w")


def cube_grid(face: torch.Tensor, uv: torch.Tensor, size: int) -> torch.Tensor:
    """``grid_sample`` coordinates in :func:`pad_cube`'s tall image of faces ``N = size``
    for face indices ``face`` ``(...)`` and face coordinates ``uv`` ``(..., 2)``."""
    block = size + 2
    col = (uv[..., 0] + 1) * size / 2 + 0.5
    row = (uv[..., 1] + 1) * size / 2 + 0.5 + face.to(uv.dtype) * block
    return torch.stack([(2 * col + 1) / block - 1, (2 * row + 1) / (6 * block) - 1], dim=-1)


def sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear ``grid_sample`` (align_corners=False, border padding) of ``image`` ``(1 or B,
    C, H, W)`` at ``grid`` ``(B, h, w, 2)``; returns ``(B, C, h, w)`` in the image's dtype."""
    if image.shape[0] != grid.shape[0]:
        image = image.expand(grid.shape[0], *image.shape[1:])
    grid = grid.to(image.dtype)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def wrap_seam_ratio(pixels: torch.Tensor) -> float:
    """How visible the yaw ±180° seam is in an equirectangular image ``(B, C, H, W)``: the
    mean absolute difference between the last and the first column, over the mean absolute
    difference between neighbouring columns inside the image. About 1: the wrap is like any
    other column boundary; well above 1: a visible seam."""
    pixels = pixels.detach().double()
    across = (pixels[..., -1] - pixels[..., 0]).abs().mean()
    inside = (pixels[..., 1:] - pixels[..., :-1]).abs().mean()
    return float(across / inside) if float(inside) else float("inf")


def pole_ratio(pixels: torch.Tensor, rows: int = 1) -> float:
    """Pinching at the poles of an equirectangular image ``(B, C, H, W)``: the spread
    (standard deviation over the columns) of the ``rows`` top and bottom rows, over that of
    the rows in between. A pole is a single point, so well below 1 is expected near the
    rows; this reports how smooth they are against the rest (≈ 0: constant pole rows)."""
    pixels = pixels.detach().double()
    poles = torch.cat([pixels[..., :rows, :], pixels[..., -rows:, :]], dim=-2).std(dim=-1).mean()
    middle = pixels[..., rows:-rows, :].std(dim=-1).mean()
    return float(poles / middle) if float(middle) else float("inf")

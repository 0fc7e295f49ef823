"""The six faces of a cube, their order, orientation and names, and how they join: the one
cube-face convention of jointdiff, used by the ``cube_texture`` and ``cubemap`` geometries
(their canvas sheets and output images), :mod:`jointdiff.surfaces.spherical` (sphere ↔ cube sampling)
and the exports (:mod:`jointdiff.surfaces.export360`, :func:`jointdiff.surfaces.textures.export_cube`).

Face order and orientation follow the cube-map convention shared by OpenGL (4.6 spec,
Table 8.19 "Selection of cube map images"), Vulkan, Direct3D and the KTX/DDS formats, in the
frame of :mod:`jointdiff.surfaces.spherical` (``x`` right/east, ``y`` up, ``z`` forward, the centre
of an equirectangular image):

======  =====  =====  ======  ======  ==================================
index   face   name   sc      tc      looking from the centre toward
======  =====  =====  ======  ======  ==================================
0       +X     px     −z      −y      +x (right)
1       −X     nx     +z      −y      −x (left)
2       +Y     py     +x      +z      +y (up)
3       −Y     ny     +x      −z      −y (down)
4       +Z     pz     +x      −y      +z (front: yaw 0, pitch 0)
5       −Z     nz     −x      −y      −z (back)
======  =====  =====  ======  ======  ==================================

For a direction ``r = (x, y, z)`` whose largest-magnitude component is ``m`` (the face),
``s = (sc / |m| + 1) / 2`` runs along a face image's columns (left → right) and
``t = (tc / |m| + 1) / 2`` along its rows, top row first (as PNG, KTX and DDS store it):
cell ``(row, col)`` of an ``N × N`` face has its centre at ``s = (col + ½) / N``,
``t = (row + ½) / N``. Faces are tensors ``(6, C, N, N)`` in this order.

The horizontal cross (the ``dice`` layout of :func:`jointdiff.surfaces.export360.faces_to_layout`)
shows how the faces unfold without any rotation in this convention::

          +Y
    −X    +Z    +X    −Z
          −Y

Other libraries' conventions are converted at their boundary only: py360convert names the
same faces, in the same orientation, F R B L U D (:data:`jointdiff.surfaces.export360.PY360_FACE`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    from jointdiff.core.geometry import DecodeFn


FACE_NAMES = ("px", "nx", "py", "ny", "pz", "nz")
"""Names of the faces in index order (+X −X +Y −Y +Z −Z), as in cube-map file names."""
# Outward normal, and the 3D directions of increasing column (sc) and increasing row (tc).
NORMALS = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float64)
COLUMN_AXES = torch.tensor([[0, 0, -1], [0, 0, 1], [1, 0, 0], [1, 0, 0], [1, 0, 0], [-1, 0, 0]], dtype=torch.float64)
ROW_AXES = torch.tensor([[0, -1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1], [0, -1, 0], [0, -1, 0]], dtype=torch.float64)


def cell_points(face: int, rows: torch.Tensor, cols: torch.Tensor, face_size: int) -> torch.Tensor:
    """Points ``(..., 3)`` on the cube surface ``max(|x|, |y|, |z|) = 1`` of cells ``(rows,
    cols)`` of ``face``, where the grid may run past the face across one edge: such cells
    are *folded* over that edge onto the neighbouring face, as if the two faces were
    unfolded flat. Cells past two edges at once (beyond a corner, where only three faces
    meet) have no such point and raise :class:`ConfigError`."""
    n = face_size
    a = (2 * cols.double() + 1) / n - 1  # column centre in [-1, 1] on the face's plane
    b = (2 * rows.double() + 1) / n - 1
    past_a, past_b = (a.abs() - 1).clamp(min=0), (b.abs() - 1).clamp(min=0)
    if bool(((past_a > 0) & (past_b > 0)).any()):
        raise ConfigError("cells past a cube corner (two edges at once) do not unfold onto the cube")
    if bool(((past_a >= 2) | (past_b >= 2)).any()):
        raise ConfigError(f"cells more than one face ({n} cells) past an edge do not unfold onto a neighbour")
    depth = (past_a + past_b)[..., None]  # how far past the edge, folded back along −normal
    return (
        NORMALS[face] * (1 - depth)
        + COLUMN_AXES[face] * a.clamp(-1, 1)[..., None]
        + ROW_AXES[face] * b.clamp(-1, 1)[..., None]
    )


def face_coordinates(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The face (LongTensor ``(...)``) each direction ``points`` ``(..., 3)`` hits, by
    OpenGL's face selection (the axis of largest magnitude; ties are not resolved), and its
    coordinates ``sc``, ``tc`` in ``[−1, 1]`` on that face (column and row direction, pixel
    edges at ±1), in the points' dtype."""
    major = points.abs().argmax(dim=-1)
    positive = points.gather(-1, major[..., None])[..., 0] > 0
    face = 2 * major + (~positive).long()
    scale = points.abs().amax(dim=-1)
    sc = (points * COLUMN_AXES.to(points)[face]).sum(-1) / scale
    tc = (points * ROW_AXES.to(points)[face]).sum(-1) / scale
    return face, sc, tc


def point_cells(points: torch.Tensor, face_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(face, row, col)`` cells (LongTensors) of an ``N × N`` cube map that contain
    directions ``points`` ``(..., 3)`` (:func:`face_coordinates`; give points off the cube's
    edges, such as cell centres)."""
    face, sc, tc = face_coordinates(points)
    col = torch.round((sc + 1) * face_size / 2 - 0.5).long().clamp(0, face_size - 1)
    row = torch.round((tc + 1) * face_size / 2 - 0.5).long().clamp(0, face_size - 1)
    return face, row, col


def unfold_cells(
    face: int, rows: torch.Tensor, cols: torch.Tensor, face_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where cells ``(rows, cols)`` of ``face``'s grid (possibly past one of its edges) lie
    on the cube: ``(faces, rows, cols)`` LongTensors of the same shape. Inside the face it
    is the identity; past an edge it continues on the neighbouring face, so a window that
    straddles an edge sees both faces joined as on the cube."""
    return point_cells(cell_points(face, rows, cols, face_size), face_size)


def padded_face_index(
    face: int, face_size: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cells of ``face`` grown by ``pad`` on every side, taken from the neighbours (gather
    indices ``(N + 2p, N + 2p)``). The corner squares, which the cube cannot fill (three faces
    meet there), repeat the nearest row of the side neighbours."""
    grid = torch.arange(-pad, face_size + pad)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    corner = ((rows < 0) | (rows >= face_size)) & ((cols < 0) | (cols >= face_size))
    rows = torch.where(corner, rows.clamp(0, face_size - 1), rows)
    return unfold_cells(face, rows, cols, face_size)


def blend_padded_faces(pixels: torch.Tensor, pad_px: int) -> torch.Tensor:
    """Fuse six faces decoded with a border of ``pad_px`` from their neighbours
    ``(6, C, P + 2q, P + 2q)`` into seamless faces ``(6, C, P, P)``.

    Every pixel is the weighted mean of all decodes that contain it (its own face and the
    borders of its neighbours), with weights falling linearly from 1 at ``q`` pixels inside
    a face to 0 at the outer border: on both sides of an edge the two decodes mix about
    half and half, so the result is continuous even where the decoder is not
    rotation-equivariant (faces meet rotated by 90° or 180°).
    """
    count, channels, padded, _ = pixels.shape
    size = padded - 2 * pad_px
    if count != 6 or size < 1:
        raise ConfigError(f"pixels must be (6, C, P + 2*{pad_px}, same), got {tuple(pixels.shape)}")
    if pad_px == 0:
        return pixels
    coords = torch.arange(-pad_px, size + pad_px)
    ramp = ((torch.minimum(coords + pad_px, size + pad_px - 1 - coords) + 0.5) / (2 * pad_px)).clamp(max=1)
    outside = (coords < 0) | (coords >= size)
    weight = ramp[:, None] * ramp[None, :] * ~(outside[:, None] & outside[None, :])  # no corners
    weight = weight.to(pixels.dtype)
    total = pixels.new_zeros(6, size, size, channels)
    weights = pixels.new_zeros(6, size, size, 1)
    for face in range(6):
        index = tuple(i.to(pixels.device) for i in padded_face_index(face, size, pad_px))
        total.index_put_(index, (pixels[face] * weight).permute(1, 2, 0), accumulate=True)
        weights.index_put_(index, weight[..., None], accumulate=True)
    return (total / weights).permute(0, 3, 1, 2)


def face_directions(face_size: int) -> torch.Tensor:
    """Points ``(6, N, N, 3)`` on the cube ``max |·| = 1`` (directions, not unit) of the cell
    centres of six ``N × N`` faces, in this module's order and orientation."""
    grid = torch.arange(face_size)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    return torch.stack([cell_points(face, rows, cols, face_size) for face in range(6)])


def decode_padded_faces(canvas: torch.Tensor, decode: DecodeFn, pad_latent: int, scale: int) -> torch.Tensor:
    """Decode six faces ``(6, C, N, N)`` without seams along the cube's edges: each face
    grown by ``min(pad_latent, N)`` cells of its neighbours (:func:`padded_face_index`), the
    six stacked into one tall image and decoded at once (so the decoder's normalisation
    statistics are shared, as for one image), the overlapping borders fused by
    :func:`blend_padded_faces`. ``decode`` maps latents ``(1, C, h, w)`` to pixels
    ``(1, 3, scale*h, scale*w)``; returns ``(6, 3, scale*N, scale*N)``."""
    size = canvas.shape[-1]
    pad = min(pad_latent, size)
    padded = []
    for face in range(6):
        faces, rows, cols = (i.to(canvas.device) for i in padded_face_index(face, size, pad))
        padded.append(canvas[faces, :, rows, cols].permute(2, 0, 1))
    tall = decode(torch.cat(padded, dim=1)[None])[0]  # (3, 6 * f * (N + 2p), f * (N + 2p))
    return blend_padded_faces(torch.stack(tall.chunk(6, dim=1)), pad * scale)


def edge_pairs(face_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each face and each of its four sides, the cells along that side ``(face, row,
    col)`` and their neighbours just across it on the adjoining face. 24 pairs of index
    triples (each of the 12 cube edges seen from both sides)."""
    n = face_size
    line, last = torch.arange(n), torch.full((n,), n - 1)
    sides = {  # inside cells along the side, and the cells one step outward
        "top": ((torch.zeros(n, dtype=torch.long), line), (torch.full((n,), -1), line)),
        "bottom": ((last, line), (torch.full((n,), n), line)),
        "left": ((line, torch.zeros(n, dtype=torch.long)), (line, torch.full((n,), -1))),
        "right": ((line, last), (line, torch.full((n,), n))),
    }
    pairs = []
    for face in range(6):
        for (rows, cols), (out_rows, out_cols) in sides.values():
            inside = (torch.full((n,), face), rows, cols)
            pairs.append((torch.stack(inside), torch.stack(unfold_cells(face, out_rows, out_cols, n))))
    return pairs


def cube_seam_ratio(pixels: torch.Tensor) -> float:
    """How visible the cube's edges are in faces ``(6, C, P, P)``: the mean absolute
    difference between pixels that meet across the 12 edges, over the median of the same
    difference between neighbouring pixels inside the faces. About 1: edges look like any
    other pixel boundary; well above 1: visible seams."""
    if pixels.ndim != 4 or pixels.shape[0] != 6 or pixels.shape[-1] != pixels.shape[-2]:
        raise ConfigError(f"pixels must be (6, C, P, P) cube faces, got {tuple(pixels.shape)}")
    pixels = pixels.detach().float().cpu()
    across = []
    for inside, outside in edge_pairs(pixels.shape[-1]):
        a = pixels[inside[0], :, inside[1], inside[2]]
        b = pixels[outside[0], :, outside[1], outside[2]]
        across.append((a - b).abs().mean())
    columns = (pixels[..., 1:] - pixels[..., :-1]).abs().mean(dim=(0, 1, 2))
    rows = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    reference = float(torch.cat([columns, rows]).median())
    return float(torch.stack(across).mean()) / reference if reference else float("inf")

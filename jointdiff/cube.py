"""The six faces of a cube, their orientation and how they join: for cube textures, skyboxes
and cubemaps.

Face order and orientation follow the cube-map convention shared by OpenGL (4.6 spec,
Table 8.19 "Selection of cube map images"), Vulkan, Direct3D and the KTX/DDS formats:

======  =====  ======  ======  ==================================
index   face   sc      tc      looking from the centre toward
======  =====  ======  ======  ==================================
0       +X     −z      −y      +x (right)
1       −X     +z      −y      −x (left)
2       +Y     +x      +z      +y (up)
3       −Y     +x      −z      −y (down)
4       +Z     +x      −y      +z (front in that convention)
5       −Z     −x      −y      −z (back)
======  =====  ======  ======  ==================================

For a direction ``r = (x, y, z)`` whose largest-magnitude component is ``m`` (the face),
``s = (sc / |m| + 1) / 2`` runs along a face image's columns (left → right) and
``t = (tc / |m| + 1) / 2`` along its rows, top row first (as PNG, KTX and DDS store it):
cell ``(row, col)`` of an ``N × N`` face has its centre at ``s = (col + ½) / N``,
``t = (row + ½) / N``. Faces are tensors ``(6, C, N, N)`` in this order.

A horizontal-cross layout (:func:`cross_layout`) shows how the faces unfold without any
rotation in this convention::

          +Y
    −X    +Z    +X    −Z
          −Y
"""

from __future__ import annotations

import torch
from PIL import Image

from .errors import ConfigError

FACE_NAMES = ("+x", "-x", "+y", "-y", "+z", "-z")
# Outward normal, and the 3D directions of increasing column (sc) and increasing row (tc).
NORMALS = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float64)
COLUMN_AXES = torch.tensor([[0, 0, -1], [0, 0, 1], [1, 0, 0], [1, 0, 0], [1, 0, 0], [-1, 0, 0]], dtype=torch.float64)
ROW_AXES = torch.tensor([[0, -1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1], [0, -1, 0], [0, -1, 0]], dtype=torch.float64)
# (row, column) of each face in the 3 × 4 horizontal cross.
CROSS_CELLS = {0: (1, 2), 1: (1, 0), 2: (0, 1), 3: (2, 1), 4: (1, 1), 5: (1, 3)}


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


def point_cells(points: torch.Tensor, face_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(face, row, col)`` cells (LongTensors) of an ``N × N`` cube map that contain
    directions ``points`` ``(..., 3)`` (OpenGL's face selection; ties are not resolved, so
    give points off the cube's edges, such as cell centres)."""
    major = points.abs().argmax(dim=-1)
    positive = points.gather(-1, major[..., None])[..., 0] > 0
    face = 2 * major + (~positive).long()
    scale = points.abs().amax(dim=-1)
    sc = (points * COLUMN_AXES[face]).sum(-1) / scale
    tc = (points * ROW_AXES[face]).sum(-1) / scale
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


def cross_layout(faces: list[Image.Image]) -> Image.Image:
    """The six faces (this module's order) in a 3 × 4 horizontal cross; empty cells black."""
    if len(faces) != 6:
        raise ConfigError(f"cross_layout needs 6 faces, got {len(faces)}")
    size = faces[0].width
    if any(face.size != (size, size) for face in faces):
        raise ConfigError(f"cube faces must be square and of one size, got {[f.size for f in faces]}")
    cross = Image.new("RGB", (4 * size, 3 * size))
    for index, (row, col) in CROSS_CELLS.items():
        cross.paste(faces[index].convert("RGB"), (col * size, row * size))
    return cross


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

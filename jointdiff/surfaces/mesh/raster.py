"""Per-pixel maps of a mesh seen by a camera, computed by ray casting once per job.

Ray casting is trimesh's (``mesh.ray``): Intel Embree through ``embreex`` when it is
installed, else trimesh's pure numpy caster (``backend = "triangle"``). A ray per pixel
centre is the same sampling a z-buffer rasterizer does, the libraries are well kept, and
they run anywhere numpy runs; the maps are computed once per job on the CPU and moved to the
job's device (CUDA or not) as torch tensors, so nothing per step depends on them.

Conventions: views are ``(h, w)`` with row 0 at the top (:mod:`~jointdiff.surfaces.mesh.cameras`);
``depth`` is the distance along the view axis (world units, 0 where no face); ``normal`` is the
geometric face normal in world space (the winding's side, not flipped toward the camera);
``cos`` is the cosine between the normal and the direction to the camera (negative on back
faces); ``uv`` uses OBJ's convention (``v = 0`` at the bottom of the texture image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import trimesh

from jointdiff.surfaces.mesh.asset import MeshAsset
from jointdiff.surfaces.mesh.cameras import Camera, camera_rays, project

Backend = Literal["auto", "embree", "triangle"]


@dataclass
class ViewMaps:
    """The maps of one ``size × size`` view; ``face == -1`` where no face is hit."""

    face: np.ndarray  # (h, w) int64
    barycentric: np.ndarray  # (h, w, 3)
    uv: np.ndarray  # (h, w, 2)
    sheet: np.ndarray  # (h, w) int64, -1 where no face
    depth: np.ndarray  # (h, w)
    normal: np.ndarray  # (h, w, 3)
    cos: np.ndarray  # (h, w)

    @property
    def mask(self) -> np.ndarray:
        return self.face >= 0


def has_embree() -> bool:
    """Whether trimesh can cast rays with Embree (``embreex`` installed)."""
    try:
        import embreex  # noqa: F401

        return True
    except ImportError:
        return False


def intersector(mesh: trimesh.Trimesh, backend: Backend = "auto"):
    """trimesh's ray intersector for ``mesh``: Embree (``"embree"``, or ``"auto"`` when
    available) or the pure numpy one (``"triangle"``)."""
    if backend == "embree" or (backend == "auto" and has_embree()):
        from trimesh.ray import ray_pyembree

        return ray_pyembree.RayMeshIntersector(mesh)
    from trimesh.ray import ray_triangle

    return ray_triangle.RayMeshIntersector(mesh)


def scene_mesh(asset: MeshAsset) -> trimesh.Trimesh:
    """The asset's triangles as a trimesh (no processing: face ids stay the asset's)."""
    return trimesh.Trimesh(asset.vertices, asset.faces, process=False, validate=False)


def rasterize(asset: MeshAsset, camera: Camera, size: int, backend: Backend = "auto",
              caster=None) -> ViewMaps:
    """The maps (:class:`ViewMaps`) of ``asset`` seen by ``camera`` at ``size × size`` pixels:
    the first face hit by the ray through each pixel centre. ``caster``: a ready
    :func:`intersector` to reuse across views."""
    mesh = scene_mesh(asset) if caster is None else None
    caster = caster if caster is not None else intersector(mesh, backend)
    origins, directions = camera_rays(camera, size)
    face = np.full(size * size, -1, dtype=np.int64)
    hits = caster.intersects_first(origins, directions)
    face[:] = hits
    hit = face >= 0
    triangles = asset.vertices[asset.faces[face[hit]]]
    # Exact hit points from the ray and the face's plane (Embree works in float32).
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    o, d = origins[hit], directions[hit]
    distance = np.einsum("ij,ij->i", triangles[:, 0] - o, normals) / np.einsum("ij,ij->i", d, normals)
    points = o + distance[:, None] * d
    return _maps(asset, camera, size, face, hit, triangles, normals, points, d)


def _maps(asset, camera, size, face, hit, triangles, normals, points, directions) -> ViewMaps:
    count = size * size
    bary = np.zeros((count, 3))
    bary[hit] = trimesh.triangles.points_to_barycentric(triangles, points)
    uv = np.zeros((count, 2))
    uv[hit] = np.einsum("nk,nkc->nc", bary[hit], asset.corner_uv[face[hit]])
    depth = np.zeros(count)
    depth[hit] = project(camera, points)[1]
    normal = np.zeros((count, 3))
    normal[hit] = normals
    cos = np.zeros(count)
    cos[hit] = -np.einsum("ij,ij->i", normals, directions)
    sheet = np.full(count, -1, dtype=np.int64)
    sheet[hit] = asset.face_sheet[face[hit]]
    shape = (size, size)
    return ViewMaps(face.reshape(shape), bary.reshape(*shape, 3), uv.reshape(*shape, 2), sheet.reshape(shape),
                    depth.reshape(shape), normal.reshape(*shape, 3), cos.reshape(shape))


def rasterize_views(asset: MeshAsset, cameras: list[Camera], size: int, backend: Backend = "auto") -> list[ViewMaps]:
    """:func:`rasterize` for every camera, sharing one intersector."""
    caster = intersector(scene_mesh(asset), backend)
    return [rasterize(asset, camera, size, backend, caster) for camera in cameras]


@dataclass
class TexelMaps:
    """Where every texel of a sheet lies on the surface: ``face`` ``(H, W)`` (-1: in no UV
    island), the 3D ``point`` ``(H, W, 3)`` and the face ``normal`` ``(H, W, 3)``."""

    face: np.ndarray
    point: np.ndarray
    normal: np.ndarray


def rasterize_uv(asset: MeshAsset, sheet: int, size: tuple[int, int], backend: Backend = "auto") -> TexelMaps:
    """The surface point under every texel centre of sheet ``sheet``'s texture of ``size =
    (H, W)`` (row 0 at the top, i.e. ``v = 1``), by casting rays at the UV layout laid flat."""
    height, width = size
    chosen = np.flatnonzero(asset.face_sheet == sheet)
    flat_vertices = np.concatenate([asset.corner_uv[chosen].reshape(-1, 2), np.zeros((3 * len(chosen), 1))], axis=1)
    flat = trimesh.Trimesh(flat_vertices, np.arange(3 * len(chosen)).reshape(-1, 3), process=False, validate=False)
    u = (np.arange(width) + 0.5) / width
    v = 1 - (np.arange(height) + 0.5) / height
    origins = np.stack([np.tile(u, height), np.repeat(v, width), np.ones(height * width)], axis=1)
    directions = np.broadcast_to([0.0, 0.0, -1.0], origins.shape)
    # Texels exactly on a UV edge may be missed in float32 (Embree); they are filled like unseen ones.
    local = intersector(flat, backend).intersects_first(origins, directions)
    face = np.where(local >= 0, chosen[np.maximum(local, 0)], -1)
    hit = face >= 0
    point = np.zeros((height * width, 3))
    normal = np.zeros((height * width, 3))
    corners = asset.corner_uv[face[hit]]
    bary = trimesh.triangles.points_to_barycentric(np.concatenate([corners, np.zeros((*corners.shape[:2], 1))], 2),
                                                  np.concatenate([origins[hit, :2], np.zeros((hit.sum(), 1))], 1))
    triangles = asset.vertices[asset.faces[face[hit]]]
    point[hit] = np.einsum("nk,nkc->nc", bary, triangles)
    n = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    normal[hit] = n / np.linalg.norm(n, axis=1, keepdims=True)
    return TexelMaps(face.reshape(height, width), point.reshape(height, width, 3), normal.reshape(height, width, 3))

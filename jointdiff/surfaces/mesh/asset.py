"""Loading a mesh for texturing: triangles, per-corner UVs and one texture sheet per material.

Read with trimesh (OBJ + MTL, glTF/GLB, PLY, and whatever else it reads). A mesh without UVs
is unwrapped with xatlas (one atlas per material). By default the mesh is centred on its
bounding-box centre and scaled so that it fits the unit sphere (``normalize``); exports use
the mesh's own frame again (:attr:`MeshAsset.to_source`).

Conventions: vertices ``(V, 3)`` float64 in the frame the cameras see (y up);
``corner_uv`` ``(F, 3, 2)`` per face corner, OBJ/OpenGL convention (``v = 0`` at the
*bottom* of the texture image); ``face_sheet`` ``(F,)`` the material (canvas sheet) of
every face. Bad meshes raise :class:`~jointdiff.utils.errors.ConfigError` in one line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trimesh

from jointdiff.utils.errors import ConfigError

DEGENERATE_AREA = 1e-12
"""Faces with an area below this fraction of the bounding box's squared diagonal count as degenerate."""


@dataclass
class MeshAsset:
    """A mesh ready for texturing (see the module docstring for conventions)."""

    vertices: np.ndarray
    faces: np.ndarray
    corner_uv: np.ndarray
    face_sheet: np.ndarray
    sheet_names: list[str]
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    scale: float = 1.0
    unwrapped: bool = False

    @property
    def num_sheets(self) -> int:
        return len(self.sheet_names)

    def to_source(self, points: np.ndarray) -> np.ndarray:
        """Points ``(..., 3)`` of the camera frame back in the file's own frame."""
        return points / self.scale + self.centre

    def sheet_mesh(self, sheet: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(vertices (3F', 3), faces (F', 3), uv (3F', 2))`` of one sheet's faces, one vertex
        per face corner (in the camera frame), for export."""
        chosen = np.flatnonzero(self.face_sheet == sheet)
        vertices = self.vertices[self.faces[chosen]].reshape(-1, 3)
        uv = self.corner_uv[chosen].reshape(-1, 2)
        return vertices, np.arange(len(vertices)).reshape(-1, 3), uv


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (jobs record it so that a rerun uses the same mesh)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def load_mesh_cached(path: str, sha256: str, normalize: bool, max_faces: int) -> MeshAsset:
    """:func:`load_mesh`, kept for the last few files by content (``sha256``): a job builds
    its geometry when it is validated and again when it runs, and unwrapping a large mesh
    takes seconds. The asset is shared: callers must not modify it."""
    return load_mesh(path, normalize, max_faces)


MTL_OPTION_ARITY = {"-blendu": 1, "-blendv": 1, "-bm": 1, "-boost": 1, "-cc": 1, "-clamp": 1, "-imfchan": 1,
                    "-mm": 2, "-o": 3, "-s": 3, "-t": 3, "-texres": 1, "-type": 1}
"""Options of an MTL texture statement and their most values (``-o``, ``-s``, ``-t``: u [v [w]])."""


def mtl_texture_file(arguments: str) -> str:
    """The file named by an MTL texture statement's arguments (``-s 1 1 1 -o 0.5 0.5 0 tex.png``
    gives ``tex.png``): known options and their values are skipped (a variable-length option
    takes the numbers that follow it), backslashes become ``/``; what is left is the file."""
    tokens = arguments.split()
    index = 0
    while index < len(tokens) and tokens[index].lower() in MTL_OPTION_ARITY:
        most = MTL_OPTION_ARITY[tokens[index].lower()]
        index += 1
        if most == 1:
            index += 1
            continue
        taken = 0
        while taken < most and index < len(tokens) - 1 and _is_number(tokens[index]):
            index, taken = index + 1, taken + 1
    return " ".join(tokens[index:]).replace("\\", "/")


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def check_references(path: Path) -> None:
    """ConfigError when an OBJ's MTL or an MTL's / glTF's texture files are missing."""
    suffix = path.suffix.lower()
    missing: list[str] = []
    if suffix == ".obj":
        text = path.read_text(errors="replace")
        for mtl in re.findall(r"^\s*mtllib\s+(.+?)\s*$", text, flags=re.M):
            mtl_path = path.parent / mtl
            if not mtl_path.is_file():
                missing.append(mtl)
                continue
            statement = r"^\s*(?:map_\w+|bump|disp|decal|refl)\s+(.+?)\s*$"
            maps = re.findall(statement, mtl_path.read_text(errors="replace"), flags=re.M)
            names = [mtl_texture_file(arguments) for arguments in maps]
            missing += [name for name in names if name and not (mtl_path.parent / name).is_file()]
    elif suffix == ".gltf":
        document = json.loads(path.read_text())
        uris = [item.get("uri") for key in ("images", "buffers") for item in document.get(key, [])]
        names = [urllib.parse.unquote(uri).replace("\\", "/") for uri in uris if uri and not uri.startswith("data:")]
        missing += [name for name in names if not (path.parent / name).is_file()]
    if missing:
        raise ConfigError(f"mesh: path = {str(path)!r} references files that are missing: {', '.join(missing)}")


def load_mesh(path: str | os.PathLike, normalize: bool = True, max_faces: int = 500_000) -> MeshAsset:
    """Read, check and (when it has no UVs) unwrap the mesh at ``path``; one sheet per
    material. ConfigError (one line) for a missing or unreadable file, missing referenced
    files, no faces, only degenerate faces, more than ``max_faces`` faces, or a failed unwrap."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"mesh: path = {str(path)!r} is not a file")
    check_references(path)
    try:
        loaded = trimesh.load(str(path), process=False)
    except Exception as error:  # trimesh raises many kinds for unreadable files
        raise ConfigError(f"mesh: path = {str(path)!r} could not be read as a mesh: {error}") from None
    parts = _parts(loaded, path)
    count = sum(len(part.faces) for part in parts)
    if count > max_faces:
        raise ConfigError(f"mesh: path = {str(path)!r} has {count} faces, over max_faces = {max_faces}")
    return assemble(parts, normalize, str(path))


def _parts(loaded, path: Path) -> list[trimesh.Trimesh]:
    """The triangle meshes of a loaded file, world transforms applied, one per material."""
    if isinstance(loaded, trimesh.Scene):
        parts = [g for g in loaded.dump(concatenate=False) if isinstance(g, trimesh.Trimesh)]
    elif isinstance(loaded, trimesh.Trimesh):
        parts = [loaded]
    else:
        parts = []
    if not parts or sum(len(p.faces) for p in parts) == 0:
        raise ConfigError(f"mesh: path = {str(path)!r} has no faces (a point cloud or an empty file)")
    return _merge_by_material(parts)


def _merge_by_material(parts: list[trimesh.Trimesh]) -> list[trimesh.Trimesh]:
    """Parts that share a material (by name; unnamed: the part's node name) become one
    sheet, in order of first appearance."""
    groups: dict[str, list[trimesh.Trimesh]] = {}
    for index, part in enumerate(parts):
        material = getattr(getattr(part, "visual", None), "material", None)
        name = getattr(material, "name", None) or part.metadata.get("name") or f"material_{index}"
        groups.setdefault(str(name), []).append(part)
    merged = []
    for name, group in groups.items():
        mesh = group[0] if len(group) == 1 else trimesh.util.concatenate(group)
        mesh.metadata["sheet_name"] = name
        merged.append(mesh)
    return merged


def _uv_of(part: trimesh.Trimesh) -> np.ndarray | None:
    uv = getattr(getattr(part, "visual", None), "uv", None)
    if uv is None or len(uv) != len(part.vertices):
        return None
    uv = np.asarray(uv, dtype=np.float64)
    return uv if np.isfinite(uv).all() else None


def unwrap(vertices: np.ndarray, faces: np.ndarray, where: str) -> np.ndarray:
    """Per-corner UVs ``(F, 3, 2)`` from xatlas (``v = 0`` at the bottom); ConfigError when it fails."""
    import xatlas

    try:
        vmapping, indices, uvs = xatlas.parametrize(vertices.astype(np.float32), faces.astype(np.uint32))
    except Exception as error:
        raise ConfigError(f"mesh: path = {where!r}: UV unwrapping with xatlas failed: {error}") from None
    if len(indices) != len(faces) or not np.isfinite(uvs).all():
        raise ConfigError(f"mesh: path = {where!r}: UV unwrapping with xatlas failed ({len(indices)} of {len(faces)} faces)")
    del vmapping  # xatlas keeps face order, so corner UVs line up with ``faces``
    return np.asarray(uvs, dtype=np.float64)[indices]


UV_TOLERANCE = 1e-4
"""How far outside ``[0, 1]`` a UV may lie (rounding in exporters) before the mesh is refused."""


def check_uv_range(corner_uv: np.ndarray, where: str) -> None:
    """ConfigError when a UV lies outside ``[0, 1]`` (tiled or UDIM layouts): every material
    is one texture sheet, so a texel outside the unit square has no place in it."""
    low, high = corner_uv.min(axis=(0, 1)), corner_uv.max(axis=(0, 1))
    if (low < -UV_TOLERANCE).any() or (high > 1 + UV_TOLERANCE).any():
        raise ConfigError(f"mesh: path = {where!r} has UVs outside [0, 1] (u in [{low[0]:.4g}, {high[0]:.4g}], "
                          f"v in [{low[1]:.4g}, {high[1]:.4g}]); tiled or UDIM layouts are not supported")


def assemble(parts: list[trimesh.Trimesh], normalize: bool, where: str) -> MeshAsset:
    """One :class:`MeshAsset` from per-material parts: drop degenerate faces, unwrap parts
    without UVs, refuse UVs outside ``[0, 1]``, centre and scale to the unit sphere when ``normalize``."""
    all_vertices = np.concatenate([np.asarray(p.vertices, dtype=np.float64) for p in parts])
    diagonal = float(np.linalg.norm(all_vertices.max(0) - all_vertices.min(0))) if len(all_vertices) else 0.0
    vertices, faces, corner_uv, face_sheet, names, unwrapped = [], [], [], [], [], False
    offset = 0
    for part in parts:
        v, f = np.asarray(part.vertices, dtype=np.float64), np.asarray(part.faces, dtype=np.int64)
        area = np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1) / 2
        f = f[area > DEGENERATE_AREA * max(diagonal, 1e-300) ** 2]
        if not len(f):
            continue
        uv = _uv_of(part)
        corner = uv[f] if uv is not None else unwrap(v, f, where)
        unwrapped |= uv is None
        vertices.append(v)
        faces.append(f + offset)
        corner_uv.append(corner)
        face_sheet.append(np.full(len(f), len(names)))
        names.append(part.metadata.get("sheet_name", f"material_{len(names)}"))
        offset += len(v)
    if not faces:
        raise ConfigError(f"mesh: path = {where!r} has only degenerate (zero-area) faces")
    check_uv_range(np.concatenate(corner_uv), where)
    asset = MeshAsset(np.concatenate(vertices), np.concatenate(faces), np.concatenate(corner_uv),
                      np.concatenate(face_sheet), names, unwrapped=unwrapped)
    return normalized(asset) if normalize else asset


def normalized(asset: MeshAsset) -> MeshAsset:
    """The asset centred on its bounding-box centre and scaled to fit the unit sphere."""
    used = asset.vertices[np.unique(asset.faces)]
    centre = (used.min(0) + used.max(0)) / 2
    radius = float(np.linalg.norm(used - centre, axis=1).max())
    scale = 1.0 / radius if radius > 0 else 1.0
    asset.vertices = (asset.vertices - centre) * scale
    asset.centre, asset.scale = centre, scale
    return asset

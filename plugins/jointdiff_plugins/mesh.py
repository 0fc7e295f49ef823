"""The ``mesh`` geometry: texture a mesh through rendered views of its UV atlas (SyncMVD,
SyncTweedies). The class and its conventions live in :mod:`jointdiff.surfaces.mesh.geometry`;
this module only registers it (and stays light to import: the class imports numpy, torch and
trimesh inside its methods)."""

from __future__ import annotations

from jointdiff.plugin import hookimpl
from jointdiff.surfaces.mesh.geometry import MeshGeometry


@hookimpl
def register_geometries(register):
    register(MeshGeometry)

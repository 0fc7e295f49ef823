"""Meshes as canvases: load a mesh and its UV atlas, render views of it, and move values
between its texture and those views (the ``mesh`` geometry, SyncMVD / SyncTweedies).

Modules: :mod:`~jointdiff.surfaces.mesh.asset` (loading, checks, unwrapping),
:mod:`~jointdiff.surfaces.mesh.cameras` (the camera convention),
:mod:`~jointdiff.surfaces.mesh.raster` (per-pixel maps of a view, by ray casting),
:mod:`~jointdiff.surfaces.mesh.sampling` (texture ↔ views: render, its adjoint, fills, bake),
:mod:`~jointdiff.surfaces.mesh.export` (texture PNGs, GLB, OBJ + MTL, turntable).
Importing this package imports nothing heavy; the modules need numpy, trimesh and torch.
"""

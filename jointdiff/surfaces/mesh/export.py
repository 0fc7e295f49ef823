"""Writing a textured mesh: one texture PNG per material, a GLB (glTF 2.0 binary, the
textures as ``baseColorTexture``), OBJ + MTL, and a turntable preview.

Written with trimesh's exporters. Vertices are written in the mesh file's own frame (the
normalization for the cameras is undone); UVs as loaded, or xatlas's when it was unwrapped.
Textures are ``PIL`` RGB images, row 0 at the top (``v = 1``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from jointdiff.surfaces.mesh.asset import MeshAsset
from jointdiff.surfaces.mesh.cameras import Camera
from jointdiff.surfaces.mesh.raster import Backend, rasterize_views
from jointdiff.surfaces.mesh_viewer import write_mesh_viewer


def texture_file_stems(names: list[str], stem: str) -> list[str]:
    """File stems of the materials' texture PNGs: ``<stem>_mat<i>_<safe>`` with ``<safe>`` the
    material name with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``. The index
    makes them distinct, and the ``mat`` prefix keeps them apart from the other outputs
    (``<stem>_<i>.png``, ``<stem>_turntable.png``) whatever the materials are called."""
    return [f"{stem}_mat{index}_{re.sub(r'[^A-Za-z0-9._-]', '_', name)}" for index, name in enumerate(names)]


def textured_scene(asset: MeshAsset, textures: list[Image.Image], names: list[str] | None = None) -> trimesh.Scene:
    """A scene of one mesh per material, each with its texture as PBR base colour; material
    names are ``names`` (default: the asset's; the OBJ exporter names texture files after them)."""
    names = asset.sheet_names if names is None else names
    scene = trimesh.Scene()
    for sheet, image in enumerate(textures):
        vertices, faces, uv = asset.sheet_mesh(sheet)
        material = trimesh.visual.material.PBRMaterial(name=names[sheet], baseColorTexture=image,
                                                       metallicFactor=0.0, roughnessFactor=1.0)
        visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
        mesh = trimesh.Trimesh(asset.to_source(vertices), faces, visual=visual, process=False)
        scene.add_geometry(mesh, geom_name=asset.sheet_names[sheet])
    return scene


def export_textured(asset: MeshAsset, textures: list[Image.Image], stem: str | Path) -> dict[str, Path]:
    """Write ``<stem>.glb``, ``<stem>.obj`` (+ ``<stem>.mtl`` and the texture PNGs it names,
    ``<stem>_mat<i>_<material>.png``, see :func:`texture_file_stems`) and the offline viewer
    page ``<stem>.html`` of the GLB
    (:mod:`jointdiff.surfaces.mesh_viewer`). Returns the paths by kind."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    scene = textured_scene(asset, textures)
    paths["glb"] = stem.with_suffix(".glb")
    paths["glb"].write_bytes(scene.export(file_type="glb"))
    paths["obj"] = stem.with_suffix(".obj")
    obj_scene = textured_scene(asset, textures, texture_file_stems(asset.sheet_names, stem.name))
    files = trimesh.exchange.obj.export_obj(obj_scene, include_texture=True, return_texture=True,
                                             mtl_name=stem.with_suffix(".mtl").name)
    text, extras = files
    paths["obj"].write_text(text)
    for name, data in extras.items():
        if name != paths["obj"].name:
            (stem.parent / name).write_bytes(data)
            paths[name] = stem.parent / name
    paths["page"] = write_mesh_viewer(paths["glb"], stem.with_suffix(".html"), overwrite=True)
    return paths


def turntable(asset: MeshAsset, textures: list[Image.Image], views: int = 8, size: int = 256,
              elevation_deg: float = 15.0, backend: Backend = "auto") -> Image.Image:
    """A row of ``views`` renders (``size`` px each, unlit base colour on white) at
    azimuths evenly spaced from 0°, seen from ``elevation_deg``."""
    cameras = [Camera(elevation_deg, 360.0 * i / views) for i in range(views)]
    arrays = [np.asarray(t.convert("RGB"), dtype=np.float64) / 255 for t in textures]
    tiles = []
    for maps in rasterize_views(asset, cameras, size, backend):
        tile = np.ones((size, size, 3))
        for sheet, texture in enumerate(arrays):
            on = maps.sheet == sheet
            height, width = texture.shape[:2]
            col = np.clip((maps.uv[on, 0] * width).astype(np.int64), 0, width - 1)
            row = np.clip(((1 - maps.uv[on, 1]) * height).astype(np.int64), 0, height - 1)
            tile[on] = texture[row, col]
        tiles.append(tile)
    return Image.fromarray((np.concatenate(tiles, axis=1) * 255).round().astype(np.uint8))

"""Cameras that look at a mesh: the one convention every mesh view uses.

- World axes: ``y`` is up; the camera looks at the origin (the mesh's centre once normalized).
- **Azimuth 0** looks from ``+z`` toward ``−z`` (the front of a glTF asset). Positive azimuth
  turns the camera toward ``+x``: the camera sits at
  ``distance · (cos el · sin az, sin el, cos el · cos az)``.
- **Elevation** positive looks from above. No roll: the image's up is the world's up tilted
  with the camera (at ±90° elevation, azimuth sets which way is up).
- **Field of view** ``fov_deg`` is vertical (views are square, so it is also horizontal).
  Orthographic views see a square of half-side ``ortho_half_height`` world units.
- Pixels: ``(h, w)`` images, row 0 at the **top**, pixel ``(row, col)`` centred at
  ``(col + ½, row + ½)``; normalized ``u = 2 (col + ½) / w − 1`` left to right and
  ``v = 2 (row + ½) / h − 1`` top to bottom (as ``grid_sample(align_corners=False)``).
- Camera frame (normals of ``window_map("normal")``): ``x`` right, ``y`` up, ``z`` toward the
  camera (OpenGL's view space).

The default views are SyncMVD's (Liu et al. 2023): 8 azimuths 45° apart at elevation 0 and
two views from 30° above at azimuths 0° and 180°.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_DISTANCE = 3.0
DEFAULT_FOV_DEG = 40.0
"""At distance 3 a 40° view just holds the unit sphere (it subtends 2 · asin(1/3) ≈ 38.9°)."""


@dataclass(frozen=True)
class Camera:
    """One view: ``elevation_deg``, ``azimuth_deg``, ``distance`` from the origin and a
    vertical ``fov_deg`` (perspective), or ``ortho_half_height`` (orthographic, fov ignored)."""

    elevation_deg: float
    azimuth_deg: float
    distance: float = DEFAULT_DISTANCE
    fov_deg: float = DEFAULT_FOV_DEG
    ortho_half_height: float | None = None

    def axes(self) -> np.ndarray:
        """``(3, 3)`` camera-to-world rotation: columns right, up, backward (toward the camera)."""
        el, az = math.radians(self.elevation_deg), math.radians(self.azimuth_deg)
        backward = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
        right = np.array([math.cos(az), 0.0, -math.sin(az)])
        up = np.cross(backward, right)
        return np.stack([right, up, backward], axis=1)

    @property
    def position(self) -> np.ndarray:
        return self.axes()[:, 2] * self.distance


def default_cameras(distance: float = DEFAULT_DISTANCE, fov_deg: float = DEFAULT_FOV_DEG,
                    ortho_half_height: float | None = None) -> list[Camera]:
    """SyncMVD's ten views: azimuths 0, 45, …, 315° at elevation 0, then (30°, 0°) and (30°, 180°)."""
    angles = [(0.0, 45.0 * i) for i in range(8)] + [(30.0, 0.0), (30.0, 180.0)]
    return [Camera(el, az, distance, fov_deg, ortho_half_height) for el, az in angles]


def pixel_centres(size: int) -> np.ndarray:
    """Normalized centres ``2 (i + ½) / size − 1`` of ``size`` pixels."""
    return (2 * np.arange(size, dtype=np.float64) + 1) / size - 1


def camera_rays(camera: Camera, size: int) -> tuple[np.ndarray, np.ndarray]:
    """World ray origins and unit directions, each ``(size·size, 3)`` in row-major pixel order,
    through the pixel centres of a ``size × size`` view."""
    u = pixel_centres(size)[None, :].repeat(size, 0)
    v = pixel_centres(size)[:, None].repeat(size, 1)
    axes = camera.axes()
    if camera.ortho_half_height is None:
        t = math.tan(math.radians(camera.fov_deg) / 2)
        local = np.stack([u * t, -v * t, -np.ones_like(u)], axis=-1).reshape(-1, 3)
        directions = local @ axes.T
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        origins = np.broadcast_to(camera.position, directions.shape).copy()
    else:
        half = camera.ortho_half_height
        offsets = np.stack([u * half, -v * half, np.zeros_like(u)], axis=-1).reshape(-1, 3) @ axes.T
        origins = camera.position + offsets
        directions = np.broadcast_to(-axes[:, 2], origins.shape).copy()
    return origins, directions


def project(camera: Camera, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalized view coordinates ``(N, 2)`` = ``(u, v)`` of world points ``(N, 3)`` and their
    depth ``(N,)`` along the view axis (distance in front of the camera's plane)."""
    local = (points - camera.position) @ camera.axes()
    depth = -local[:, 2]
    if camera.ortho_half_height is None:
        t = math.tan(math.radians(camera.fov_deg) / 2)
        safe = np.where(depth > 1e-12, depth, 1e-12)
        return np.stack([local[:, 0] / safe / t, -local[:, 1] / safe / t], axis=1), depth
    half = camera.ortho_half_height
    return np.stack([local[:, 0] / half, -local[:, 1] / half], axis=1), depth

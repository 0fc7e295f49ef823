"""Sphere geometries (``equirect``, ``cubemap``) and their math (:mod:`jointdiff.surfaces.spherical`),
checked against py360convert, by round trips, coverage and tiny-model runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import py360convert
import pytest
import torch
from PIL import Image

from jointdiff import JointDiffusion
from jointdiff.core.registry import create
from jointdiff.surfaces import cube, export360, spherical
from jointdiff.utils.errors import ConfigError
from jointdiff_plugins.sphere import CubemapGeometry, EquirectGeometry

FIXTURE = Path(__file__).parent / "fixtures" / "equirect_demo_1024x512.png"


@pytest.fixture(scope="module")
def demo() -> np.ndarray:
    """The demo panorama, ``(512, 1024, 3)`` float32 in [0, 255]."""
    return np.asarray(Image.open(FIXTURE).convert("RGB")).astype(np.float32)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].double()


def to_numpy(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def py360_fov_deg(fov_deg: float, size: int) -> float:
    """py360convert's ``e2p`` puts its outermost samples *on* the FOV's edges
    (``linspace(-tan, tan, size)``); ours are pixel centres, half a pixel inside. This FOV
    makes its samples fall on our pixel centres, so only interpolation differs."""
    return math.degrees(2 * math.atan(math.tan(math.radians(fov_deg) / 2) * (size - 1) / size))


# ----------------------------------------------------------------------------- conventions


def test_equirect_conventions():
    directions = spherical.equirect_directions((4, 8))
    lon, lat = spherical.directions_to_lonlat(directions)
    assert torch.allclose(lon[0], torch.tensor([-157.5, -112.5, -67.5, -22.5, 22.5, 67.5, 112.5, 157.5], dtype=lon.dtype))
    assert torch.allclose(lat[:, 0], torch.tensor([67.5, 22.5, -22.5, -67.5], dtype=lat.dtype))
    east = spherical.lonlat_to_directions(torch.tensor(90.0), torch.tensor(0.0))
    assert torch.allclose(east, torch.tensor([1.0, 0.0, 0.0]), atol=1e-7)  # positive yaw: right


@pytest.mark.parametrize("yaw_deg, pitch_deg", [(0, 0), (30, 20), (-120, -45), (179, 80), (0, 90)])
def test_view_centre_looks_at_yaw_pitch_and_projection_inverts(yaw_deg, pitch_deg):
    centre = spherical.perspective_directions(yaw_deg, pitch_deg, 90.0, (1, 1))[0, 0]
    expected = spherical.lonlat_to_directions(*torch.tensor([yaw_deg, pitch_deg], dtype=torch.float64))
    assert torch.allclose(centre, expected, atol=1e-9)
    rays = spherical.perspective_directions(yaw_deg, pitch_deg, 72.0, (6, 6))
    uv, inside = spherical.project_to_view(rays, yaw_deg, pitch_deg, 72.0)
    centres = spherical.pixel_centres(6)
    assert bool(inside.all())
    assert torch.allclose(uv[..., 0], centres[None, :].expand(6, 6), atol=1e-9)
    assert torch.allclose(uv[..., 1], centres[:, None].expand(6, 6), atol=1e-9)
    _, behind = spherical.project_to_view(-rays, yaw_deg, pitch_deg, 72.0)
    assert not bool(behind.any())


def from_py360(faces: list) -> list:
    """py360convert's faces (F R B L U D) in :mod:`jointdiff.surfaces.cube` order, through the one
    mapping between the two conventions (:data:`jointdiff.surfaces.export360.PY360_ORDER`)."""
    return [faces[export360.PY360_ORDER.index(name)] for name in cube.FACE_NAMES]


def to_py360(faces) -> dict:
    """Our faces (:mod:`jointdiff.surfaces.cube` order) as py360convert's ``dict`` cube format."""
    return {export360.PY360_FACE[name]: face for name, face in zip(cube.FACE_NAMES, faces)}


def test_cube_faces_are_jointdiff_cube_order_and_py360convert_orientation():
    size = 64
    ours = spherical.cube_directions(size)
    assert torch.equal(ours[:, size // 2, size // 2].round(), cube.NORMALS)  # face i looks along normal i
    ours = ours / ours.norm(dim=-1, keepdim=True)
    theirs = torch.from_numpy(np.array(py360convert.utils.xyzcube(size))).double()  # (N, 6N, 3), F R B L U D
    theirs = torch.stack(from_py360(theirs.chunk(6, dim=1)))
    theirs = theirs / theirs.norm(dim=-1, keepdim=True)
    # Their samples sit on the face edges, ours at pixel centres: at most ~1/N apart.
    assert float((ours - theirs).norm(dim=-1).max()) < 1.5 / size


def test_directions_to_cube_inverts_cube_directions():
    face, uv = spherical.directions_to_cube(spherical.cube_directions(8))
    centres = spherical.pixel_centres(8)
    assert torch.equal(face, torch.arange(6)[:, None, None].expand(6, 8, 8))
    assert torch.allclose(uv[..., 0], centres[None, None, :].expand(6, 8, 8))
    assert torch.allclose(uv[..., 1], centres[None, :, None].expand(6, 8, 8))


# ----------------------------------------------------------------------------- against py360convert

COVER = [(yaw, pitch) for pitch in (-90, -60, -30, 0, 30, 60, 90) for yaw in range(-180, 180, 30)]


@pytest.mark.parametrize(
    "fov_deg, yaw_deg, pitch_deg",
    [(90, 0, 0), (60, 30, 20), (90, -120, -45), (72, 175, 10), (100, 40, 85)],
)
def test_extract_matches_py360convert_e2p(demo, fov_deg, yaw_deg, pitch_deg):
    # py360convert: u_deg > 0 looks right (east) and v_deg > 0 up, as our yaw and pitch.
    geometry = EquirectGeometry(width_px=1024, window_latent=32, fov_deg=fov_deg, views_deg=[(yaw_deg, pitch_deg), *COVER])
    geometry.setup(8)
    view = geometry.extract(to_tensor(demo), [0])[0]  # a pixel-space canvas: 8× the latent size
    size = view.shape[-1]
    assert size == 256
    reference = py360convert.e2p(demo, py360_fov_deg(fov_deg, size), yaw_deg, pitch_deg, (size, size))
    assert np.abs(to_numpy(view) - reference).mean() < 0.1  # of 255: interpolation only
    mirrored = py360convert.e2p(demo, py360_fov_deg(fov_deg, size), -yaw_deg, -pitch_deg, (size, size))
    if (yaw_deg, pitch_deg) != (0, 0):
        assert np.abs(to_numpy(view) - mirrored).mean() > 5


def equirect_to_cube(image: torch.Tensor, face_size: int) -> torch.Tensor:
    directions = spherical.cube_directions(face_size)
    grid = spherical.equirect_grid(spherical.directions_to_equirect_uv(directions), tuple(image.shape[-2:]))
    return spherical.sample(spherical.pad_equirect(image), grid)


def cube_to_equirect(faces: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    face, uv = spherical.directions_to_cube(spherical.equirect_directions(size)[None])
    return spherical.sample(spherical.pad_cube(faces), spherical.cube_grid(face, uv, faces.shape[-1]))


def test_cube_equirect_conversions_match_py360convert(demo):
    faces = equirect_to_cube(to_tensor(demo), 256)
    reference = from_py360(py360convert.e2c(demo, face_w=256, cube_format="list"))
    # Same faces and orientation; py360convert samples face edges, we pixel centres.
    per_face = [np.abs(to_numpy(faces[i]) - reference[i]).mean() for i in range(6)]
    assert max(per_face) < 1.5
    back = cube_to_equirect(faces, (512, 1024))[0]
    reference_back = py360convert.c2e(to_py360(to_numpy(f) for f in faces), 512, 1024, cube_format="dict")
    assert np.abs(to_numpy(back) - reference_back).mean() < 1.5


def test_sphere_sampling_and_exports_share_the_face_convention(demo):
    # The cube faces of jointdiff.surfaces.spherical (the cubemap geometry's canvas) are the faces
    # export360 writes: same order, names and orientation.
    faces = equirect_to_cube(to_tensor(demo), 256)
    exported = export360.equirect_to_faces(Image.fromarray(demo.astype(np.uint8)), face_size_px=256)
    assert list(exported) == list(cube.FACE_NAMES)
    for face, name in zip(faces, cube.FACE_NAMES):  # a mirrored face errs by 2.4 or more, a swapped one by ~57
        assert np.abs(to_numpy(face) - np.asarray(exported[name], np.float32)).mean() < 1.5, name


def test_cube_equirect_round_trip(demo):
    image = to_tensor(demo)
    ours = np.abs(to_numpy(cube_to_equirect(equirect_to_cube(image, 256), (512, 1024))[0]) - demo).mean()
    theirs = np.abs(py360convert.c2e(py360convert.e2c(demo, 256), 512, 1024) - demo).mean()
    assert ours < 1.0 and ours <= theirs  # mean abs error of 255, bilinear both ways


def test_cubemap_face_views_are_the_faces_exactly():
    geometry = CubemapGeometry(face_px=256, window_latent=32)
    geometry.setup(8)
    centres = torch.stack([spherical.lonlat_to_directions(*torch.tensor(v, dtype=torch.float64)) for v in geometry.views_deg[:6]])
    seen = cube.face_coordinates(centres)[0].tolist()
    assert seen == [4, 0, 5, 1, 2, 3]  # +Z, +X, −Z, −X (the horizon ring), then +Y, −Y
    faces = torch.randn(6, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(geometry.extract(faces, range(6)), faces[seen], atol=2e-3)  # pixel scale, k = 8; float32 grids
    latent = torch.randn(6, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(geometry.extract(latent, [4, 5]), latent[2:4], atol=2e-4)


def test_fusion_round_trip_of_a_smooth_canvas():
    geometry = EquirectGeometry()
    geometry.setup(8)
    canvas = geometry.smooth_test_canvas(4)
    numerator, denominator = torch.zeros_like(canvas), torch.zeros(1, 1, *canvas.shape[-2:])
    ids = list(range(geometry.num_windows))
    weights = geometry.window_weights(ids)
    geometry.insert(numerator, geometry.extract(canvas, ids) * weights, ids)
    geometry.insert(denominator, weights, ids)
    assert float((numerator / denominator - canvas).abs().max()) < 0.02
    assert float((numerator / denominator - canvas.roll(1, -1)).abs().max()) > 0.05


# ----------------------------------------------------------------------------- coverage and options


def weight_sum(geometry) -> torch.Tensor:
    sheets, height, width = geometry.canvas_shape_latent
    total = torch.zeros(sheets, 1, height, width)
    ids = list(range(geometry.num_windows))
    geometry.insert(total, geometry.window_weights(ids), ids)
    return total


@pytest.mark.parametrize("geometry", [EquirectGeometry(), CubemapGeometry()], ids=["equirect", "cubemap"])
def test_default_layouts_cover_every_cell_poles_included(geometry):
    geometry.setup(8)
    total = weight_sum(geometry)
    assert bool((total > 0).all())
    if geometry.name == "equirect":
        assert float(total[..., 0, :].min()) > 0.1 and float(total[..., -1, :].min()) > 0.1


def test_noise_fused_by_interpolation_loses_variance():
    # Why x0 fusion: averaging resampled noise (latent fusion) shrinks its variance.
    geometry = EquirectGeometry(width_px=1024)
    geometry.setup(8)
    noise = torch.randn(1, 4, 64, 128, generator=torch.Generator().manual_seed(0))
    numerator, ids = torch.zeros_like(noise), list(range(geometry.num_windows))
    weights = geometry.window_weights(ids)
    geometry.insert(numerator, geometry.extract(noise, ids) * weights, ids)
    assert float((numerator / weight_sum(geometry)).var()) < 0.7


def test_layouts_that_leave_holes_are_refused():
    with pytest.raises(ConfigError, match="uncovered.*pitch"):
        EquirectGeometry(rings=[(0.0, 8)]).setup(8)
    with pytest.raises(ConfigError, match="uncovered"):
        CubemapGeometry(fov_deg=60, edge_views=False, corner_views=False).setup(8)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="width_px = 1000"):
        EquirectGeometry(width_px=1000).setup(8)
    with pytest.raises(ConfigError, match="face_px = 100"):
        CubemapGeometry(face_px=100).setup(8)
    with pytest.raises(ValueError, match="pitch_deg"):
        EquirectGeometry(rings=[(100.0, 4)])
    with pytest.raises(ValueError, match="fov_deg"):
        CubemapGeometry(fov_deg=180)


def test_registered_with_preferred_fusion():
    for name in ("equirect", "cubemap"):
        geometry = create("geometry", name)
        assert geometry.preferred_fusion == "x0"


# ----------------------------------------------------------------------------- tiny-model runs

SMALL = {
    "equirect": lambda: EquirectGeometry(width_px=1024, window_latent=32, fov_deg=100, rings=[(0, 4), (90, 1), (-90, 1)]),
    "cubemap": lambda: CubemapGeometry(face_px=256, window_latent=32, corner_views=False),
    "cube_faces": lambda: CubemapGeometry(face_px=256, window_latent=32, edge_views=False, corner_views=False),
}


def run(pipeline, name, fusion, synchronizer=None, output_type="latent"):
    text = create("conditioner", "text", prompt="a blue sky with clouds", guidance_scale=7.5)
    job = JointDiffusion(pipeline, SMALL[name](), [text], synchronizer, fusion=fusion)
    return job(num_inference_steps=2, seed=0, progress=False, output_type=output_type), job


@pytest.mark.parametrize("name", ["equirect", "cubemap"])
def test_tiny_runs_with_both_fusions(tiny_pipeline, name):
    results = {fusion: run(tiny_pipeline, name, fusion)[0] for fusion in ("x0", "latent")}
    shape = (6, 4, 32, 32) if name == "cubemap" else (1, 4, 64, 128)
    for result in results.values():
        assert tuple(result.latents.shape) == shape and bool(torch.isfinite(result.latents).all())
    assert not torch.allclose(results["x0"].latents, results["latent"].latents)
    default = run(tiny_pipeline, name, None)[0]  # the engine follows the geometry's preferred_fusion
    assert torch.equal(default.latents, results["x0"].latents)


@pytest.mark.parametrize("name", ["equirect", "cube_faces"])
def test_tiny_runs_with_syncdiffusion(tiny_pipeline, name):
    sync = create("synchronizer", "syncdiffusion", lpips_random_backbone=True, net="alex", w=20.0, until_step=1)
    synced, _ = run(tiny_pipeline, name, "x0", sync)
    plain, _ = run(tiny_pipeline, name, "x0")
    assert bool(torch.isfinite(synced.latents).all())
    assert not torch.allclose(synced.latents, plain.latents)  # the gradient step acted


def test_decoded_panorama_has_no_seam_at_yaw_180_and_smooth_poles(tiny_pipeline):
    result, job = run(tiny_pipeline, "equirect", "x0", output_type="pil")
    assert result.images[0].size == (1024, 512)
    seam = spherical.wrap_seam_ratio(result.pixels)
    plain_decode = spherical.wrap_seam_ratio(job._vae_decode(result.latents))
    assert seam < 1.1 and seam < plain_decode  # the wrap column is like any other column
    # The top and bottom latent rows are each a small circle around a pole: near-constant.
    assert spherical.pole_ratio(result.latents) < 0.5

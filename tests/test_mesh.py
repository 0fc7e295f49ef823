"""The ``mesh`` geometry: ray-cast maps against an analytic ray caster and trimesh's numpy
caster, the adjoint identity, round trips, the conformance kit, bad meshes, whole tiny jobs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from jointdiff import create
from jointdiff.image.output import JOB_KEY
from jointdiff.surfaces.mesh import asset as mesh_asset
from jointdiff.surfaces.mesh import raster
from jointdiff.surfaces.mesh.cameras import Camera, camera_rays
from jointdiff import testing as kit_mixins
from jointdiff.surfaces.mesh.geometry import MeshGeometry
from jointdiff.testing import geometry as kit
from jointdiff.utils.errors import ConfigError

SMALL = {"window_latent": 8, "texture_latent": 16, "texture_px": 64}
MESH_EXAMPLE = MeshGeometry.example_options()
FOUR_VIEWS = [(10.0, 20.0, 3.0, 40.0), (15.0, 110.0, 3.0, 40.0), (-10.0, 200.0, 3.0, 40.0), (40.0, 290.0, 3.0, 40.0)]


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    """A cube (xatlas-unwrapped), a UV sphere with UVs, and a two-material OBJ."""
    folder = tmp_path_factory.mktemp("meshes")
    trimesh.creation.box().export(folder / "cube.obj")
    sphere = trimesh.creation.uv_sphere(radius=1.0, count=[12, 12])
    sphere.export(folder / "sphere.ply")
    left = trimesh.creation.box(extents=(1, 1, 1))
    left.apply_translation((-0.6, 0, 0))
    right = trimesh.creation.icosphere(1, radius=0.5)
    right.apply_translation((0.6, 0, 0))
    scene = trimesh.Scene()
    for name, part in (("wood", left), ("metal", right)):
        uv = np.random.default_rng(0).random((len(part.vertices), 2))
        part.visual = trimesh.visual.TextureVisuals(uv=uv, material=trimesh.visual.material.SimpleMaterial(name=name))
        scene.add_geometry(part, geom_name=name)
    scene.export(folder / "two.glb")
    return folder


def geometry(path, **options):
    g = create("geometry", "mesh", path=str(path), **{**SMALL, **options})
    g.setup(8)
    return g


# -- rasterization vs independent ray casters ------------------------------------------------


def analytic_cube_hits(camera: Camera, size: int, half: float):
    """First hits of the pixel rays on the axis-aligned cube ``[-half, half]^3`` (slab method):
    the hit face's outward axis (0..5 = +x −x +y −y +z −z, -1: none) and the depth along the view axis."""
    origins, directions = camera_rays(camera, size)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - origins) / directions, (half - origins) / directions
    near = np.minimum(t1, t2).max(1)
    far = np.maximum(t1, t2).min(1)
    hit = (near <= far) & (near > 0)
    axis = np.minimum(t1, t2).argmax(1)
    sign = np.where(np.take_along_axis(directions, axis[:, None], 1)[:, 0] < 0, 0, 1)
    side = np.where(hit, 2 * axis + sign, -1)
    points = origins + np.where(hit, near, 0)[:, None] * directions
    depth = (points - camera.position) @ -camera.axes()[:, 2]
    return side.reshape(size, size), np.where(hit, depth, 0).reshape(size, size)


@pytest.mark.parametrize("ortho", [None, 1.2])
def test_cube_maps_match_analytic_ray_casting(meshes, ortho):
    asset = mesh_asset.load_mesh(meshes / "cube.obj")
    half = 0.5 * asset.scale
    normals = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    for el, az in ((0.0, 0.0), (25.0, 35.0), (-40.0, 200.0)):
        camera = Camera(el, az, 3.0, 40.0, ortho)
        maps = raster.rasterize(asset, camera, 48)
        side, depth = analytic_cube_hits(camera, 48, half)
        ours = np.where(maps.mask, (np.abs(maps.normal @ normals.T - 1) < 1e-6).argmax(-1), -1)
        assert (ours == side).mean() >= 0.99
        both = maps.mask & (side >= 0)
        assert np.abs(maps.depth[both] - depth[both]).max() <= 1e-4 * 2 * half * 3**0.5
        directions = camera_rays(camera, 48)[1].reshape(48, 48, 3)
        expected_cos = -normals[side[both]] * directions[both]
        np.testing.assert_allclose(maps.cos[both], expected_cos.sum(-1), atol=1e-9)


@pytest.mark.parametrize("name", ["sphere.ply", "two.glb"])
def test_maps_match_trimesh_numpy_ray_caster(meshes, name):
    """Our maps cast with Embree against trimesh's numpy caster: two independent backends."""
    pytest.importorskip("embreex", reason="the comparison needs the Embree backend (embreex)")
    asset = mesh_asset.load_mesh(meshes / name)
    reference = trimesh.Trimesh(asset.vertices, asset.faces, process=False)
    camera = Camera(17.0, 33.0, 3.0, 40.0)
    size, texture = 32, 64
    maps = raster.rasterize(asset, camera, size, backend="embree")
    origins, directions = camera_rays(camera, size)
    caster = trimesh.ray.ray_triangle.RayMeshIntersector(reference)
    first = caster.intersects_first(origins, directions).reshape(size, size)
    assert (first == maps.face).mean() >= 0.99
    same = (first == maps.face) & maps.mask
    located, index_ray, _ = caster.intersects_location(origins, directions, multiple_hits=False)
    truth = np.zeros((size * size, 3))
    truth[index_ray] = located
    truth = truth.reshape(size, size, 3)[same]
    depth = (truth - camera.position) @ -camera.axes()[:, 2]
    assert np.abs(maps.depth[same] - depth).max() <= 1e-4 * 2
    bary = trimesh.triangles.points_to_barycentric(asset.vertices[asset.faces[maps.face[same]]], truth)
    uv = np.einsum("nk,nkc->nc", bary, asset.corner_uv[maps.face[same]])
    assert np.abs(maps.uv[same] - uv).max() * texture <= 1.0


# -- extract / insert ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cube.obj", "two.glb"])
def test_adjoint_identity_on_seen_texels(meshes, name):
    g = geometry(meshes / name)
    seen = g.seen_texels()[:, None]
    generator = torch.Generator().manual_seed(0)
    texture = torch.randn(*seen.shape[:1], 3, *seen.shape[2:], generator=generator, dtype=torch.float64) * seen
    ids = [3, 0, 7]
    views = torch.randn(len(ids), 3, 8, 8, generator=generator, dtype=torch.float64)
    inserted = torch.zeros_like(texture)
    g.insert(inserted, views, ids)
    left = (g.extract(texture, ids) * views).sum()
    right = (texture * inserted).sum()
    torch.testing.assert_close(left, right, rtol=1e-10, atol=1e-10)


def test_conformance_kit_where_it_applies(meshes):
    g = geometry(meshes / "two.glb")
    assert g.canvas_shape_latent == (2, 16, 16) and g.num_windows == 10
    assert set(g.conformance_exempt) == {"round_trip", "pixel_scale", "decode"}
    kit.check_geometry(g, 8)
    with pytest.raises(AssertionError, match="insert of ones at 8x vs the 1x|extract of a constant canvas at 8x"):
        kit.check_geometry_pixel_scale(g)  # exempt for a reason: background pixels are 0


class TestMeshConformance(kit_mixins.GeometryConformance):
    """The conformance kit's mixin on the example cube (exempt checks skipped with their reason)."""

    def make_geometry(self):
        return create("geometry", "mesh", **MESH_EXAMPLE)


def test_unknown_exemptions_are_refused(meshes):
    g = geometry(meshes / "cube.obj")
    g.conformance_exempt = {"decode": "why", "colour": "no such check"}
    with pytest.raises(AssertionError, match=r"unknown checks \['colour'\]"):
        kit.check_geometry(g, 8)


def test_pixel_scale_views_follow_the_latent_views(meshes):
    """The kit's pixel-scale property where the surface is: a constant texture renders as
    that constant on surface pixels (0 elsewhere), and pooled k× views of a smooth texture
    match the 1× views on pixels inside the surface."""
    g = geometry(meshes / "sphere.ply")
    ids = [0, 4, 9]
    constant = g.extract(torch.full((1, 2, 128, 128), 0.75, dtype=torch.float64), ids)
    mask = g.window_map("mask", ids, scale=8).double()
    torch.testing.assert_close(constant, 0.75 * mask.expand_as(constant))
    smooth = g.smooth_test_canvas(2)
    fine = torch.nn.functional.interpolate(smooth, scale_factor=8, mode="bilinear", align_corners=False)
    pooled = torch.nn.functional.avg_pool2d(g.extract(fine, ids), 8)
    inside = torch.nn.functional.avg_pool2d(mask, 8) == 1
    spread = float(smooth.max() - smooth.min())
    assert float((pooled - g.extract(smooth, ids)).abs()[inside.expand_as(pooled)].max()) < 0.05 * spread


def test_round_trip_of_a_known_texture_where_seen(meshes):
    """A smooth texture rendered into the views and fused back (SyncMVD's weighted mean)
    equals itself on texels the views see well; decoding views and baking them in pixel
    space returns the texture at texture_px."""
    g = geometry(meshes / "cube.obj", cameras=None)
    texture = g.smooth_test_canvas(3)
    ids = list(range(g.num_windows))
    weights = g.window_weights(ids).double()
    numerator, denominator = torch.zeros_like(texture), torch.zeros(texture.shape[0], 1, *texture.shape[2:], dtype=torch.float64)
    g.insert(numerator, g.extract(texture, ids) * weights, ids)
    g.insert(denominator, weights, ids)
    fused = numerator / denominator
    well = (denominator[:, 0] > 0.5 * denominator.max()) & g.seen_texels()
    assert int(well.sum()) > 20
    spread = float(texture.max() - texture.min())
    assert float((fused - texture).abs().permute(1, 0, 2, 3)[:, well].max()) < 0.05 * spread
    # pixel-space bake: views of an 8x texture, baked back at texture_px = 8 * texture_latent / 2
    fine = torch.nn.functional.interpolate(texture, scale_factor=8, mode="bilinear", align_corners=False)
    views_px = g.extract(fine, ids).float()
    baked = g.bake(views_px)
    target = torch.nn.functional.interpolate(texture, size=(64, 64), mode="bilinear", align_corners=False)
    inside = torch.from_numpy(g.texel_maps()[0].face >= 0)
    error = (baked.double() - target).abs()[0][:, inside]
    assert float(error.median()) < 0.02 * spread and float(error.quantile(0.95)) < 0.1 * spread


def test_background_pixels_weigh_nothing_and_maps_follow_the_contract(meshes):
    g = geometry(meshes / "sphere.ply")
    ids = [0, 8]
    mask = g.window_map("mask", ids)
    weights = g.window_weights(ids)
    assert bool((weights[mask == 0] == 0).all()) and bool((weights[mask == 1] > 0).all())
    torch.testing.assert_close(g.window_coverage(ids), mask)
    depth = g.window_map("depth", ids, scale=2)
    assert depth.shape == (2, 1, 16, 16) and float(depth.max()) == 1.0 and bool((depth[g.window_map("mask", ids, 2) == 0] == 0).all())
    normal = g.window_map("normal", [0])
    centre = normal[0, :, 3:5, 3:5].mean((1, 2))
    torch.testing.assert_close(centre, torch.tensor([0.5, 0.5, 1.0]), atol=0.08, rtol=0)  # faces the camera
    with pytest.raises(ConfigError, match="no per-window map 'canny'"):
        g.window_map("canny", ids)


# -- bad meshes, one line each --------------------------------------------------------------


def test_bad_meshes_are_refused_in_one_line(tmp_path, meshes):
    (tmp_path / "points.ply").write_bytes(trimesh.PointCloud(np.random.default_rng(0).random((10, 3))).export(file_type="ply"))
    flat = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [[0, 1, 2]], process=False)
    flat.export(tmp_path / "flat.ply")
    (tmp_path / "nomtl.obj").write_text("mtllib gone.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (tmp_path / "notex.mtl").write_text("newmtl a\nmap_Kd missing.png\n")
    (tmp_path / "notex.obj").write_text("mtllib notex.mtl\nusemtl a\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    cases = {
        tmp_path / "none.obj": "is not a file",
        tmp_path / "points.ply": "has no faces",
        tmp_path / "flat.ply": "only degenerate",
        tmp_path / "nomtl.obj": "missing: gone.mtl",
        tmp_path / "notex.obj": "missing: missing.png",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message) as error:
            create("geometry", "mesh", path=str(path))
        assert "\n" not in str(error.value) and "path" in str(error.value)
    with pytest.raises(ConfigError, match="over max_faces = 10"):
        create("geometry", "mesh", path=str(meshes / "cube.obj"), max_faces=10)
    with pytest.raises(ConfigError, match="not sha256 = 'abc'"):
        create("geometry", "mesh", path=str(meshes / "cube.obj"), sha256="abc")
    with pytest.raises(ConfigError, match="cameras: no view sees sheet 0 of the latent texture \\(material 'metal'\\)"):
        geometry(meshes / "two.glb", cameras=[(0.0, -90.0, 3.0, 40.0)], projection="orthographic", ortho_half_height=0.3)
    with pytest.raises(ConfigError, match="unwrapping with xatlas failed"):
        mesh_asset.unwrap(np.zeros((3, 3)), np.array([[0, 1, 5]]), "x.obj")


def test_unwrapped_cube_has_uvs_in_the_unit_square_and_is_normalized(meshes):
    asset = mesh_asset.load_mesh(meshes / "cube.obj")
    assert asset.unwrapped and asset.num_sheets == 1
    assert asset.corner_uv.min() >= 0 and asset.corner_uv.max() <= 1
    np.testing.assert_allclose(np.linalg.norm(asset.vertices, axis=1).max(), 1.0)
    kept = mesh_asset.load_mesh(meshes / "cube.obj", normalize=False)
    np.testing.assert_allclose(np.abs(kept.vertices).max(), 0.5)
    np.testing.assert_allclose(asset.to_source(asset.vertices), kept.vertices, atol=1e-12)


# -- whole jobs ------------------------------------------------------------------------------


def run_texture(model, mesh, tmp_path, steps=2, **options):
    from jointdiff.jobs.spec import Job, run_job

    job = Job.from_dict({
        "model": {"id": model, "device": "cpu", "dtype": "float32"},
        "geometry": {"name": "mesh", "path": str(mesh), "cameras": FOUR_VIEWS, **SMALL, **options},
        "conditioners": [{"name": "text", "prompt": "a wooden crate"}],
        "synchronizer": {"name": "none"},
        "steps": steps, "seed": 3, "view_batch_size": 2, "output": str(tmp_path / "crate.png"),
    })
    return job, run_job(job, progress=False)


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_whole_job_writes_texture_glb_obj_and_turntable(meshes, tmp_path, model):
    job, result = run_texture(model, meshes / "two.glb", tmp_path)
    written = result.save(tmp_path / "crate.png")
    names = sorted(p.name for p in written)
    assert {"crate_0.png", "crate_1.png", "crate.glb", "crate.obj", "crate.mtl", "crate_turntable.png", "crate.html",
            "crate_mat0_metal.png", "crate_mat1_wood.png"} <= set(names)
    assert "crate.glb" in (tmp_path / "crate.html").read_text() and (tmp_path / "crate.html").stat().st_size > 10_000
    with Image.open(tmp_path / "crate_0.png") as image:
        assert image.size == (64, 64)
        embedded = json.loads(image.text[JOB_KEY])
    assert embedded["geometry"]["sha256"] == mesh_asset.file_sha256(meshes / "two.glb")
    loaded = trimesh.load(tmp_path / "crate.glb")
    assert len(loaded.geometry) == 2
    for part in loaded.geometry.values():
        assert part.visual.material.baseColorTexture.size == (64, 64)


def test_batch_size_order_and_resume_do_not_change_the_texture(tiny_pipeline, meshes):
    """jointdiff's invariance kit: view batch sizes, batch order, resume (with other batches);
    fuse_until = 0.5 so that a resumed job crosses the step where fusion stops."""
    from jointdiff import JointDiffusion
    from jointdiff.testing.invariance import check_invariance

    def job(view_batch_size):
        shape = create("geometry", "mesh", path=str(meshes / "cube.obj"), cameras=FOUR_VIEWS, fuse_until=0.5, **SMALL)
        text = create("conditioner", "text", prompt="a crate")
        return JointDiffusion(tiny_pipeline, shape, [text], view_batch_size=view_batch_size)

    check_invariance(job, steps=4)


def test_shifted_windows_are_refused(meshes):
    from jointdiff.engine.shifted import check_windows_option

    with pytest.raises(ConfigError, match="geometry .mesh. cannot shift: its windows are views resampled or rendered"):
        check_windows_option("shifted", geometry(meshes / "cube.obj"), None)


def window_zero_inputs(pipeline, mesh, cameras, fuse_until):
    """The denoiser's input of window 0 at every step (one window per call, window 0 first)."""
    from jointdiff import JointDiffusion

    shape = create("geometry", "mesh", path=str(mesh), cameras=cameras, fuse_until=fuse_until, **SMALL)
    text = create("conditioner", "text", prompt="a crate", guidance_scale=1.0)
    seen = []
    hook = pipeline.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        JointDiffusion(pipeline, shape, [text], view_batch_size=1)(num_inference_steps=3, seed=0, progress=False,
                                                                  output_type="latent")
    finally:
        hook.remove()
    return seen[:: len(cameras)]


def test_views_step_alone_after_fuse_until(tiny_pipeline, meshes):
    """fuse_until = 0: window 0 follows the same path whatever the other views; 1: the other
    views change it from the second step on (their x̂0 is fused into its own)."""
    mesh = meshes / "cube.obj"
    alone = {f: window_zero_inputs(tiny_pipeline, mesh, FOUR_VIEWS[:1], f) for f in (0.0, 1.0)}
    together = {f: window_zero_inputs(tiny_pipeline, mesh, FOUR_VIEWS, f) for f in (0.0, 1.0)}
    for got, expected in zip(together[0.0], alone[0.0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1.0][0], alone[1.0][0], rtol=1e-5, atol=1e-5)  # the same start
    assert not torch.allclose(together[1.0][2], alone[1.0][2], atol=1e-3)


def test_texture_command_reproduces_from_its_png_and_refuses_a_changed_mesh(meshes, tmp_path, capsys):
    from jointdiff.cli import main

    mesh = tmp_path / "box.obj"
    mesh.write_bytes((meshes / "cube.obj").read_bytes())
    common = ["--steps", "1", "--texture-px", "64", "-g", "window_latent=8", "-g", "texture_latent=16",
              "-g", f"cameras={json.dumps([list(c) for c in FOUR_VIEWS])}", "--device", "cpu", "--quiet"]
    assert main(["texture", str(mesh), "a crate", *common, "-o", str(tmp_path / "t.png")]) == 0
    assert {"t.png", "t.glb", "t.obj", "t.html", "t_turntable.png"} <= {p.name for p in tmp_path.iterdir()}
    assert main(["run", str(tmp_path / "t.png"), "--output", str(tmp_path / "again.png"), "--quiet"]) == 0
    with Image.open(tmp_path / "t.png") as first, Image.open(tmp_path / "again.png") as again:
        assert first.tobytes() == again.tobytes()
    capsys.readouterr()
    mesh.write_text(mesh.read_text() + "\n# edited\n")
    assert main(["run", str(tmp_path / "t.png"), "--output", str(tmp_path / "third.png"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the file changed" in err[0]


def test_estimate_counts_rays_bake_and_view_decodes(tiny_pipeline, meshes):
    from jointdiff import JointDiffusion

    shape = create("geometry", "mesh", path=str(meshes / "two.glb"), cameras=FOUR_VIEWS, **SMALL)
    text = create("conditioner", "text", prompt="a crate")
    estimate = JointDiffusion(tiny_pipeline, shape, [text]).estimate(2, flops=False)
    views, side, pixel_side, texels = 4, 8, 64, 2 * 64 * 64
    assert estimate.geometry_work == {"rays": views * (side**2 + pixel_side**2) + texels, "bake_samples": views * texels}
    assert estimate.evaluations.total()["decoder.forward"] == views


def test_depth_controlnet_on_a_mesh_job(meshes, tmp_path):
    from jointdiff.jobs.spec import Job, run_job

    job = Job.from_dict({
        "model": {"id": "tiny", "device": "cpu", "dtype": "float32"},
        "geometry": {"name": "mesh", "path": str(meshes / "sphere.ply"), "cameras": FOUR_VIEWS[:2], **SMALL},
        "conditioners": [{"name": "text", "prompt": "a ball"}, {"name": "controlnet", "model": "tiny", "image": "depth"}],
        "steps": 1, "output": str(tmp_path / "ball.png"),
    })
    result = run_job(job, progress=False)
    assert result.images[0].size == (64, 64) and bool(torch.isfinite(result.latents).all())


def test_syncdiffusion_acts_on_mesh_views(tiny_pipeline, meshes):
    from jointdiff import JointDiffusion

    def run(synchronizer):
        shape = create("geometry", "mesh", path=str(meshes / "cube.obj"), cameras=FOUR_VIEWS[:3], **SMALL)
        text = create("conditioner", "text", prompt="a crate")
        job = JointDiffusion(tiny_pipeline, shape, [text], synchronizer)
        return job(num_inference_steps=2, seed=0, progress=False, output_type="latent").latents

    sync = create("synchronizer", "syncdiffusion", lpips_random_backbone=True, net="alex", w=20.0, until_step=1)
    synced, plain = run(sync), run(None)
    assert bool(torch.isfinite(synced).all()) and not torch.allclose(synced, plain)  # the gradient step acted


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux2"])
def test_other_families_texture_a_mesh(meshes, model):
    """Flow-matching families with 16- and 128-channel latents (FLUX.2: patch 2, as FlexPainter)."""
    from jointdiff import JointDiffusion
    from jointdiff.models.loading import load_model

    shape = create("geometry", "mesh", path=str(meshes / "cube.obj"), cameras=FOUR_VIEWS[:2],
                   **{**SMALL, "window_latent": 16})
    text = create("conditioner", "text", prompt="a crate")
    result = JointDiffusion(load_model(model, device="cpu"), shape, [text])(num_inference_steps=1, seed=0, progress=False)
    assert result.images[0].size == (64, 64) and bool(torch.isfinite(result.pixels).all())


@pytest.mark.parametrize("suffix", [".obj", ".glb"])
def test_exported_textured_mesh_loads_back_with_its_uvs_and_materials(meshes, tmp_path, suffix):
    """OBJ + MTL + PNGs and GLB written by the exporter read back (OBJ: its MTL and texture
    files found) with the same materials, corner UVs and vertices, no unwrapping."""
    from jointdiff.surfaces.mesh import export

    asset = mesh_asset.load_mesh(meshes / "two.glb")
    textures = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    export.export_textured(asset, textures, tmp_path / "out")
    again = mesh_asset.load_mesh(tmp_path / f"out{suffix}")
    assert not again.unwrapped and again.num_sheets == 2
    for sheet in range(2):
        name = asset.sheet_names[sheet]
        other = [re.sub(r"^out_mat\d+_", "", n) for n in again.sheet_names].index(name)
        vertices, _, uv = asset.sheet_mesh(sheet)
        vertices_again, _, uv_again = again.sheet_mesh(other)
        order = lambda v, u: np.lexsort(np.round(np.concatenate([v, u], 1), 6).T)  # noqa: E731
        a, b = order(vertices, uv), order(vertices_again, uv_again)
        np.testing.assert_allclose(uv_again[b], uv[a], atol=1e-6)
        np.testing.assert_allclose(vertices_again[b], vertices[a], atol=1e-6)


def test_decode_bakes_the_views_own_final_latents_once(meshes):
    """After a job hands over the views' own final latents, decode bakes those (as SyncMVD);
    without them (a second decode, a job on several ranks) it renders the latent texture."""
    g = geometry(meshes / "cube.obj", cameras=FOUR_VIEWS)
    decoder = kit.local_decoder(8)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    canvas = torch.zeros(1, 4, 16, 16)
    g.final_windows([2, 0], latents[[2, 0]])
    g.final_windows([1, 3], latents[[1, 3]])
    torch.testing.assert_close(g.decode(canvas, decoder), g.bake(decoder(latents)))
    torch.testing.assert_close(g.decode(canvas, decoder), g.bake(decoder(g.extract(canvas, range(4)))))


def test_a_finished_job_hands_every_view_to_the_geometry(tiny_pipeline, meshes, monkeypatch):
    from jointdiff import JointDiffusion

    shape = create("geometry", "mesh", path=str(meshes / "cube.obj"), cameras=FOUR_VIEWS, **SMALL)
    handed = []
    original = shape.final_windows
    monkeypatch.setattr(shape, "final_windows", lambda ids, latents: (handed.append((list(ids), latents.shape)), original(ids, latents)))
    text = create("conditioner", "text", prompt="a crate")
    JointDiffusion(tiny_pipeline, shape, [text], view_batch_size=3)(num_inference_steps=1, seed=0, progress=False)
    assert sorted(i for ids, _ in handed for i in ids) == [0, 1, 2, 3]
    assert all(tuple(shape_[1:]) == (4, 8, 8) for _, shape_ in handed)
    assert shape._final == {}  # used by the decode


# -- review fixes: references, UV range, cameras, output names, depth, fusion ------------------


def textured_triangle_obj(folder, statement: str, uv: str = "vt 0 0\nvt 1 0\nvt 0 1\n"):
    """A one-triangle OBJ with UVs whose MTL has the texture statement ``statement``."""
    (folder / "tri.mtl").write_text(f"newmtl a\n{statement}\n")
    (folder / "tri.obj").write_text("mtllib tri.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\n" + uv + "usemtl a\nf 1/1 2/2 3/3\n")
    return folder / "tri.obj"


def test_mtl_texture_options_with_several_values_are_not_the_file_name(tmp_path):
    assert mesh_asset.mtl_texture_file("-s 1 1 1 -o 0.5 0.5 0 tex.png") == "tex.png"
    assert mesh_asset.mtl_texture_file("-mm 0 1 -bm 0.5 -clamp on sub\\tex 2.png") == "sub/tex 2.png"
    assert mesh_asset.mtl_texture_file("-o 0.5 tex.png") == "tex.png"
    path = textured_triangle_obj(tmp_path, "map_Kd -s 1 1 1 -o 0.5 0.5 0 tex.png")
    with pytest.raises(ConfigError, match=r"missing: tex\.png$"):
        mesh_asset.load_mesh(path)
    Image.new("RGB", (4, 4)).save(tmp_path / "tex.png")
    assert len(mesh_asset.load_mesh(path).faces) == 1


def test_gltf_uris_are_percent_decoded(tmp_path, meshes):
    document = {"asset": {"version": "2.0"}, "images": [{"uri": "my%20tex.png"}]}
    (tmp_path / "a.gltf").write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=r"missing: my tex\.png$"):
        mesh_asset.check_references(tmp_path / "a.gltf")
    Image.new("RGB", (4, 4)).save(tmp_path / "my tex.png")
    mesh_asset.check_references(tmp_path / "a.gltf")


def test_uvs_outside_the_unit_square_are_refused_naming_path_and_range(tmp_path):
    path = textured_triangle_obj(tmp_path, "Kd 1 1 1", uv="vt 0 0\nvt 1.5 0\nvt 0 1\n")
    message = r"path = '.*tri\.obj' has UVs outside \[0, 1\] \(u in \[0, 1\.5\], v in \[0, 1\]\)"
    with pytest.raises(ConfigError, match=message) as error:
        create("geometry", "mesh", path=str(path))
    assert "\n" not in str(error.value)
    within = textured_triangle_obj(tmp_path, "Kd 1 1 1", uv="vt 0 -0.00005\nvt 1.00005 0\nvt 0 1\n")
    assert len(mesh_asset.load_mesh(within).faces) == 1


@pytest.mark.parametrize("camera, message", [
    ((0.0, 0.0, 3.0, 180.0), r"cameras\[1\] = \(0\.0, 0\.0, 3\.0, 180\.0\): fov_deg must be in \(0, 180\), got 180\.0"),
    ((0.0, 0.0, 3.0, 0.0), r"cameras\[1\] = .*: fov_deg must be in \(0, 180\), got 0\.0"),
    ((0.0, 0.0, -2.0, 40.0), r"cameras\[1\] = .*: distance must be > 0, got -2\.0"),
    ((0.0, 0.0, 0.8, 40.0), r"cameras\[1\] = \(0\.0, 0\.0, 0\.8, 40\.0\): distance must be > 1 .*, got 0\.8"),
])
def test_impossible_cameras_are_refused_naming_the_camera(meshes, camera, message):
    with pytest.raises(ConfigError, match=message) as error:
        create("geometry", "mesh", path=str(meshes / "cube.obj"), cameras=[FOUR_VIEWS[0], camera])
    assert "\n" not in str(error.value)


def test_a_camera_inside_the_unit_sphere_is_allowed_in_the_mesh_own_frame(meshes):
    g = create("geometry", "mesh", path=str(meshes / "cube.obj"), normalize=False, cameras=[(0.0, 0.0, 0.9, 60.0)])
    assert g.options.cameras == [(0.0, 0.0, 0.9, 60.0)]


def test_texture_file_names_are_safe_distinct_and_apart_from_the_other_outputs(tmp_path):
    from jointdiff.surfaces.mesh import export

    triangle = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    vertices = np.concatenate([triangle + (0, 0, z) for z in range(4)])
    corner_uv = np.tile(np.array([[0.0, 0], [1, 0], [0, 1]]), (4, 1, 1))
    names = ["turntable", "1", "a/b", "a_b"]
    asset = mesh_asset.MeshAsset(vertices, np.arange(12).reshape(4, 3), corner_uv, np.arange(4), names)
    textures = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue", "white")]
    paths = export.export_textured(asset, textures, tmp_path / "out")
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["out_mat0_turntable.png", "out_mat1_1.png", "out_mat2_a_b.png", "out_mat3_a_b.png"]
    assert {"out_turntable.png", "out_1.png"}.isdisjoint(pngs) and not (tmp_path / "a").exists()
    assert {p.name for p in paths.values()} >= {"out.glb", "out.obj", "out.mtl", "out.html", *pngs}
    with Image.open(tmp_path / "out_mat2_a_b.png") as image:
        assert image.getpixel((0, 0)) == (0, 0, 255)


def test_depth_maps_keep_every_surface_pixel_apart_from_the_background(meshes):
    from jointdiff.surfaces.mesh.geometry import DEPTH_FLOOR

    assert DEPTH_FLOOR == 0.2
    g = geometry(meshes / "cube.obj", cameras=[(0.0, 0.0, 3.0, 40.0), (25.0, 35.0, 3.0, 40.0)])
    depth, mask = g.window_map("depth", [0, 1], scale=2), g.window_map("mask", [0, 1], scale=2) > 0
    front, oblique = depth[0, 0], depth[1, 0]
    assert mask[0, 0].any() and (front[mask[0, 0]] > 0).all() and (front[~mask[0, 0]] == 0).all()
    assert torch.allclose(front[mask[0, 0]], torch.ones(()))  # one flat face square to the camera
    assert (oblique[mask[1, 0]] >= DEPTH_FLOOR - 1e-6).all() and (oblique[~mask[1, 0]] == 0).all()
    assert oblique[mask[1, 0]].max() == pytest.approx(1.0) and oblique[mask[1, 0]].min() == pytest.approx(DEPTH_FLOOR)


@pytest.mark.parametrize("fusion", ["latent", "x0_renoise"])
def test_fusion_other_than_x0_is_refused_before_the_model_loads(tiny_pipeline, meshes, fusion):
    from jointdiff.engine.loop import JointDiffusion
    from jointdiff.jobs.spec import Job, check_before_loading

    data = {
        "model": {"id": "tiny", "device": "cpu", "dtype": "float32"},
        "geometry": {"name": "mesh", "path": str(meshes / "cube.obj"), "cameras": FOUR_VIEWS, **SMALL},
        "conditioners": [{"name": "text", "prompt": "a crate"}], "steps": 2, "fusion": fusion,
    }
    message = rf"fusion = '{fusion}' cannot be used with geometry 'mesh': its windows need fusion = 'x0'"
    with pytest.raises(ConfigError, match="^job: " + message) as error:
        check_before_loading(Job.from_dict(data))
    assert "\n" not in str(error.value)
    g, text = geometry(meshes / "cube.obj", cameras=FOUR_VIEWS), create("conditioner", "text", prompt="a crate")
    with pytest.raises(ConfigError, match="^" + message):
        JointDiffusion(tiny_pipeline, g, [text], fusion=fusion)
    assert JointDiffusion(tiny_pipeline, g, [text], fusion="x0").fusion == "x0"
    Job.from_dict({**data, "fusion": "x0"})


def test_geometries_need_x0_fusion_only_for_coverage_or_an_early_fuse_until(meshes):
    from jointdiff.core.geometry import needs_x0_fusion

    assert needs_x0_fusion(geometry(meshes / "cube.obj"))
    from jointdiff.core.registry import get_registry

    for name in ("strip", "equirect"):
        cls = get_registry().get("geometry", name)
        assert not needs_x0_fusion(create("geometry", name, cls.example_options()))
    g = geometry(meshes / "cube.obj", fuse_until=1.0)
    assert needs_x0_fusion(g)  # fused to the last step, but its views keep their own background

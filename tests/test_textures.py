"""Texture geometries (torus, atlas), the tile_text conditioner, seam metrics and exports."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jointdiff import JointDiffusion
from jointdiff.core.registry import create
from jointdiff.surfaces import cube
from jointdiff.surfaces.textures import (
    AtlasLayout,
    export_cube,
    export_textures,
    pack_atlas,
    repeat_preview,
    seam_ratio,
    seam_report,
)
from jointdiff.testing import GeometryConformance, check_conditioner, make_context
from jointdiff.utils.errors import ConfigError


def _torus(**options):
    geometry = create("geometry", "torus", **options)
    geometry.setup(8)
    return geometry


def _atlas(**options):
    geometry = create("geometry", "atlas", **options)
    geometry.setup(8)
    return geometry


def _coverage(geometry) -> torch.Tensor:
    """How many windows cover each canvas cell ``(S, 1, H, W)``, through ``insert``."""
    count = torch.zeros(geometry.canvas_shape_latent[0], 1, *geometry.canvas_shape_latent[1:])
    ids = list(range(geometry.num_windows))
    geometry.insert(count, torch.ones(len(ids), 1, *geometry.window_size_latent), ids)
    return count


def _smooth_periodic_latent(size: int = 64, seed: int = 0) -> torch.Tensor:
    """A ``(1, 4, size, size)`` latent made of low-frequency waves with whole periods across
    the canvas: continuous across both wrap edges, so only the decoder can add a seam."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    generator = torch.Generator().manual_seed(seed)
    latent = torch.zeros(1, 4, size, size)
    for channel in range(4):
        for _ in range(3):
            fy, fx = torch.randint(0, 3, (2,), generator=generator).tolist()
            phase = 2 * torch.pi * torch.rand(1, generator=generator).item()
            latent[0, channel] += torch.cos(2 * torch.pi * (fy * y + fx * x) / size + phase)
    return latent


def _vae_decode(pipeline):
    vae = pipeline.vae
    return lambda latents: vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0].float()


# --- seam metric ------------------------------------------------------------------------


class TestSeamRatio:
    def test_ramp_has_a_seam_of_known_size(self):
        ramp = torch.arange(16.0).repeat(3, 8, 1)  # (C, H, W): columns 0..15
        assert seam_ratio(ramp, "x") == pytest.approx(15.0)  # |15 - 0| vs 1 between columns
        assert seam_ratio(ramp, "y") == 1.0  # constant down each column: no seam, no change

    def test_periodic_triangle_wave_is_seamless(self):
        # |x - 16| over one whole period: every step, the wrap step (31 -> 0) included, is 1.
        triangle = (torch.arange(32.0) - 16).abs().repeat(1, 3, 4, 1)
        assert seam_ratio(triangle, "x") == 1.0
        cut = (torch.arange(40.0) % 32 - 16).abs().repeat(1, 3, 4, 1)  # not a whole period
        assert seam_ratio(cut, "x") == 7.0  # x = 0 gives 16, x = 39 gives 9

    def test_accepts_pil_and_checks_arguments(self):
        image = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 10, (4, 1, 3)))
        assert seam_ratio(image, "x") == pytest.approx(7.0)
        with pytest.raises(ConfigError, match="axis"):
            seam_ratio(image, "z")
        with pytest.raises(ConfigError, match="period"):
            seam_ratio(image, "x", period=0)

    def test_detects_the_decoder_seam_that_circular_padding_removes(self, tiny_pipeline):
        geometry = _torus(height_px=512, width_px=512, stride_latent=32)
        latent = _smooth_periodic_latent()
        with torch.no_grad():
            circular = geometry.decode(latent, _vae_decode(tiny_pipeline))
            naive = _vae_decode(tiny_pipeline)(latent)
        circular_ratios, naive_ratios = seam_report(circular, period=8), seam_report(naive, period=8)
        for axis in ("x", "y"):
            assert circular_ratios[axis] < 1.25, circular_ratios
            assert naive_ratios[axis] > 3.0, naive_ratios


# --- torus geometry ---------------------------------------------------------------------


class TestTorus:
    def test_uniform_coverage_when_the_stride_divides(self):
        geometry = _torus(height_px=512, width_px=640, window_latent=64, stride_latent=16)
        count = _coverage(geometry)
        assert geometry.canvas_shape_latent == (1, 64, 80)
        assert torch.all(count == (64 // 16) * (64 // 16))

    def test_windows_cross_both_wrap_edges_even_for_one_window_sized_tile(self):
        geometry = _torus(height_px=512, width_px=512, stride_latent=32)
        assert geometry.origins == [(0, 0), (0, 32), (32, 0), (32, 32)]
        pieces = geometry._pieces(3)  # origin (32, 32): four pieces, one per corner
        assert len(pieces) == 4
        assert {(cy.start, cx.start) for cy, cx, _, _ in pieces} == {(32, 32), (32, 0), (0, 32), (0, 0)}
        assert torch.all(_coverage(geometry) == 4)

    def test_extract_and_insert_are_adjoint(self):
        geometry = _torus(height_px=512, width_px=640, stride_latent=16)
        generator = torch.Generator().manual_seed(0)
        canvas = torch.randn(1, 4, 64, 80, generator=generator)
        ids = list(range(geometry.num_windows))
        values = torch.randn(len(ids), 4, 64, 64, generator=generator)
        inserted = torch.zeros_like(canvas)
        geometry.insert(inserted, values, ids)
        lhs = (geometry.extract(canvas, ids) * values).sum()
        assert lhs == pytest.approx(float((canvas * inserted).sum()), rel=1e-5)

    def test_rolling_the_noise_by_one_stride_rolls_the_texture(self, tiny_pipeline):
        # On a torus no position is special: shifting the initial noise by a window stride
        # permutes the windows, so the result shifts by the same amount (no hidden edge).
        # Small windows (32 cells) keep this fast; the geometry does not depend on the size.
        geometry = create("geometry", "torus", height_px=256, width_px=384, window_latent=32, stride_latent=16)
        text = create("conditioner", "text", prompt="mossy stones", guidance_scale=1.0)
        job = JointDiffusion(tiny_pipeline, geometry, [text])
        noise = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(3))
        plain = job(num_inference_steps=2, latents=noise, output_type="latent", progress=False).latents
        shift = (16, 32)
        shifted = job(
            num_inference_steps=2, latents=noise.roll(shift, (-2, -1)), output_type="latent", progress=False
        ).latents
        torch.testing.assert_close(shifted, plain.roll(shift, (-2, -1)), atol=1e-4, rtol=1e-4)


# --- atlas geometry and tile_text -----------------------------------------------------------


class TestAtlas:
    def test_each_tile_is_covered_by_its_own_windows_only(self):
        geometry = _atlas(tiles=3, tile_height_px=512, tile_width_px=640, stride_latent=16)
        assert geometry.canvas_shape_latent == (3, 64, 80)
        assert torch.all(_coverage(geometry) == 16)
        for tile in range(3):
            ids = [i for i in range(geometry.num_windows) if geometry.tile_of(i) == tile]
            count = torch.zeros(3, 1, 64, 80)
            geometry.insert(count, torch.ones(len(ids), 1, 64, 64), ids)
            assert torch.all(count[tile] == 16)
            assert torch.all(count[[s for s in range(3) if s != tile]] == 0)

    def test_atlas_equals_independent_tori_with_per_tile_prompts(self, tiny_pipeline, tmp_path):
        # Without a synchronizer the tiles do not interact: the atlas must reproduce one
        # torus job per tile, each with its own prompt (tile_text routes the prompts).
        prompts = ["green grass", "grey rock"]
        noise = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1))
        atlas = create("geometry", "atlas", tiles=2, tile_height_px=512, tile_width_px=512, stride_latent=32)
        conditioner = create("conditioner", "tile_text", prompts=prompts, guidance_scale=7.5)
        result = JointDiffusion(tiny_pipeline, atlas, [conditioner])(
            num_inference_steps=2, latents=noise, progress=False
        )
        # Tile 1 is the telling one: it needs the second prompt and the second sheet.
        torus = create("geometry", "torus", height_px=512, width_px=512, stride_latent=32)
        text = create("conditioner", "text", prompt=prompts[1], guidance_scale=7.5)
        alone = JointDiffusion(tiny_pipeline, torus, [text])(
            num_inference_steps=2, latents=noise[1:], output_type="latent", progress=False
        )
        torch.testing.assert_close(result.latents[1:], alone.latents, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(result.latents[0], result.latents[1], atol=1e-2)
        assert [image.size for image in result.images] == [(512, 512), (512, 512)]

        manifest = export_textures(result.images, tmp_path, prompts=prompts, layout=atlas.layout())
        on_disk = json.loads((tmp_path / "atlas.json").read_text())
        assert on_disk == {k: v for k, v in manifest.items() if k != "files"}
        assert on_disk["tiles"][1]["name"] == "grey_rock"
        packed = np.asarray(Image.open(tmp_path / "atlas.png"))
        for entry, image in zip(on_disk["tiles"], result.images):
            r = entry["rect_px"]
            crop = packed[r["y"] : r["y"] + r["height"], r["x"] : r["x"] + r["width"]]
            assert np.array_equal(crop, np.asarray(image))
            assert Image.open(tmp_path / entry["file"].replace(".png", "_preview.png")).size == (1536, 1536)


class TestTorusConformance(GeometryConformance):
    def make_geometry(self):
        return create("geometry", "torus", height_px=256, width_px=320, window_latent=16, stride_latent=8)


class TestAtlasConformance(GeometryConformance):
    def make_geometry(self):
        return create(
            "geometry", "atlas", tiles=3, tile_height_px=256, tile_width_px=192, window_latent=16, stride_latent=8
        )


def test_tile_text_conformance_on_an_atlas(tiny_pipeline):
    atlas = create(
        "geometry", "atlas", tiles=2, tile_height_px=256, tile_width_px=256, window_latent=32, stride_latent=16
    )
    conditioner = create("conditioner", "tile_text", prompts=["grass", "rock"], style_prompt="seamless")
    check_conditioner(conditioner, make_context(tiny_pipeline, atlas))
    assert conditioner.full_prompts() == ["grass, seamless", "rock, seamless"]
    assert conditioner.prompt().indices(range(atlas.num_windows)) == [0] * 4 + [1] * 4


# --- cube texture -----------------------------------------------------------------------------


class TestCubeAdjacency:
    N = 4

    def test_edges_follow_the_opengl_face_table(self):
        # Hand-derived from OpenGL's Table 8.19 (sc, tc per face), one edge per kind of join.
        n, line = self.N, torch.arange(self.N)
        first, last, before, after = (torch.full_like(line, v) for v in (0, self.N - 1, -1, self.N))
        expected = [
            ((4, line, after), (0, line, first)),  # +Z right -> +X left
            ((2, after, line), (4, first, line)),  # +Y bottom -> +Z top
            ((2, before, line), (5, first, n - 1 - line)),  # +Y top -> -Z top, reversed
            ((3, after, line), (5, last, n - 1 - line)),  # -Y bottom -> -Z bottom, reversed
            ((0, before, line), (2, n - 1 - line, last)),  # +X top -> +Y right column
        ]
        for (face, rows, cols), (other, other_rows, other_cols) in expected:
            got = cube.unfold_cells(face, rows, cols, n)
            assert torch.equal(got[0], torch.full_like(line, other)), (face, other)
            assert torch.equal(got[1], other_rows) and torch.equal(got[2], other_cols), (face, other)

    def test_horizontal_cross_unfolds_without_rotation(self):
        n, line = self.N, torch.arange(self.N)
        for left, right in ((1, 4), (4, 0), (0, 5)):  # -X | +Z | +X | -Z
            faces, rows, cols = cube.unfold_cells(left, line, torch.full_like(line, n), n)
            assert (faces == right).all() and torch.equal(rows, line) and (cols == 0).all()
        for top, bottom in ((2, 4), (4, 3)):  # +Y over +Z over -Y
            faces, rows, cols = cube.unfold_cells(top, torch.full_like(line, n), line, n)
            assert (faces == bottom).all() and (rows == 0).all() and torch.equal(cols, line)

    def test_crossing_an_edge_and_back_returns_home(self):
        # Each pair of cells that meet across an edge is found once from each side.
        meetings = Counter(
            frozenset((tuple(a), tuple(b)))
            for inside, outside in cube.edge_pairs(self.N)
            for a, b in zip(inside.T.tolist(), outside.T.tolist())
        )
        assert len(meetings) == 12 * self.N and set(meetings.values()) == {2}
        with pytest.raises(ConfigError, match="corner"):
            cube.unfold_cells(0, torch.tensor([-1]), torch.tensor([-1]), self.N)


class TestCubeTexture:
    def test_every_window_is_a_connected_patch_of_the_cube(self):
        geometry = create("geometry", "cube_texture", face_px=128, window_latent=8, stride_latent=4)
        geometry.setup(8)
        n = 16
        cells = torch.stack([geometry.window_cells(i) for i in range(geometry.num_windows)])
        faces, rows, cols = cells.unbind(1)  # (windows, h, w)
        points = torch.zeros(*faces.shape, 3, dtype=torch.float64)
        for face in range(6):
            on_face = faces == face
            points[on_face] = cube.cell_points(face, rows[on_face], cols[on_face], n)
        # Neighbouring window cells are neighbouring cube cells: 2/N apart on a face,
        # sqrt(2)/N across an edge; never the same cell, never far apart.
        for step in ((slice(None), slice(1, None)), (slice(1, None), slice(None))):
            back = tuple(slice(None, -1) if s.start else slice(None) for s in step)
            distance = (points[(slice(None), *step)] - points[(slice(None), *back)]).norm(dim=-1)
            assert distance.min() > 1.0 / n and distance.max() < 2.0 / n + 1e-9
        joined = {frozenset((int(a), int(b))) for w in faces for a in w.unique() for b in w.unique() if a != b}
        assert len(joined) == 12  # every cube edge is straddled by some window
        assert torch.all(_coverage(geometry) > 0)

    def test_decode_removes_the_edge_seams(self, tiny_pipeline):
        geometry = create("geometry", "cube_texture", face_px=256, window_latent=32, stride_latent=16)
        geometry.setup(8)
        grid = torch.arange(32)
        rows, cols = torch.meshgrid(grid, grid, indexing="ij")
        points = torch.stack([cube.cell_points(face, rows, cols, 32) for face in range(6)])
        directions = points / points.norm(dim=-1, keepdim=True)  # smooth on the sphere
        generator = torch.Generator().manual_seed(0)
        frequencies = 2 * torch.randn(4, 3, 3, generator=generator, dtype=torch.float64)
        latent = torch.stack([torch.cos(directions @ frequencies[c]).sum(-1) for c in range(4)], 1).float()
        decode = _vae_decode(tiny_pipeline)
        with torch.no_grad():
            joined = geometry.decode(latent, decode)
            alone = torch.cat([decode(latent[f : f + 1]) for f in range(6)])
        assert joined.shape == (6, 3, 256, 256)
        ratio_joined, ratio_alone = cube.cube_seam_ratio(joined), cube.cube_seam_ratio(alone)
        assert ratio_joined < 1.25 and ratio_alone > 3.0, (ratio_joined, ratio_alone)

    def test_runs_end_to_end_and_exports(self, tiny_pipeline, tmp_path):
        geometry = create("geometry", "cube_texture", face_px=256, window_latent=32, stride_latent=16)
        text = create("conditioner", "text", prompt="brick wall", guidance_scale=1.0)
        result = JointDiffusion(tiny_pipeline, geometry, [text])(num_inference_steps=2, progress=False)
        assert [image.size for image in result.images] == [(256, 256)] * 6
        paths = export_cube(result.images, tmp_path)
        assert [Path(p).name for p in paths] == [f"face_{name}.png" for name in cube.FACE_NAMES] + ["cross.png"]
        assert [np.asarray(Image.open(p)).tolist() for p in paths[:6]] == [np.asarray(i).tolist() for i in result.images]
        cross = np.asarray(Image.open(paths[-1]))
        assert cross.shape == (768, 1024, 3)
        assert np.array_equal(cross[256:512, 256:512], np.asarray(result.images[4]))  # +Z in the middle

    def test_errors(self):
        with pytest.raises(ConfigError, match="face_px = 100 is not a multiple of the VAE factor 8"):
            create("geometry", "cube_texture", face_px=100).setup(8)
        with pytest.raises(ConfigError, match="smaller than one window"):
            create("geometry", "cube_texture", face_px=256).setup(8)


@pytest.mark.parametrize(
    "kind, options",
    [
        ("torus", {"height_px": 256, "width_px": 320, "window_latent": 16, "stride_latent": 8}),
        ("atlas", {"tiles": 2, "tile_height_px": 128, "tile_width_px": 192, "window_latent": 16, "stride_latent": 8}),
        ("cube_texture", {"face_px": 128, "window_latent": 8, "stride_latent": 4}),
    ],
)
def test_pixel_space_extract_matches_latent_windows_scaled(kind, options):
    """A canvas-sized pixel input (condition image, mask) is cut with the latents' windows,
    rotated faces included."""
    geometry = create("geometry", kind, **options)
    geometry.setup(8)
    sheets, height, width = geometry.canvas_shape_latent
    latent = torch.randn(sheets, 3, height, width, generator=torch.Generator().manual_seed(0))
    pixels = torch.nn.functional.interpolate(latent, scale_factor=8, mode="nearest")
    ids = list(range(geometry.num_windows))
    expected = torch.nn.functional.interpolate(geometry.extract(latent, ids), scale_factor=8, mode="nearest")
    torch.testing.assert_close(geometry.extract(pixels, ids), expected)
    inserted = torch.zeros_like(pixels)
    geometry.insert(inserted, expected, ids)
    latent_inserted = torch.zeros_like(latent)
    geometry.insert(latent_inserted, geometry.extract(latent, ids), ids)
    upsampled = torch.nn.functional.interpolate(latent_inserted, scale_factor=8, mode="nearest")
    torch.testing.assert_close(inserted, upsampled)


class TestCubeConformance(GeometryConformance):
    def make_geometry(self):
        return create("geometry", "cube_texture", face_px=128, window_latent=8, stride_latent=4)


# --- exports ------------------------------------------------------------------------------


def _distinct_tiles(count: int, size_px: tuple[int, int]) -> list[Image.Image]:
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 256, (*size_px, 3), dtype=np.uint8)) for _ in range(count)]


class TestAtlasExport:
    @pytest.mark.parametrize("gutter_px", [0, 4])
    def test_manifest_rectangles_match_the_pixels(self, gutter_px):
        tiles = _distinct_tiles(5, (24, 40))
        layout = AtlasLayout.for_tiles(5, (24, 40), columns=3, gutter_px=gutter_px)
        atlas = np.asarray(pack_atlas(tiles, layout))
        height, width = layout.size_px
        assert atlas.shape == (height, width, 3) == (2 * (24 + 2 * gutter_px), 3 * (40 + 2 * gutter_px), 3)
        for index, tile in enumerate(tiles):
            x, y, w, h = layout.rect_px(index)
            assert np.array_equal(atlas[y : y + h, x : x + w], np.asarray(tile))
            uv = layout.uv_rect(index)
            # glTF UVs: top-left origin, v down, pixel edges.
            assert (uv["uv_min"][0] * width, uv["uv_min"][1] * height) == (x, y)
            assert (uv["uv_max"][0] * width, uv["uv_max"][1] * height) == (x + w, y + h)
            assert uv["uv_min_bottom_left"] == [uv["uv_min"][0], 1 - uv["uv_max"][1]]
            offset, scale = uv["khr_texture_transform"]["offset"], uv["khr_texture_transform"]["scale"]
            assert [o + s for o, s in zip(offset, scale)] == pytest.approx(uv["uv_max"])
            if gutter_px:  # the gutter continues the tile as if it repeated
                tiled = np.tile(np.asarray(tile), (3, 3, 1))
                cell = atlas[y - gutter_px : y + h + gutter_px, x - gutter_px : x + w + gutter_px]
                assert np.array_equal(cell, tiled[h - gutter_px : 2 * h + gutter_px, w - gutter_px : 2 * w + gutter_px])

    def test_repeat_preview_tiles_the_image(self):
        (tile,) = _distinct_tiles(1, (16, 24))
        preview = np.asarray(repeat_preview(tile))
        assert preview.shape == (48, 72, 3)
        for row in range(3):
            for col in range(3):
                assert np.array_equal(preview[16 * row : 16 * row + 16, 24 * col : 24 * col + 24], np.asarray(tile))

    def test_layout_errors(self):
        with pytest.raises(ConfigError, match="count"):
            AtlasLayout.for_tiles(0, (64, 64))
        with pytest.raises(ConfigError, match="columns = 4 exceeds"):
            AtlasLayout.for_tiles(3, (64, 64), columns=4)
        with pytest.raises(ConfigError, match="tile 1 is"):
            pack_atlas(_distinct_tiles(1, (8, 8)) + _distinct_tiles(1, (8, 16)), AtlasLayout.for_tiles(2, (8, 8)))


# --- clear errors for impossible layouts ------------------------------------------------------


class TestErrors:
    @pytest.mark.parametrize(
        "kind, options, message",
        [
            ("torus", {"height_px": 500}, "height_px = 500 is not a multiple of the VAE factor 8"),
            ("atlas", {"tile_width_px": 516}, "tile_width_px = 516 is not a multiple of the VAE factor 8"),
            ("torus", {"height_px": 256}, "smaller than one window"),
            ("torus", {"stride_latent": 64}, "no overlap"),
        ],
    )
    def test_impossible_sizes(self, kind, options, message):
        with pytest.raises(ConfigError, match=message):
            create("geometry", kind, **options).setup(8)

    def test_zero_tiles_and_too_many_columns(self):
        with pytest.raises(ConfigError, match="'tiles' = 0"):
            create("geometry", "atlas", tiles=0)
        with pytest.raises(ConfigError, match="columns"):
            create("geometry", "atlas", tiles=2, columns=3)

    def test_prompt_count_must_match_tiles(self, tiny_pipeline):
        atlas = create("geometry", "atlas", tiles=3)
        conditioner = create("conditioner", "tile_text", prompts=["grass", "rock"])
        with pytest.raises(ConfigError, match="prompts has 2 entries but geometry 'atlas' has 3 tiles"):
            JointDiffusion(tiny_pipeline, atlas, [conditioner])(num_inference_steps=1, progress=False)
        with pytest.raises(ConfigError, match="min_length|at least 1"):
            create("conditioner", "tile_text", prompts=[])

    def test_tile_text_counts_a_geometry_without_tiles_as_one(self, tiny_pipeline):
        grid = create("geometry", "grid", height_px=512, width_px=512)
        conditioner = create("conditioner", "tile_text", prompts=["grass", "rock"])
        with pytest.raises(ConfigError, match="geometry 'grid' has no tiles"):
            JointDiffusion(tiny_pipeline, grid, [conditioner])(num_inference_steps=1, progress=False)


# --- the docs page ------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "textures.md"


def test_docs_job_file_is_valid(tmp_path):
    from jointdiff.jobs.spec import Job

    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    (block,) = [b for b in blocks if 'name = "torus"' in b]  # the whole job (the mesh block is one table)
    (tmp_path / "job.toml").write_text(block)
    job = Job.from_toml(tmp_path / "job.toml")  # validates plugins, options and sizes
    assert job.geometry.name == "torus"


def test_docs_manifest_example_matches_the_layout():
    (block,) = re.findall(r"```json\n(.*?)```", DOCS.read_text(), re.S)
    example = json.loads(block)
    layout = AtlasLayout.for_tiles(4, (512, 512), gutter_px=example["gutter_px"])
    assert [example["height_px"], example["width_px"]] == list(layout.size_px)
    (tile,) = example["tiles"]
    x, y, w, h = layout.rect_px(tile["index"])
    assert tile["rect_px"] == {"x": x, "y": y, "width": w, "height": h}
    for key, value in layout.uv_rect(tile["index"]).items():
        expected = value if key != "khr_texture_transform" else [value["offset"], value["scale"]]
        shown = tile[key] if key != "khr_texture_transform" else [tile[key]["offset"], tile[key]["scale"]]
        assert np.allclose(shown, expected, atol=1e-5), key

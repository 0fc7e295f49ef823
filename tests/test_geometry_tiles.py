"""Strip and grid geometries: windows, coverage, round trips, wrap, errors."""

from __future__ import annotations

import pytest
import torch

from jointdiff.core.family import LatentFormat
from jointdiff.core.registry import create
from jointdiff.core.tiling import axis_starts, default_stride_latent, wrapped_segments
from jointdiff.testing.geometry import check_geometry
from jointdiff.utils.errors import ConfigError

FLUX_LIKE = LatentFormat(channels=16, scale_factor=8, patch=2, native_window=128)
"""A transformer's latent format: 2×2 patches, a native window of 128 cells (1024 px)."""


def built(name, **options):
    geometry = create("geometry", name, **options)
    geometry.setup(8)
    return geometry


def coverage(geometry):
    sheets, height, width = geometry.canvas_shape_latent
    counts = torch.zeros(sheets, 1, height, width)
    ids = list(range(geometry.num_windows))
    geometry.insert(counts, geometry.window_weights(ids), ids)
    return counts


@pytest.mark.parametrize(
    "name, options",
    [
        ("strip", dict(length_px=2048)),
        ("strip", dict(length_px=1000, stride_latent=7)),  # stride does not divide
        ("strip", dict(length_px=1536, direction="vertical", stride_latent=24)),
        ("strip", dict(length_px=512)),  # exactly one window
        ("grid", dict(height_px=640, width_px=904, stride_latent=16)),
        ("grid", dict(height_px=512, width_px=520, window_latent=32, stride_latent=32)),
    ],
)
def test_every_cell_covered_and_last_window_flush(name, options):
    geometry = built(name, **options)
    counts = coverage(geometry)
    assert counts.min() > 0
    _, height, width = geometry.canvas_shape_latent
    h, w = geometry.window_size_latent
    assert max(top for top, _ in geometry.origins) + h == height
    assert max(left for _, left in geometry.origins) + w == width


def test_strip_defaults_follow_multidiffusion():
    geometry = built("strip")
    assert geometry.canvas_shape_latent == (1, 64, 256)
    assert geometry.window_size_latent == (64, 64)
    assert [left for _, left in geometry.origins] == list(range(0, 256 - 64 + 1, 8))


def test_vertical_strip_is_transposed_horizontal_strip():
    vertical = built("strip", length_px=1024, direction="vertical")
    horizontal = built("strip", length_px=1024)
    assert vertical.canvas_shape_latent == (1, 128, 64)
    assert [(left, top) for top, left in vertical.origins] == horizontal.origins


@pytest.mark.parametrize("length_px, stride", [(1024, 8), (1000, 16), (960, 16), (768, 64)])
@pytest.mark.filterwarnings("ignore:wrapped width")
def test_wrap_covers_every_column_uniformly(length_px, stride):
    geometry = built("strip", length_px=length_px, stride_latent=stride, wrap=True)
    counts = coverage(geometry)
    assert torch.all(counts == counts.flatten()[0])
    used = geometry.stride_used_latent[1]
    assert used <= stride and (length_px // 8) % used == 0 and 64 % used == 0


def test_wrap_announces_a_reduced_stride():
    with pytest.warns(UserWarning, match="using stride 4 instead of 16"):
        built("strip", length_px=960 + 32, stride_latent=16, wrap=True)


def test_extract_insert_round_trip():
    for geometry in (built("grid", height_px=600, width_px=712, stride_latent=24), built("strip", length_px=832, wrap=True)):
        sheets, height, width = geometry.canvas_shape_latent
        canvas = torch.randn(sheets, 4, height, width, generator=torch.Generator().manual_seed(0))
        ids = list(range(geometry.num_windows))
        windows = geometry.extract(canvas, ids)
        assert windows.shape == (len(ids), 4, *geometry.window_size_latent)
        fused = torch.zeros_like(canvas)
        geometry.insert(fused, windows, ids)
        torch.testing.assert_close(fused / coverage(geometry), canvas)


def test_wrapped_window_reads_across_the_seam():
    geometry = built("strip", length_px=768, wrap=True)
    _, height, width = geometry.canvas_shape_latent
    canvas = torch.arange(width, dtype=torch.float32).expand(1, 4, height, width).contiguous()
    last = geometry.num_windows - 1
    top, left = geometry.origins[last]
    window = geometry.extract(canvas, [last])[0, 0, 0]
    expected = torch.tensor([(left + i) % width for i in range(64)], dtype=torch.float32)
    torch.testing.assert_close(window, expected)


def test_wrapped_segments_and_axis_starts():
    assert wrapped_segments(90, 20, 100) == [(90, 0, 10), (0, 10, 10)]
    assert wrapped_segments(10, 20, 100) == [(10, 0, 20)]
    assert axis_starts(100, 64, 16, False, "width") == ([0, 16, 32, 36], 16)
    assert axis_starts(96, 64, 16, True, "width") == (list(range(0, 96, 16)), 16)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("strip", dict(length_px=1001), "length_px = 1001 is not a multiple"),
        ("strip", dict(length_px=256), "smaller than one window"),
        ("grid", dict(height_px=512, width_px=300), "width_px = 300"),
        ("grid", dict(height_px=256, width_px=1024), "smaller than one window"),
        ("strip", dict(stride_latent=80), r"strip: stride_latent = 80 must not exceed the window \(64 latent cells\)"),
        ("grid", dict(window_latent=32, stride_latent=40), "stride_latent = 40 must not exceed the window"),
    ],
)
def test_bad_sizes_name_the_option(name, options, message):
    with pytest.raises(ConfigError, match=message):
        built(name, **options)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(stride_latent=0), "stride_latent"),
        (dict(stride_latent=-8), "stride_latent"),
        (dict(window_latent=0), "window_latent"),
        (dict(length_px="long"), "length_px"),
        (dict(direction="diagonal"), "direction"),
        (dict(spiral=True), "unknown option 'spiral'"),
    ],
)
def test_bad_options_fail_at_construction(options, message):
    with pytest.raises(ConfigError, match=message):
        create("geometry", "strip", **options)


@pytest.mark.filterwarnings("ignore:wrapped width")
def test_pixel_space_extract_matches_latent_windows_scaled():
    """A canvas-sized pixel input (condition image, mask) is cut with the latents' windows."""
    geometry = built("strip", length_px=832, stride_latent=24, wrap=True)
    _, height, width = geometry.canvas_shape_latent
    latent = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    pixels = torch.nn.functional.interpolate(latent, scale_factor=8, mode="nearest")
    ids = list(range(geometry.num_windows))
    expected = torch.nn.functional.interpolate(geometry.extract(latent, ids), scale_factor=8, mode="nearest")
    torch.testing.assert_close(geometry.extract(pixels, ids), expected)
    with pytest.raises(ValueError, match="not an integer multiple"):
        geometry.extract(torch.zeros(1, 3, height * 8, width * 8 + 1), ids)


def test_wrapped_strip_one_window_long_still_joins_its_ends():
    geometry = built("strip", length_px=512, stride_latent=16, wrap=True)
    assert [left for _, left in geometry.origins] == [0, 16, 32, 48]
    assert torch.all(coverage(geometry) == 4)


# ----------------------------------------------------------------------------- latent formats


def test_window_defaults_to_the_models_native_window():
    strip = create("geometry", "strip", length_px=2048)
    assert strip.options.window_latent is None and strip.options.stride_latent is None
    strip.setup(FLUX_LIKE)
    assert strip.window_size_latent == (128, 128)
    assert strip.canvas_shape_latent == (1, 128, 256)  # one native window across: 1024 px
    assert strip.stride_used_latent == (16, 16)  # window // 8
    assert [left for _, left in strip.origins] == list(range(0, 256 - 128 + 1, 16))
    grid = built("grid", height_px=1024, width_px=1024)
    assert grid.window_size_latent == (64, 64) and grid.stride_used_latent == (8, 8)  # SD as before


def test_default_stride_is_whole_patches():
    assert default_stride_latent(64) == 8
    assert default_stride_latent(128, patch=2) == 16
    assert default_stride_latent(24, patch=2) == 2  # 24 // 8 = 3 rounds down to one patch
    assert default_stride_latent(8, patch=2) == 2  # never less than one patch


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("strip", dict(window_latent=65), "strip: window_latent = 65 latent cells is not a whole number of 2×2 patches"),
        ("strip", dict(stride_latent=15), "strip: stride_latent = 15 latent cells is not a whole number of 2×2 patches"),
        ("grid", dict(height_px=1032, width_px=1024), "grid: height_px = 1032 is not a multiple of 16"),
        ("strip", dict(length_px=2056), "length_px = 2056 is not a multiple of 16"),
        ("torus", dict(window_latent=64, stride_latent=9), "torus: stride_latent = 9"),
        ("cube_texture", dict(face_px=1024, window_latent=64, stride_latent=7), "cube_texture: stride_latent = 7"),
        ("cube_texture", dict(face_px=1032, window_latent=64), "face_px = 1032 is not a multiple of 16"),
        ("equirect", dict(window_latent=33), "equirect: window_latent = 33"),
    ],
)
def test_sizes_that_are_not_whole_patches_name_the_option(name, options, message):
    geometry = create("geometry", name, **options)
    with pytest.raises(ConfigError, match=message):
        geometry.setup(FLUX_LIKE)


@pytest.mark.parametrize(
    "name, options",
    [
        ("strip", dict(length_px=8192, window_latent=4, stride_latent=4)),
        ("grid", dict(height_px=8192, width_px=8192, window_latent=1024)),
        ("cubemap", dict(window_latent=4)),
    ],
)
def test_window_outside_the_models_limits_is_refused(name, options):
    geometry = create("geometry", name, **options)
    with pytest.raises(ConfigError, match=rf"{name}: window_latent = {options['window_latent']} latent cells is outside"):
        geometry.setup(8)


@pytest.mark.filterwarnings("ignore:wrapped width")
@pytest.mark.parametrize(
    "options",
    [
        dict(length_px=1000, stride_latent=24),
        dict(length_px=832, stride_latent=24, wrap=True),
        dict(length_px=768, direction="vertical", wrap=True),
    ],
)
def test_window_origins_of_a_strip_match_its_crops(options):
    strip = built("strip", **options)
    origins = strip.window_origins_latent()
    assert origins.dtype == torch.long and tuple(origins.shape) == (strip.num_windows, 2)
    assert origins.tolist() == [list(o) for o in strip.origins]
    _, height, width = strip.canvas_shape_latent
    canvas = torch.randn(1, 2, height, width, generator=torch.Generator().manual_seed(0))
    h, w = strip.window_size_latent
    windows = strip.extract(canvas, list(range(strip.num_windows)))
    for window, (top, left) in zip(windows, origins.tolist()):
        crop = canvas[0].roll((-top, -left), dims=(-2, -1))[:, :h, :w]  # wraps past the edge
        assert torch.equal(window, crop)


@pytest.mark.filterwarnings("ignore:wrapped width")
def test_patched_wrap_uses_a_stride_of_whole_patches():
    # 6 and 18 share the divisor 3, but a stride of 3 cells is not whole 2×2 patches
    assert axis_starts(18, 6, 4, True, "width") == (list(range(0, 18, 3)), 3)
    assert axis_starts(18, 6, 4, True, "width", step=2) == (list(range(0, 18, 2)), 2)


@pytest.mark.filterwarnings("ignore:wrapped")
@pytest.mark.parametrize(
    "name, options",
    [
        ("strip", dict(length_px=1536, wrap=True)),
        ("grid", dict(height_px=768, width_px=1280, window_latent=64, stride_latent=32)),
        ("torus", dict(height_px=768, width_px=512, window_latent=32, stride_latent=16)),
        ("atlas", dict(tiles=2, tile_height_px=512, tile_width_px=512, window_latent=32, stride_latent=16)),
        ("cube_texture", dict(face_px=256, window_latent=16, stride_latent=8)),
        ("equirect", dict(width_px=512, window_latent=16)),
        ("cubemap", dict(face_px=128, window_latent=16)),
    ],
)
def test_geometries_conform_with_a_patched_latent_format(name, options):
    geometry = create("geometry", name, **options)
    check_geometry(geometry, FLUX_LIKE, atol=getattr(geometry, "round_trip_atol", 1e-5))
    assert all(side % FLUX_LIKE.patch == 0 for side in geometry.window_size_latent)
    origins = geometry.window_origins_latent()
    assert origins is None or bool((origins % FLUX_LIKE.patch == 0).all())

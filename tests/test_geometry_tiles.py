"""Strip and grid geometries: windows, coverage, round trips, wrap, errors."""

from __future__ import annotations

import pytest
import torch

from jointdiff.errors import ConfigError
from jointdiff.plugins import create
from jointdiff.tiling import axis_starts, wrapped_segments


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
        (dict(stride_latent=80), r"stride_latent \(80\) must not exceed window_latent \(64\)"),
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

"""Tests of the ring geometry: jointdiff's conformance checks plus the ring's own properties.

Run them after installing the package: ``pip install -e . && pytest``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy
import pytest
import torch
from jointdiff_ring import RingGeometry, ring_warp

from jointdiff import Job, JointDiffusion, create
from jointdiff.plugin import ConfigError, GeometryConformance, isolated_plugins, tiny_pipeline


# --8<-- [start:conformance]
class TestRingConformance(GeometryConformance):
    def make_geometry(self):
        return RingGeometry(**RingGeometry.example_options())


class TestTwoRowsConformance(GeometryConformance):
    def make_geometry(self):
        return RingGeometry(circumference_px=1216, thickness_px=384, window_latent=32, stride_latent=16)
# --8<-- [end:conformance]


# --8<-- [start:discovery]
def test_found_through_its_entry_point():
    with isolated_plugins() as manager:  # a fresh plugin manager, loading installed entry points
        assert manager.registry.get("geometry", "ring") is RingGeometry
# --8<-- [end:discovery]


def test_example_job_file_is_valid():
    with isolated_plugins():  # validates names and options, as `jointdiff run` does first
        job = Job.from_toml(Path(__file__).parents[1] / "ring.toml")
    assert job.geometry.name == "ring" and job.geometry.options["circumference_px"] == 4096


def test_two_rows_cover_the_thickness_flush_with_the_inner_edge():
    ring = RingGeometry(circumference_px=1216, thickness_px=384, window_latent=32, stride_latent=16)
    ring.setup(8)
    assert sorted({top for top, _ in ring.origins}) == [0, 16]  # 48 rows: windows at 0 and 48 - 32
    assert len({left for _, left in ring.origins}) == 152 // 8  # 8: largest divisor of 152 and 32 <= 16


def test_windows_wrap_across_the_seam():
    ring = RingGeometry(**RingGeometry.example_options())
    ring.setup(8)
    canvas = torch.arange(112.0).expand(1, 1, 32, 112)  # value = column
    last = ring.extract(canvas, [ring.num_windows - 1])[0, 0, 0]
    assert last.tolist() == [(96 + i) % 112 for i in range(32)]


def test_warp_puts_angles_clockwise_from_twelve_and_row_zero_outside():
    height, width = 64, 512
    column = torch.linspace(0, 1, width + 1)[:-1] + 0.5 / width  # value = column centre / width
    row = torch.linspace(0, 1, height + 1)[:-1] + 0.5 / height
    strip = torch.stack([column.expand(height, width), row[:, None].expand(height, width)])
    image, inside = ring_warp(strip)
    side = image.shape[-1]
    r_mid = width / (2 * math.pi)
    centre = side / 2
    at = lambda dy, dx: image[:, int(centre + dy), int(centre + dx)]  # noqa: E731
    assert at(0, r_mid)[0] == pytest.approx(0.25, abs=0.01)  # 3 o'clock: a quarter turn
    assert at(r_mid, 0)[0] == pytest.approx(0.50, abs=0.01)  # 6 o'clock
    assert at(0, -r_mid)[0] == pytest.approx(0.75, abs=0.01)  # 9 o'clock
    assert at(-r_mid - height / 2 + 1, 0)[1] == pytest.approx(0.0, abs=0.03)  # outer edge: row 0
    assert at(-r_mid + height / 2 - 1, 0)[1] == pytest.approx(1.0, abs=0.03)  # inner edge: last row
    assert not inside[int(centre), int(centre)] and inside[int(centre), int(centre + r_mid)]


def test_rejects_a_ring_without_a_hole():
    with pytest.raises(ConfigError, match="circumference_px"):
        RingGeometry(circumference_px=1024, thickness_px=512)


def test_rejects_sizes_that_do_not_fit_the_vae_factor():
    ring = RingGeometry(circumference_px=836, thickness_px=256, window_latent=32)
    with pytest.raises(ConfigError, match="circumference_px = 836"):
        ring.setup(8)


# --8<-- [start:end-to-end]
def test_runs_end_to_end_on_the_tiny_model():
    with isolated_plugins():  # plugins by name, as a job file names them
        ring = create("geometry", "ring", **RingGeometry.example_options())
        text = create("conditioner", "text", prompt="a wreath of flowers")
    result = JointDiffusion(tiny_pipeline(), ring, [text])(num_inference_steps=2, progress=False)
    assert result.latents.shape == (1, 4, 32, 112)
    assert result.pixels.shape == (1, 3, 256, 896)  # the unrolled strip
    image = result.images[0]
    alpha = numpy.asarray(image)[..., 3]
    assert image.mode == "RGBA" and image.width == image.height
    assert alpha[image.height // 2, image.width // 2] == 0  # the hole
    assert alpha[image.height // 2, image.width // 2 + 142] == 255  # the middle circle, r = 896 / 2pi
# --8<-- [end:end-to-end]

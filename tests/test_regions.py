"""Tests of the ``regions`` conditioner and of :mod:`jointdiff.core.masks` (tiny model, offline).

Small windows (16 latent cells = 128 px) keep the jobs cheap on a CPU.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from jointdiff import JointDiffusion
from jointdiff.core.context import StepState, WindowBatch
from jointdiff.core.masks import area_downsample, feather, polygon_mask, rectangle_mask
from jointdiff.core.registry import create
from jointdiff.testing import check_conditioner, make_context
from jointdiff.utils.errors import ConfigError
from jointdiff_plugins.regions import RegionsConditioner

STRIP = {"length_px": 256, "window_latent": 16, "stride_latent": 8}  # 128×256 px, three windows


def strip():
    return create("geometry", "strip", **STRIP)


def latents(job_geometry_shape=(1, 4, 16, 32), seed=0):
    return torch.randn(job_geometry_shape, generator=torch.Generator().manual_seed(seed))


def run(pipeline, conditioners, steps=3):
    job = JointDiffusion(pipeline, strip(), conditioners, view_batch_size=3)
    return job(steps, latents=latents(), progress=False, output_type="latent").latents


# -- a region over the whole canvas is the plain text job ---------------------------------------


def test_whole_canvas_region_equals_the_text_job(tiny_pipeline):
    """One region covering the canvas, with its own negative prompt and guidance scale, and
    bootstrapping on: the background gets weight 0 everywhere, and bootstrapping replaces
    nothing inside a mask, so the result is the text job of the region's prompt."""
    text = create("conditioner", "text", prompt="a red boat", negative_prompt="blurry", guidance_scale=5.0)
    expected = run(tiny_pipeline, [text])
    region = {"prompt": "a red boat", "rect": [0, 0, 256, 128], "negative_prompt": "blurry", "guidance_scale": 5.0}
    conditioner = RegionsConditioner(prompt="a calm lake", guidance_scale=7.5, regions=[region], bootstrap_steps=2)
    actual = run(tiny_pipeline, [conditioner])
    # The region prompts are encoded in one batch, the text job's alone: float rounding only.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    half = RegionsConditioner(prompt="a calm lake", regions=[{**region, "rect": [0, 0, 128, 128]}])
    assert (run(tiny_pipeline, [half], steps=1) - run(tiny_pipeline, [text], steps=1)).abs().max() > 1e-3


def test_prompt_has_one_branch_per_region_with_its_scale(tiny_pipeline):
    conditioner = RegionsConditioner(
        prompt="a lake", guidance_scale=7.5,
        regions=[{"prompt": "sky", "rect": [0, 0, 256, 40], "guidance_scale": 3.0}, {"prompt": "boat", "rect": [8, 8, 24, 24]}],
    )
    context = make_context(tiny_pipeline, strip())
    conditioner.setup(context)
    prompt = conditioner.prompt()
    assert prompt.branches == [0, 1, 2] and len(prompt.embeds) == 3
    assert prompt.guidance_scale.tolist() == [7.5, 3.0, 7.5]
    masks = prompt.region_masks
    assert masks.shape == (3, 1, 1, 16, 32)
    # MultiDiffusion's background: 1 - sum of the regions, clipped at 0.
    torch.testing.assert_close(masks[0], (1 - masks[1:].sum(0)).clamp(min=0))
    assert masks[1, 0, 0, :5].eq(1).all() and masks[1, 0, 0, 5:].eq(0).all()  # 40 px = 5 cells
    assert masks[2, 0, 0, 1:3, 1:3].eq(1).all() and masks[2].sum() == 4  # 16×16 px = 2×2 cells
    check_conditioner(RegionsConditioner(**RegionsConditioner.example_options()), make_context(tiny_pipeline))


# -- masks ----------------------------------------------------------------------------------


def test_masks_are_area_averaged_to_latent_cells():
    mask = rectangle_mask((16, 32), [4, 0, 20, 12])  # x from 4 to 20 px, y from 0 to 12 px
    latent = area_downsample(mask[None, None], 8)[0, 0]
    expected = torch.tensor([[0.5, 1.0, 0.5, 0.0], [0.25, 0.5, 0.25, 0.0]])
    torch.testing.assert_close(latent, expected)
    triangle = polygon_mask((64, 64), [[0, 0], [64, 0], [0, 64]])
    assert abs(float(triangle.sum()) - 64 * 64 / 2) < 0.25 * 64 * (2 + 2**0.5)  # area, to 1/4 px of outline
    assert triangle[5, 5] == 1 and triangle[60, 60] == 0 and 0 < triangle[40, 23] < 1  # antialiased diagonal
    square = polygon_mask((64, 64), [[10, 10], [30, 10], [30, 30], [10, 30]])
    assert (square - rectangle_mask((64, 64), [10, 10, 30, 30])).abs().sum() < 0.25 * 4 * 21


def test_feathering_blurs_symmetrically_and_keeps_the_mass():
    mask = rectangle_mask((64, 64), [16, 16, 48, 48])
    soft = feather(mask, 3.0)
    assert 0 < soft[16, 32] < 1 and soft[32, 32] > 0.99 and soft[0, 0] < 1e-3
    torch.testing.assert_close(soft, soft.flip(0).flip(1))
    assert abs(float(soft.sum() - mask.sum())) < 1e-3 * float(mask.sum())
    assert torch.equal(feather(mask, 0.0), mask)


def test_mask_images_and_prompt_lists(tiny_pipeline, tmp_path):
    pixels = np.zeros((128, 256), dtype=np.uint8)
    pixels[:, 128:] = 255
    Image.fromarray(pixels).save(tmp_path / "right.png")
    conditioner = RegionsConditioner(prompt="a lake", masks=[str(tmp_path / "right.png")], region_prompts=["mountains"])
    conditioner.setup(make_context(tiny_pipeline, strip()))
    masks = conditioner.prompt().region_masks
    assert masks[1, 0, 0, :, 16:].eq(1).all() and masks[1, 0, 0, :, :16].eq(0).all()
    assert conditioner.options.regions[0].prompt == "mountains"


# -- bootstrapping --------------------------------------------------------------------------


def test_bootstrapping_replaces_the_outside_by_a_noised_constant_colour(tiny_pipeline):
    """MultiDiffusion's bootstrapping: inside the mask the latents are kept; outside they are
    one of the encoded constant-colour backgrounds noised with the canvas's initial noise to
    the current timestep; the background branch and later steps are left alone."""
    conditioner = RegionsConditioner(prompt="a lake", regions=[{"prompt": "boat", "rect": [0, 0, 64, 128]}], bootstrap_steps=2)
    context = make_context(tiny_pipeline, strip())
    conditioner.setup(context)
    scheduler = copy.deepcopy(tiny_pipeline.scheduler)
    scheduler.set_timesteps(4)
    canvas = latents()
    context.initial_noise = canvas  # the engine sets the job's initial (unit) noise
    x = context.geometry.extract(latents(seed=1), [0, 1])
    state = lambda i: StepState(i, scheduler.timesteps[i], 4, canvas, None, context)  # noqa: E731
    assert torch.equal(conditioner.modify_latents(x, WindowBatch(0, (0, 1), scheduler, 0), state(0)), x)
    out = conditioner.modify_latents(x, WindowBatch(1, (0, 1), scheduler, 1), state(1))
    assert torch.equal(out[0, :, :, :8], x[0, :, :, :8])  # window 0, inside the 64 px region
    outside = out[:, :, :, 8:]
    noise = context.geometry.extract(canvas, [0, 1])[:, :, :, 8:]
    banks = [scheduler.add_noise(bg[None, :, :, 8:], noise, scheduler.timesteps[1:2]) for bg in conditioner._backgrounds]
    for row in range(2):
        assert any(torch.allclose(outside[row], bank[row], atol=1e-6) for bank in banks)
    assert conditioner._backgrounds.shape == (2, 4, 16, 16)  # a bank of bootstrap_steps colours
    assert torch.equal(conditioner.modify_latents(x, WindowBatch(1, (0, 1), scheduler, 1), state(2)), x)


# -- errors ---------------------------------------------------------------------------------


def setup_error(pipeline, **options):
    with pytest.raises(ConfigError) as info:
        RegionsConditioner(**options).setup(make_context(pipeline, strip()))
    return str(info.value)


def test_masks_that_do_not_fit_the_canvas(tiny_pipeline, tmp_path):
    Image.new("L", (512, 128), 255).save(tmp_path / "wide.png")
    message = setup_error(tiny_pipeline, prompt="a", regions=[{"prompt": "b", "mask": str(tmp_path / "wide.png")}])
    assert "512×128 px" in message and "256×128 px" in message and "regions[0]" in message
    message = setup_error(tiny_pipeline, prompt="a", regions=[{"prompt": "b", "rect": [300, 0, 400, 128]}])
    assert "empty" in message and "'b'" in message
    assert "empty" in setup_error(tiny_pipeline, prompt="a", masks=[torch.zeros(128, 256)], region_prompts=["b"])
    assert "[0, 1]" in setup_error(tiny_pipeline, prompt="a", masks=[torch.full((128, 256), 2.0)], region_prompts=["b"])
    assert "sheet = 1" in setup_error(tiny_pipeline, prompt="a", regions=[{"prompt": "b", "rect": [0, 0, 8, 8], "sheet": 1}])


@pytest.mark.parametrize(
    "options, words",
    [
        ({"masks": [torch.ones(8, 8)] * 2, "region_prompts": ["b"]}, ["2 masks", "1 prompts"]),
        ({"regions": [{"prompt": "b"}]}, ["exactly one of rect, polygon or mask", "none"]),
        ({"regions": [{"prompt": "b", "rect": [0, 0, 8, 8], "polygon": [[0, 0], [1, 0], [0, 1]]}]}, ["exactly one", "rect", "polygon"]),
        ({"regions": [{"prompt": "b", "rect": [0, 0, 8]}]}, ["rect", "[left, top, right, bottom]"]),
        ({"regions": [{"prompt": "b", "mask": "nowhere.png"}]}, ["no such mask image", "nowhere.png"]),
        ({"regions": []}, ["regions"]),
        ({"regions": [{"prompt": "b", "rect": [0, 0, 8, 8]}], "bootstrap_steps": -1}, ["bootstrap_steps"]),
    ],
)
def test_invalid_options(options, words):
    with pytest.raises(ConfigError) as info:
        RegionsConditioner(prompt="a lake", **options)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_degenerate_shapes(tiny_pipeline):
    assert "right > left" in setup_error(tiny_pipeline, prompt="a", regions=[{"prompt": "b", "rect": [10, 0, 5, 8]}])
    assert "three [x, y]" in setup_error(tiny_pipeline, prompt="a", regions=[{"prompt": "b", "polygon": [[0, 0], [5, 5]]}])


def test_example_layout_job_validates_and_leaves_no_cell_without_a_prompt(monkeypatch):
    from pathlib import Path

    from jointdiff.jobs.spec import Job

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    geometry, (regions,), _ = Job.from_toml(root / "examples" / "regions_layout.toml").build_plugins()
    masks = regions.canvas_masks(geometry)
    assert masks.shape == (4, 1, 1, 64, 128)
    assert bool((masks.sum(0) >= 1 - 1e-6).all())  # the background fills what the regions leave
    assert masks[1, 0, 0, 0].min() > 0.99 and masks[3, 0, 0, -1].min() > 0.99  # sky on top, lake below

"""Tests of the ``controlnet`` conditioner (tiny model, tiny random ControlNet, offline).

- A canvas of one window equals diffusers' ``StableDiffusionControlNetPipeline`` (one and two
  ControlNets, scales, guidance start/end) on the same components, latents and condition.
- Every window gets the ControlNet residuals of its own crop of the condition, in every
  batch layout, including the synchronization pass of ``syncdiffusion`` (ControlSync).
- Canny preprocessing, the example job, and the errors a user can cause.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jointdiff import JointDiffusion
from jointdiff.core.family import Embeddings
from jointdiff.core.registry import create
from jointdiff.models.tiny import tiny_controlnet, tiny_unet
from jointdiff.testing import check_conditioner, make_context
from jointdiff.utils.errors import ConfigError
from jointdiff_plugins.controlnet import ControlNetConditioner

ROOT = Path(__file__).resolve().parents[1]
CITY = ROOT / "examples" / "assets" / "canny_city_512x3072.png"
PROMPT = "a beautiful city on a sunny day"


@pytest.fixture(scope="module")
def controlnets(tiny_pipeline):
    return tiny_controlnet(tiny_pipeline.unet, seed=0), tiny_controlnet(tiny_pipeline.unet, seed=1)


def city(width_px: int, height_px: int, left_px: int = 0) -> Image.Image:
    with Image.open(CITY) as image:
        return image.crop((left_px, 0, left_px + width_px, height_px)).convert("RGB")


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_job(pipeline, size_px, conditioners, latents, steps=2):
    geometry = create("geometry", "strip", length_px=size_px, window_latent=size_px // 8)
    text = create("conditioner", "text", prompt=PROMPT, negative_prompt="blurry", guidance_scale=7.5)
    job = JointDiffusion(pipeline, geometry, [text, *conditioners])
    return job(steps, latents=latents, progress=False, output_type="latent").latents


def diffusers_controlnet(pipeline, controlnet, image, size_px, latents, steps=2, **kwargs):
    from diffusers import StableDiffusionControlNetPipeline

    reference = StableDiffusionControlNetPipeline(**pipeline.components, controlnet=controlnet)
    reference.set_progress_bar_config(disable=True)
    return reference(
        PROMPT, negative_prompt="blurry", image=image, height=size_px, width=size_px, num_inference_steps=steps,
        guidance_scale=7.5, latents=latents.clone(), output_type="latent", **kwargs,
    ).images


# -- equality with diffusers ------------------------------------------------------------------


def test_single_window_equals_diffusers_controlnet_pipeline(tiny_pipeline, controlnets):
    """512 px, two DDIM steps; guidance_end 0.5 keeps the ControlNet for step 0 only."""
    image, latents = city(512, 512), noise((1, 4, 64, 64))
    options = dict(conditioning_scale=0.7, guidance_end=0.5)
    expected = diffusers_controlnet(
        tiny_pipeline, controlnets[0], image, 512, latents,
        controlnet_conditioning_scale=0.7, control_guidance_end=0.5,
    )
    actual = run_job(tiny_pipeline, 512, [ControlNetConditioner(model=controlnets[0], image=image, **options)], latents)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    plain = run_job(tiny_pipeline, 512, [], latents)
    assert (plain - expected).abs().max() > 1e-2  # the ControlNet did change the result


def test_two_controlnets_equal_diffusers_multicontrolnet(tiny_pipeline, controlnets):
    """Residuals of several ControlNets add up, each with its image, scale and step range."""
    images, latents = [city(256, 256), city(256, 256, left_px=900)], noise((1, 4, 32, 32), seed=1)
    expected = diffusers_controlnet(
        tiny_pipeline, list(controlnets), images, 256, latents, steps=3,
        controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.3], control_guidance_end=[0.7, 1.0],
    )
    controls = [
        {"model": controlnets[0], "image": images[0], "conditioning_scale": 1.0, "guidance_end": 0.7},
        {"model": controlnets[1], "image": images[1], "conditioning_scale": 0.5, "guidance_start": 0.3},
    ]
    actual = run_job(tiny_pipeline, 256, [ControlNetConditioner(controls=controls)], latents, steps=3)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# -- each window its own condition --------------------------------------------------------------


def test_batches_get_the_rows_of_their_windows(tiny_pipeline, controlnets, tmp_path):
    """jointdiff's conformance checks (row layout of every batch size and guidance branch,
    options round trip), and window k's residuals are the ControlNet's on the crop of the
    condition under window k. ``model = "tiny"`` builds ``controlnets[0]`` (same seed)."""
    context = make_context(tiny_pipeline)  # a 256×512 px strip of three 256 px windows
    pixels = torch.randint(0, 256, (256, 512, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "condition.png")
    image = pixels.permute(2, 0, 1).float() / 255.0
    conditioner = ControlNetConditioner(model="tiny", image=str(tmp_path / "condition.png"))
    check_conditioner(conditioner, context)
    latents, states = noise((1, 4, 32, 32), seed=3), noise((1, 77, 32), seed=4)
    t = tiny_pipeline.scheduler.timesteps[0]
    for window_id, (top, left) in enumerate(context.geometry.origins):
        got = conditioner.model_kwargs(latents, t, Embeddings({"prompt_embeds": states}), [window_id], context)
        crop = image[None, :, 8 * top : 8 * top + 256, 8 * left : 8 * left + 256]
        down, mid = controlnets[0](latents, t, encoder_hidden_states=states, controlnet_cond=crop, return_dict=False)
        torch.testing.assert_close(got["mid_block_additional_residual"], mid)
        for ours, theirs in zip(got["down_block_additional_residuals"], down, strict=True):
            torch.testing.assert_close(ours, theirs)


class _MeanSquare(torch.nn.Module):
    """A cheap stand-in for LPIPS: per-sample mean squared difference."""

    def forward(self, images, anchor):
        return ((images - anchor) ** 2).mean(dim=(1, 2, 3))


def test_controlsync_sync_pass_uses_each_windows_condition(fresh_tiny_pipeline, controlnets):
    """In the synchronization pass (gradient through x̂0), the ControlNet evaluated right
    before each UNet call gets the condition crops of exactly the windows being moved, and
    the UNet receives that ControlNet's residuals."""
    pipeline = fresh_tiny_pipeline
    geometry = create("geometry", "strip", length_px=256, window_latent=16, stride_latent=8)  # 3 windows
    image = torch.rand(3, 128, 256, generator=torch.Generator().manual_seed(5))
    control = ControlNetConditioner(model=controlnets[0], image=image)
    sync = create("synchronizer", "syncdiffusion", preset="controlsync", lpips_module=_MeanSquare(), micro_batch=2)
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=7.5)
    events, moved = [], []
    controlnet, unet = controlnets[0], pipeline.unet
    hooks = [
        controlnet.register_forward_hook(lambda m, a, k, out: events.append(("cn", k["controlnet_cond"].detach(), out)), with_kwargs=True),
        unet.register_forward_hook(lambda m, a, k, out: events.append(("unet", torch.is_grad_enabled(), k)), with_kwargs=True),
    ]
    gradient = sync.gradient
    sync.gradient = lambda latents, ids, *rest: moved.append(list(ids)) or gradient(latents, ids, *rest)
    try:
        JointDiffusion(pipeline, geometry, [text, control], sync, view_batch_size=3)(1, progress=False, output_type="latent")
    finally:
        for hook in hooks:
            hook.remove()
    assert moved == [[1, 2]]  # ControlSync's anchor is window 0: it is not moved
    passes = [i for i, e in enumerate(events) if e[0] == "unet" and e[1]]
    assert len(passes) == 1 and events[passes[0] - 1][0] == "cn"
    _, condition, (down, mid) = events[passes[0] - 1]
    crops = [image[:, :, 64 * w : 64 * w + 128] for w in moved[0]]
    torch.testing.assert_close(condition, torch.stack(crops * 2))  # [uncond windows..., cond windows...]
    passed = events[passes[0]][2]
    assert passed["mid_block_additional_residual"] is mid
    assert all(a is b for a, b in zip(passed["down_block_additional_residuals"], down, strict=True))


# -- preprocessing and the example job ----------------------------------------------------------


def test_canny_preprocessing_finds_the_edges_of_a_photo(tiny_pipeline):
    photo = np.zeros((256, 512, 3), dtype=np.uint8)
    photo[64:192, 128:384] = (200, 120, 40)  # a coloured rectangle on black
    conditioner = ControlNetConditioner(model="tiny", image=Image.fromarray(photo), preprocess="canny")
    conditioner.setup(make_context(tiny_pipeline))
    edges = conditioner._controls[0].image[0]
    assert edges.shape == (3, 256, 512) and torch.equal(edges[0], edges[2])
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    on = edges[0].nonzero()
    near_border = ((on[:, 0] - 64).abs() <= 1) | ((on[:, 0] - 191).abs() <= 1) | ((on[:, 1] - 128).abs() <= 1) | ((on[:, 1] - 383).abs() <= 1)
    assert near_border.all() and len(on) >= 2 * (128 + 256) - 4  # the whole outline, no texture


def test_example_controlsync_job_validates(monkeypatch):
    from jointdiff.jobs.spec import Job

    monkeypatch.chdir(ROOT)
    job = Job.from_toml(ROOT / "examples" / "controlsync_city.toml")
    _, conditioners, synchronizer = job.build_plugins()
    control = next(c for c in conditioners if c.name == "controlnet")
    assert control.options.controls[0].model == "lllyasviel/sd-controlnet-canny"
    assert (synchronizer.options.w, synchronizer.options.decay, synchronizer.options.until_step) == (20.0, 0.95, 10)
    assert job.steps == 50 and job.model.scheduler == "ddim"


# -- errors -------------------------------------------------------------------------------------


def setup_error(pipeline, **options):
    with pytest.raises(ConfigError) as info:
        ControlNetConditioner(**options).setup(make_context(pipeline))
    return str(info.value)


def test_condition_of_the_wrong_size_or_channels(tiny_pipeline):
    assert "256×512 px (w×h)" in setup_error(tiny_pipeline, model="tiny", image=torch.rand(3, 512, 256))
    message = setup_error(tiny_pipeline, model="tiny", image=torch.rand(3, 256, 256))
    assert "256×256 px" in message and "512×256 px" in message
    for channels in (2, 4):
        assert f"{channels} channels" in setup_error(tiny_pipeline, model="tiny", image=torch.rand(channels, 256, 512))
    assert "sheet" in setup_error(tiny_pipeline, model="tiny", image=[torch.rand(3, 256, 512)] * 2)


def test_unknown_controlnet_types_are_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="unknown ControlNet type UNet2DConditionModel"):
        ControlNetConditioner(model=tiny_unet(), image=torch.rand(3, 8, 8))
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ConfigError, match="unknown ControlNet type 'UNet2DConditionModel'"):
        ControlNetConditioner(model=str(tmp_path), image=torch.rand(3, 8, 8))
    with pytest.raises(ConfigError, match="single-file"):
        ControlNetConditioner(model="./control_v11p_sd15_canny.pth", image=torch.rand(3, 8, 8))


@pytest.mark.parametrize(
    "options, words",
    [
        ({"model": "tiny", "image": "missing.png"}, ["no such image file", "missing.png"]),
        ({"model": "tiny", "image": "x", "guidance_start": 0.6, "guidance_end": 0.4}, ["guidance_start", "guidance_end"]),
        ({"model": "tiny", "image": "x", "controls": []}, ["either controls", "not both"]),
        ({"controls": []}, ["controls"]),
        ({"model": "tiny", "image": "x", "conditioning_scale": -1}, ["conditioning_scale"]),
        ({"model": "tiny", "image": "x", "preprocess": "hed"}, ["preprocess", "hed"]),
    ],
)
def test_invalid_options(options, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "x", format="PNG")  # exists: the cases are about other options
    with pytest.raises(ConfigError) as info:
        ControlNetConditioner(**options)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_controlnet_must_fit_the_unet_and_be_alone(tiny_pipeline):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**tiny_pipeline.unet.config, "cross_attention_dim": 64})
    message = setup_error(tiny_pipeline, model=tiny_controlnet(other), image=torch.rand(3, 256, 512))
    assert "cross_attention_dim" in message
    text = create("conditioner", "text", prompt="a city")
    twice = [text] + [ControlNetConditioner(model="tiny", image=torch.rand(3, 256, 512)) for _ in range(2)]
    job = JointDiffusion(tiny_pipeline, create("geometry", "strip", length_px=512, window_latent=32), twice)
    with pytest.raises(ConfigError, match="one 'controlnet' conditioner"):
        job(1, progress=False, output_type="latent")


def test_condition_follows_a_resampling_geometry(tiny_pipeline):
    """On the ``equirect`` geometry the condition is resampled for every perspective view at
    pixel resolution (k = 8), exactly as the geometry resamples a canvas-sized tensor."""
    geometry = create("geometry", "equirect", width_px=512, window_latent=16)
    context = make_context(tiny_pipeline, geometry)
    image = torch.rand(3, 256, 512, generator=torch.Generator().manual_seed(6))
    conditioner = ControlNetConditioner(model="tiny", image=image)
    conditioner.setup(context)
    seen = []
    hook = conditioner._controls[0].model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["controlnet_cond"]), with_kwargs=True
    )
    try:
        states = Embeddings({"prompt_embeds": noise((2, 77, 32))})
        conditioner.model_kwargs(noise((2, 4, 16, 16)), torch.tensor(500), states, [0, 5], context)
    finally:
        hook.remove()
    expected = geometry.extract(image[None], [0, 5])
    assert seen[0].shape == (2, 3, 128, 128)
    torch.testing.assert_close(seen[0], expected)
    assert (expected[0] - expected[1]).abs().mean() > 0.1  # two views see different parts


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # diffusers' own call
def test_a_model_that_cannot_be_loaded_says_which(tiny_pipeline):
    from jointdiff.utils.errors import ModelLoadError

    conditioner = ControlNetConditioner(model="jointdiff-tests/no-such-controlnet", image=torch.rand(3, 256, 512))
    with pytest.raises(ModelLoadError, match="could not load ControlNet 'jointdiff-tests/no-such-controlnet'"):
        conditioner.setup(make_context(tiny_pipeline))

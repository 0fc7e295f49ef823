"""The SDXL family against the stock diffusers pipelines on tiny random models (offline, CPU)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_close_to_stock as assert_close

from jointdiff import JointDiffusion, create
from jointdiff.models.families.sdxl import (
    StableDiffusionXL,
    build_tiny_pipeline,
    build_tiny_refiner_pipeline,
    guidance_embedding,
)
from jointdiff.testing import OneWindowGeometry
from jointdiff.utils.errors import ConfigError

PROMPT = "a photo of a lighthouse"
SIZE = (16, 24)  # latent cells of a non-square window: 128 × 192 px
STEPS = 2


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def family(pipe):
    return StableDiffusionXL(pipe)


def initial_latents(seed: int = 1) -> torch.Tensor:
    return torch.randn((1, 4, *SIZE), generator=torch.Generator().manual_seed(seed))


def engine_window(family, noise, negative=None, guidance_scale=5.0, conditioners=()):
    """The real engine on one window from unit ``noise`` ``(1, 4, h, w)``, with the ``text``
    conditioner (and ``conditioners``); returns the final latents."""
    text = create("conditioner", "text", prompt=PROMPT, negative_prompt=negative, guidance_scale=guidance_scale)
    job = JointDiffusion(family, OneWindowGeometry(noise.shape[-2:]), [text, *conditioners])
    return job(STEPS, latents=noise.clone(), output_type="latent", progress=False).latents


def stock_latents(pipeline, noise, **kwargs):
    h, w = noise.shape[-2:]
    with torch.no_grad():
        return pipeline(
            PROMPT, height=8 * h, width=8 * w, num_inference_steps=STEPS, latents=noise.clone(),
            output_type="latent", **kwargs,
        ).images


@pytest.mark.parametrize("negative", [None, "", "blurry"])
def test_one_window_equals_stock_pipeline(pipe, family, negative):
    """CFG 5.0; no negative prompt = zeroed unconditional rows (force_zeros_for_empty_prompt),
    while "" is encoded, as the stock pipeline does."""
    noise = initial_latents()
    _, neg = family.encode_prompts([PROMPT], [negative])
    assert (neg["prompt_embeds"].abs().max() == 0) == (negative is None)
    assert (neg["pooled_prompt_embeds"].abs().max() == 0) == (negative is None)
    ours = engine_window(family, noise, negative, guidance_scale=5.0)
    stock = stock_latents(pipe, noise, negative_prompt=negative, guidance_scale=5.0)
    assert_close(ours, stock)


def test_controlnet_window_equals_stock_pipeline(pipe, family):
    from diffusers import StableDiffusionXLControlNetPipeline

    controlnet = family.tiny_controlnet(seed=3)
    noise = initial_latents()
    condition = torch.rand((1, 3, 8 * SIZE[0], 8 * SIZE[1]), generator=torch.Generator().manual_seed(4))
    control = create("conditioner", "controlnet", model=controlnet, image=condition, conditioning_scale=0.8)
    ours = engine_window(family, noise, "blurry", conditioners=[control])
    stock_pipe = StableDiffusionXLControlNetPipeline(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)}, controlnet=controlnet)
    stock = stock_latents(stock_pipe, noise, negative_prompt="blurry", image=condition, controlnet_conditioning_scale=0.8)
    assert_close(ours, stock)
    plain = engine_window(family, noise, "blurry")
    assert (ours - plain).abs().max() > 1e-3  # the residuals matter


def test_lcm_distilled_guidance_equals_stock_pipeline():
    pipeline = build_tiny_pipeline(time_cond_proj_dim=8)
    family = StableDiffusionXL(pipeline)
    assert family.guidance_mode == "distilled"
    _, negative = family.encode_prompts([PROMPT], [""])
    assert negative is None
    noise = initial_latents()
    ours = engine_window(family, noise, guidance_scale=3.0)
    assert_close(ours, stock_latents(pipeline, noise, guidance_scale=3.0))
    with pytest.raises(ConfigError, match="negative_prompts.*blurry"):
        family.encode_prompts([PROMPT], ["blurry"])
    w = torch.tensor([1.5, 3.0, 8.0])
    assert torch.allclose(guidance_embedding(w, 9), pipeline.get_guidance_scale_embedding(w - 1, 9), atol=1e-5)


def test_refiner_aesthetic_window_equals_stock_pipeline():
    """Refiner-style micro-conditioning, CLIP-G only, "" encoded (no force_zeros): img2img at
    strength 1 from the same noise is plain text-to-image."""
    pipeline = build_tiny_refiner_pipeline()
    family = StableDiffusionXL(pipeline)
    noise = initial_latents()
    positive, negative = family.encode_prompts([PROMPT], [""])
    assert negative["prompt_embeds"].abs().max() > 0
    assert negative["aesthetic_score"].item() == 2.5 and positive["aesthetic_score"].item() == 6.0
    ours = engine_window(family, noise, guidance_scale=5.0)  # no negative prompt: "" encoded
    scheduler = copy.deepcopy(pipeline.scheduler)
    scheduler.set_timesteps(STEPS)  # img2img takes `latents` as they are: scale them as text-to-image does
    with torch.no_grad():
        stock = pipeline(
            PROMPT, image=torch.zeros(1, 3, 64, 64), strength=1.0, num_inference_steps=STEPS,
            latents=noise * scheduler.init_noise_sigma, output_type="latent", guidance_scale=5.0,
        ).images
    assert_close(ours, stock)


def test_window_time_ids_of_non_square_window(pipe, family):
    ids = family.window_time_ids(SIZE, torch.device("cpu"), torch.float32)
    assert ids.tolist() == [[128.0, 192.0, 0.0, 0.0, 128.0, 192.0]]
    stock = pipe._get_add_time_ids((128, 192), (0, 0), (128, 192), torch.float32, pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(ids, stock)
    assert family.window_time_ids(SIZE, torch.device("cpu"), torch.float32) is ids  # cached
    positive, _ = family.encode_prompts([PROMPT, "b", "c"])
    cond = family.added_cond(positive, (8, 32), torch.float32)
    assert cond["time_ids"].tolist() == [[64.0, 256.0, 0.0, 0.0, 64.0, 256.0]] * 3


def test_facts_and_vae_round_trip(pipe, family):
    fmt = family.latent_format
    assert (fmt.channels, fmt.scale_factor, fmt.patch, fmt.native_window) == (4, 8, 1, 128)
    assert fmt.native_window * fmt.scale_factor == pipe.default_sample_size * pipe.vae_scale_factor
    assert StableDiffusionXL.accepts(pipe) and StableDiffusionXL.tiny_autoencoder == "madebyollin/taesdxl"
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(family.from_vae_latents(family.to_vae_latents(x)), x, atol=1e-6)
    v = torch.randn(2, 4, 8, 8)
    scheduler = copy.deepcopy(pipe.scheduler)
    family.set_timesteps(scheduler, STEPS, (8, 8))
    t = scheduler.timesteps[0]
    assert torch.allclose(family.output_from_x0(x, family.predicted_x0(x, v, t, scheduler), t, scheduler), v, atol=1e-4)
    with torch.no_grad():
        assert family.decode(x[:1]).shape == (1, 3, 64, 64)


def test_bad_inputs(family):
    with pytest.raises(ConfigError, match="window_size = 300 latent cells"):
        family.latent_format.check_window(300, "window_size", "geometry")
    with pytest.raises(ConfigError, match="negative_prompts"):
        family.encode_prompts(["a", "b"], ["x"])
    with pytest.raises(ConfigError, match="positions"):
        StableDiffusionXL(family.pipeline, positions="canvas")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        family.encode_prompts(["word " * 80 + "elephant giraffe"])
    assert any("elephant giraffe" in str(w.message) for w in caught)

"""The SDXL family against the stock diffusers pipelines on tiny random models (offline, CPU)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from jointdiff.errors import ConfigError
from jointdiff.families.base import Embeddings
from jointdiff.families.sdxl import (
    StableDiffusionXL,
    build_tiny_pipeline,
    build_tiny_refiner_pipeline,
    guidance_embedding,
)

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


def denoise_window(family, scheduler, noise, positive, negative=None, guidance_scale=5.0, control=None):
    """One window denoised with the family's methods only (the engine's per-step calls).
    ``control``: ``(controlnet, condition (1, 3, H, W), scale)``. ``noise`` is unit Gaussian."""
    scheduler = copy.deepcopy(scheduler)
    family.set_timesteps(scheduler, STEPS, tuple(noise.shape[-2:]))
    x = noise * family.initial_noise_sigma(scheduler)
    cfg = family.guidance_mode == "cfg" and negative is not None and guidance_scale > 1
    embeds = Embeddings.cat([negative, positive]) if cfg else positive
    distilled = torch.full((len(x),), guidance_scale) if family.guidance_mode == "distilled" else None
    for t in scheduler.timesteps:
        x_in = family.scale_model_input(x, t, scheduler)
        x_in = torch.cat([x_in, x_in]) if cfg else x_in
        extra = None
        if control is not None:
            controlnet, condition, scale = control
            condition = family.control_condition(controlnet, condition).expand(len(x_in), -1, -1, -1)
            extra = family.controlnet_kwargs(controlnet, x_in, t, embeds, condition, scale)
        with torch.no_grad():
            out = family.forward(x_in, t, embeds, guidance_scale=distilled, extra=extra)
        if cfg:
            uncond, cond = out.chunk(2)
            out = family.combine_guidance(uncond, cond, guidance_scale)
        x = scheduler.step(out, t, x).prev_sample
    return x


def assert_close(ours: torch.Tensor, stock: torch.Tensor, rtol: float = 1e-4) -> None:
    diff = (ours - stock).abs().max().item()
    scale = stock.abs().max().item()
    assert diff <= rtol * scale, f"max abs diff {diff:.3g} vs max |stock| {scale:.3g}"


def stock_latents(pipeline, noise, **kwargs):
    h, w = noise.shape[-2:]
    with torch.no_grad():
        return pipeline(
            PROMPT, height=8 * h, width=8 * w, num_inference_steps=STEPS, latents=noise.clone(),
            output_type="latent", **kwargs,
        ).images


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_one_window_equals_stock_pipeline(pipe, family, negative):
    """CFG 5.0; no negative prompt = zeroed unconditional rows (force_zeros_for_empty_prompt)."""
    noise = initial_latents()
    positive, neg = family.encode_prompts([PROMPT], [negative or ""])
    if negative is None:
        assert neg["prompt_embeds"].abs().max() == 0 and neg["pooled_prompt_embeds"].abs().max() == 0
    ours = denoise_window(family, pipe.scheduler, noise, positive, neg, guidance_scale=5.0)
    stock = stock_latents(pipe, noise, negative_prompt=negative, guidance_scale=5.0)
    assert_close(ours, stock)


def test_controlnet_window_equals_stock_pipeline(pipe, family):
    from diffusers import StableDiffusionXLControlNetPipeline

    controlnet = family.tiny_controlnet(seed=3)
    noise = initial_latents()
    condition = torch.rand((1, 3, 8 * SIZE[0], 8 * SIZE[1]), generator=torch.Generator().manual_seed(4))
    positive, neg = family.encode_prompts([PROMPT], ["blurry"])
    ours = denoise_window(family, pipe.scheduler, noise, positive, neg, control=(controlnet, condition, 0.8))
    stock_pipe = StableDiffusionXLControlNetPipeline(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)}, controlnet=controlnet)
    stock = stock_latents(stock_pipe, noise, negative_prompt="blurry", image=condition, controlnet_conditioning_scale=0.8)
    assert_close(ours, stock)
    plain = denoise_window(family, pipe.scheduler, noise, positive, neg)
    assert (ours - plain).abs().max() > 1e-3  # the residuals matter


def test_lcm_distilled_guidance_equals_stock_pipeline():
    pipeline = build_tiny_pipeline(time_cond_proj_dim=8)
    family = StableDiffusionXL(pipeline)
    assert family.guidance_mode == "distilled"
    positive, negative = family.encode_prompts([PROMPT], [""])
    assert negative is None
    noise = initial_latents()
    ours = denoise_window(family, pipeline.scheduler, noise, positive, guidance_scale=3.0)
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
    ours = denoise_window(family, pipeline.scheduler, noise, positive, negative, guidance_scale=5.0)
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

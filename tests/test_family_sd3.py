"""The SD3 / SD3.5 model family against the stock diffusers pipelines (tiny models, offline)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_close_to_stock as assert_close

from jointdiff import JointDiffusion, create
from jointdiff.models.families.sd3 import SD3Family, build_tiny_pipeline, build_tiny_sd35_pipeline
from jointdiff.testing import OneWindowGeometry
from jointdiff.utils.errors import ConfigError

PROMPT, NEGATIVE = "a photo of a cat in the city", "blurry"


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def family(pipe):
    return SD3Family(pipe)


def noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def engine_window(family, latents, steps, guidance, negative=None, conditioners=()):
    """The real engine on one window from unit noise ``latents`` ``(1, 16, h, w)``, with the
    ``text`` conditioner (and ``conditioners``); returns the final latents."""
    text = create("conditioner", "text", prompt=PROMPT, negative_prompt=negative, guidance_scale=guidance)
    job = JointDiffusion(family, OneWindowGeometry(latents.shape[-2:]), [text, *conditioners])
    return job(steps, latents=latents.clone(), output_type="latent", progress=False).latents


@pytest.mark.parametrize("build", [build_tiny_pipeline, build_tiny_sd35_pipeline], ids=["sd3", "sd3.5"])
def test_one_window_equals_stock_pipeline(build):
    """A non-square 16×24-cell window with CFG and a negative prompt equals the stock pipeline."""
    pipe = build()
    family = SD3Family(pipe)
    latents = noise(1, 16, 16, 24)
    ours = engine_window(family, latents, steps=2, guidance=5.0, negative=NEGATIVE)
    ref = pipe(
        PROMPT, negative_prompt=NEGATIVE, height=128, width=192, num_inference_steps=2, guidance_scale=5.0,
        latents=latents.clone(), output_type="latent",
    ).images  # fmt: skip
    assert_close(ours, ref)


def test_dynamic_shift_uses_window_tokens(pipe):
    """With ``use_dynamic_shifting`` the stock pipeline passes ``mu`` of the image's token count
    (no sigmas); the family computes it for the window; without it, no ``mu`` and no sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    family = SD3Family(pipe)
    assert family.default_sigmas(4) is None
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=64, max_image_seq_len=1024)
    stock = StableDiffusion3Pipeline(**{**pipe.components, "scheduler": dynamic})
    stock("x", height=128, width=192, num_inference_steps=3, latents=noise(1, 16, 16, 24), output_type="latent")
    ours = copy.deepcopy(dynamic)
    family.set_timesteps(ours, 3, (16, 24))
    assert torch.allclose(ours.sigmas, stock.scheduler.sigmas.cpu())
    family.set_timesteps(ours, 3, (32, 32))
    assert not torch.allclose(ours.sigmas, stock.scheduler.sigmas.cpu())


def test_flow_x0_round_trip_and_noise(family):
    scheduler = copy.deepcopy(family.scheduler)
    family.set_timesteps(scheduler, 4, (16, 16))
    t = scheduler.timesteps[1]
    x, v, x0, eps = noise(2, 16, 16, 16, seed=1), noise(2, 16, 16, 16, seed=2), noise(2, 16, 16, 16, seed=3), noise(2, 16, 16, 16, seed=4)
    assert torch.allclose(family.output_from_x0(x, family.predicted_x0(x, v, t, scheduler), t, scheduler), v, atol=1e-5)
    assert torch.allclose(family.add_noise(x0, eps, t, scheduler), scheduler.scale_noise(x0, t.reshape(1), eps), atol=1e-6)


def test_vae_round_trip_and_decode_like_stock(pipe, family):
    """``latents / scaling_factor + shift_factor`` before ``vae.decode``, as the stock pipeline."""
    latents = noise(1, 16, 16, 16)
    assert torch.allclose(family.from_vae_latents(family.to_vae_latents(latents)), latents, atol=1e-6)
    config = pipe.vae.config
    with torch.no_grad():
        ref = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
        assert torch.allclose(family.decode(latents), ref, atol=1e-6)


def test_latent_format_from_checkpoint(family):
    """The tiny model keeps SD3's facts: 16 channels, factor 8, 2×2 patches, native 128 cells,
    windows up to pos_embed_max_size (192) patches."""
    fmt = family.latent_format
    assert (fmt.channels, fmt.scale_factor, fmt.patch, fmt.native_window, fmt.max_window) == (16, 8, 2, 128, 384)
    assert family.pipeline.vae_scale_factor == 8 and family.pipeline.default_sample_size == 128
    with pytest.raises(ConfigError, match="window = 15 .* 2×2 patches"):
        fmt.check_window(15, "window", "geometry 'tiles'")
    with pytest.raises(ConfigError, match="window = 400"):
        fmt.check_window(400, "window", "geometry 'tiles'")


def test_bad_inputs(pipe, family):
    rows, _ = family.encode_prompts([PROMPT])
    t = torch.tensor(1000.0)
    with pytest.raises(ConfigError, match="positions = 'canvas'"):
        SD3Family(pipe, positions="canvas")
    with pytest.raises(ConfigError, match="offsets"):
        family.forward(noise(1, 16, 16, 16), t, rows, offsets=torch.zeros(1, 2))
    with pytest.raises(ConfigError, match="not whole 2×2 patches"):
        family.forward(noise(1, 16, 15, 16), t, rows)
    with pytest.raises(ConfigError, match="negative_prompts"):
        family.encode_prompts(["a", "b"], ["c"])
    with pytest.raises(ConfigError, match="max_sequence_length"):
        SD3Family(pipe, max_sequence_length=1000)


def test_long_prompts_are_cut_with_a_warning(pipe):
    family = SD3Family(pipe, max_sequence_length=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        positive, _ = family.encode_prompts(["a cat on a street at night with a dog and a tree"])
    messages = [str(w.message) for w in caught if "cut off" in str(w.message)]
    assert any("T5" in m and "tree" in m for m in messages), messages
    assert positive["prompt_embeds"].shape[1] == 77 + 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        family.encode_prompts(["cat " * 80 + "zebra"])
    assert any("CLIP" in str(w.message) and "zebra" in str(w.message) for w in caught)


def test_controlnet_window_equals_stock_pipeline(pipe, family, monkeypatch):
    """ControlNet residuals from VAE-encoded condition latents, as
    ``StableDiffusion3ControlNetPipeline`` (posterior mode in both, so the draws agree)."""
    from diffusers import StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    controlnet = family.tiny_controlnet(seed=3)
    pixels = noise(1, 3, 128, 192, seed=5).sigmoid()
    latents = noise(1, 16, 16, 24)
    condition = family.control_condition(controlnet, pixels)
    assert condition.shape == (1, 16, 16, 24)
    control = create("conditioner", "controlnet", model=controlnet, image=pixels, conditioning_scale=0.7)
    ours = engine_window(family, latents, 2, 4.0, NEGATIVE, [control])
    stock = StableDiffusion3ControlNetPipeline(**pipe.components, controlnet=controlnet)
    ref = stock(
        PROMPT, negative_prompt=NEGATIVE, height=128, width=192, num_inference_steps=2, guidance_scale=4.0,
        control_image=pixels * 2 - 1, controlnet_conditioning_scale=0.7, latents=latents.clone(), output_type="latent",
    ).images  # fmt: skip
    assert_close(ours, ref)
    plain = engine_window(family, latents, 2, 4.0, NEGATIVE)
    assert (plain - ref).abs().max() > 1e-3  # the residuals matter

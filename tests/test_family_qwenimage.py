"""The Qwen-Image family against the stock diffusers pipelines on tiny random models (offline, CPU)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close_to_stock as assert_close

from jointdiff import JointDiffusion, create
from jointdiff.core.family import Embeddings
from jointdiff.models.families.flow import linear_shift_mu, pack_patches, unpack_patches
from jointdiff.models.families.qwenimage import QwenImage, build_tiny_pipeline
from jointdiff.testing import OneWindowGeometry
from jointdiff.utils.errors import ConfigError

PROMPT = "a photo of a red fox in the snow"
NEGATIVE = "blurry"  # shorter than PROMPT: the negative rows are padded and masked
SIZE = (16, 24)  # latent cells of a non-square window: 128 × 192 px, 8 × 12 tokens
STEPS = 2


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_tiny_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def family(pipe):
    return QwenImage(pipe)


def initial_latents(seed: int = 1) -> torch.Tensor:
    return torch.randn((1, 16, *SIZE), generator=torch.Generator().manual_seed(seed))


def engine_window(family, noise, negative=None, guidance_scale=4.0, conditioners=()):
    """The real engine on one window from unit ``noise`` ``(1, 16, h, w)``, with the ``text``
    conditioner (and ``conditioners``); returns the final latents."""
    text = create("conditioner", "text", prompt=PROMPT, negative_prompt=negative, guidance_scale=guidance_scale)
    job = JointDiffusion(family, OneWindowGeometry(noise.shape[-2:]), [text, *conditioners])
    return job(STEPS, latents=noise.clone(), output_type="latent", progress=False).latents


def run_stock(pipeline, noise, **kwargs):
    """The stock pipeline from the same (packed) initial latents; returns its final canvas
    latents (unpacked) and its output (``output_type``, default the latents)."""
    h, w = noise.shape[-2:]
    seen = {}

    def keep(_pipe, _i, _t, tensors):
        seen["latents"] = tensors["latents"]
        return tensors

    with torch.no_grad():
        out = pipeline(
            PROMPT, height=8 * h, width=8 * w, num_inference_steps=STEPS, latents=pack_patches(noise),
            callback_on_step_end=keep, **{"output_type": "latent", **kwargs},
        ).images  # fmt: skip
    return unpack_patches(seen["latents"], (h, w)), out


@pytest.mark.parametrize("negative", [None, "", NEGATIVE])
def test_one_window_equals_stock_pipeline(pipe, family, negative):
    """True CFG 4.0 with a negative prompt, "" included (norm-preserving); none without one
    (None), as stock."""
    noise = initial_latents()
    ours = engine_window(family, noise, negative, guidance_scale=4.0)
    stock, image = run_stock(pipe, noise, negative_prompt=negative, true_cfg_scale=4.0, output_type="pt")
    assert_close(ours, stock)
    with torch.no_grad():
        pixels = family.decode(ours)
    assert pixels.shape == (1, 3, 128, 192)
    assert_close((pixels / 2 + 0.5).clamp(0, 1), image, rtol=1e-3)


def test_padding_and_mask_give_the_unpadded_result(pipe, family):
    """Rows padded to a shared length with their mask = each row encoded alone, unpadded."""
    positive, negative = family.encode_prompts([PROMPT, "cat"], [NEGATIVE, "a painting of a dog at night"])
    assert positive["prompt_embeds"].shape[1] == negative["prompt_embeds"].shape[1]
    rows = Embeddings.cat([negative, positive])
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(700.0)
    with torch.no_grad():
        batched = family.forward(x, t, rows)
        for i, text in enumerate([NEGATIVE, "a painting of a dog at night", PROMPT, "cat"]):
            embeds, mask = pipe.encode_prompt(text, device="cpu")
            assert mask is None and embeds.shape[1] == int(rows["prompt_embeds_mask"][i].sum())
            alone = pipe.transformer(
                hidden_states=pack_patches(x[i : i + 1]), timestep=t.expand(1) / 1000, encoder_hidden_states=embeds,
                img_shapes=[[(1, 4, 4)]], return_dict=False,
            )[0]  # fmt: skip
            assert_close(batched[i : i + 1], unpack_patches(alone, (8, 8)))
    pipe.tokenizer.padding_side = "left"
    try:
        left, _ = family.encode_prompts([PROMPT, "cat"])
    finally:
        pipe.tokenizer.padding_side = "right"
    assert torch.equal(left["prompt_embeds_mask"], positive["prompt_embeds_mask"])
    assert torch.allclose(left["prompt_embeds"], positive["prompt_embeds"], atol=1e-5)


def test_true_cfg_semantics_and_norm_preserving_combination(family):
    assert family.uses_cfg(4.0, "") and family.uses_cfg(4.0, NEGATIVE)
    assert not family.uses_cfg(4.0, None) and not family.uses_cfg(1.0, NEGATIVE)
    uncond, cond = torch.randn(2, 3, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    scale = torch.tensor([2.0, 4.0, 6.0]).view(-1, 1, 1, 1)
    ours = family.combine_guidance(uncond, cond, scale)
    u, c = pack_patches(uncond), pack_patches(cond)
    combined = u + scale.view(-1, 1, 1) * (c - u)
    stock = combined * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    assert torch.allclose(ours, unpack_patches(stock, (8, 8)), atol=1e-6)
    assert torch.allclose(pack_patches(ours).norm(dim=-1), c.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(family.combine_guidance(uncond, cond, 4.0)[1], ours[1], atol=1e-6)


def test_timesteps_follow_the_window_token_count(pipe, family):
    for size in [(16, 24), (128, 128)]:
        ours, stock = copy.deepcopy(pipe.scheduler), copy.deepcopy(pipe.scheduler)
        family.set_timesteps(ours, 4, size)
        tokens = size[0] * size[1] // 4
        stock.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=linear_shift_mu(tokens, stock.config), device="cpu")
        assert torch.equal(ours.timesteps, stock.timesteps)
    small, large = copy.deepcopy(pipe.scheduler), copy.deepcopy(pipe.scheduler)
    family.set_timesteps(small, 4, (16, 16))
    family.set_timesteps(large, 4, (128, 128))
    assert (large.timesteps[1:-1] > small.timesteps[1:-1]).all()  # more tokens, stronger shift (the last is shift_terminal)


def test_facts_packing_and_vae_round_trip(pipe, family):
    fmt = family.latent_format
    assert (fmt.channels, fmt.scale_factor, fmt.patch, fmt.native_window) == (16, 8, 2, 128)
    assert fmt.native_window * fmt.scale_factor == pipe.default_sample_size * pipe.vae_scale_factor
    assert QwenImage.accepts(pipe) and QwenImage.tiny_autoencoder is None and QwenImage.cuda_dtype == "bfloat16"
    template = pipe.tokenizer(pipe.prompt_template_encode.format("x")).input_ids
    assert pipe.tokenizer.decode(template[: pipe.prompt_template_encode_start_idx]).endswith("<|im_start|>user\n")
    x = torch.randn(2, 16, 8, 12)
    assert torch.equal(pack_patches(x), pipe._pack_latents(x, 2, 16, 8, 12))
    assert torch.equal(unpack_patches(pack_patches(x), (8, 12)), x)
    assert torch.equal(pipe._unpack_latents(pack_patches(x), 64, 96, 8)[:, :, 0], x)
    vae_side = family.to_vae_latents(x)
    assert vae_side.shape == (2, 16, 1, 8, 12)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    assert torch.allclose(vae_side, x[:, :, None] * torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1) + mean)
    assert torch.allclose(family.from_vae_latents(vae_side), x, atol=1e-5)
    v = torch.randn(2, 16, 8, 12)
    scheduler = copy.deepcopy(pipe.scheduler)
    family.set_timesteps(scheduler, STEPS, (8, 12))
    t = scheduler.timesteps[1]
    assert torch.allclose(family.output_from_x0(x, family.predicted_x0(x, v, t, scheduler), t, scheduler), v, atol=1e-4)
    with torch.no_grad():
        assert family.encode(torch.rand(1, 3, 64, 96) * 2 - 1).shape == (1, 16, 8, 12)


@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_controlnet_window_equals_stock_pipeline(pipe, family, negative):
    """With true CFG the stock pipeline reuses the positive-prompt residuals for the negative
    branch (``controlnet_positive_only``); without a negative prompt there is no CFG."""
    from diffusers import QwenImageControlNetPipeline

    controlnet = family.tiny_controlnet(seed=3)
    noise = initial_latents()
    condition = torch.rand((1, 3, 8 * SIZE[0], 8 * SIZE[1]), generator=torch.Generator().manual_seed(4))
    control = create("conditioner", "controlnet", model=controlnet, image=condition, conditioning_scale=0.8)
    torch.manual_seed(5)  # the condition's posterior sample, drawn (once, in setup) as the stock pipeline draws it
    ours = engine_window(family, noise, negative, conditioners=[control])
    stock_pipe = QwenImageControlNetPipeline(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)}, controlnet=controlnet)
    torch.manual_seed(5)
    stock, _ = run_stock(
        stock_pipe, noise, negative_prompt=negative, true_cfg_scale=4.0, control_image=condition * 2 - 1,
        controlnet_conditioning_scale=0.8,
    )  # fmt: skip
    assert_close(ours, stock)
    plain = engine_window(family, noise, negative)
    assert (ours - plain).abs().max() > 1e-3  # the residuals matter


def test_bad_inputs(family):
    with pytest.raises(ConfigError, match="window_size = 15 latent cells is not a whole number of 2×2"):
        family.latent_format.check_window(15, "window_size", "geometry")
    with pytest.raises(ConfigError, match="positions"):
        QwenImage(family.pipeline, positions="canvas")
    with pytest.raises(ConfigError, match="max_sequence_length"):
        QwenImage(family.pipeline, max_sequence_length=2048)
    positive, _ = family.encode_prompts([PROMPT])
    with pytest.raises(ConfigError, match="offsets"):
        family.forward(torch.zeros(1, 16, 8, 8), torch.tensor(500.0), positive, offsets=torch.zeros(1, 2))
    with pytest.raises(ConfigError, match="negative_prompts"):
        family.encode_prompts(["a", "b"], ["x"])
    short = QwenImage(family.pipeline, max_sequence_length=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, _ = short.encode_prompts(["a cat " * 6 + "elephant giraffe"])
    assert rows["prompt_embeds"].shape[1] == 12
    assert any("cut off: 'elephant giraffe'" in str(w.message) for w in caught), [str(w.message) for w in caught]

"""The FLUX.1 family against diffusers' stock FluxPipeline / FluxControlNetPipeline, on the
tiny dev-like and schnell-like models (random weights, fixed seeds, CPU, float32)."""

from __future__ import annotations

import copy

import pytest
import torch

from jointdiff import JointDiffusion, create
from jointdiff.models.families.flow import pack_patches, unpack_patches
from jointdiff.models.families.flux import Flux, build_tiny_controlnet, build_tiny_pipeline, build_tiny_schnell_pipeline
from jointdiff.utils.errors import ConfigError

PROMPT = "a watercolor fox in the snow"
WINDOW = 16  # latent cells: 128 px, 64 tokens


@pytest.fixture(scope="module")
def dev():
    return Flux(build_tiny_pipeline(seed=0))


@pytest.fixture(scope="module")
def schnell():
    return Flux(build_tiny_schnell_pipeline(seed=0))


def engine_window(family, latents, guidance=None, conditioners=()):
    """The real engine on one ``WINDOW``-cell window (a strip one window long) from ``latents``
    ``(1, 16, h, w)`` with the ``text`` conditioner; returns the final latents."""
    size_px = WINDOW * family.latent_format.scale_factor
    geometry = create("geometry", "strip", length_px=size_px, window_latent=WINDOW, stride_latent=WINDOW)
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=guidance)
    result = JointDiffusion(family, geometry, [text, *conditioners])(
        2, latents=latents.clone(), output_type="latent", progress=False
    )
    assert geometry.num_windows == 1
    return result.latents


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def stock_window(family, latents, **call):
    """The stock pipeline on one window from the same initial latents (packed, as it takes them)."""
    size_px = WINDOW * family.latent_format.scale_factor
    out = family.pipeline(
        PROMPT, height=size_px, width=size_px, num_inference_steps=2, latents=pack_patches(latents),
        output_type="latent", max_sequence_length=family.max_sequence_length, **call,
    ).images
    return unpack_patches(out, (WINDOW, WINDOW))


# -- equality with diffusers ----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_one_window_equals_stock_pipeline(variant, request):
    """The engine on one window: dev with embedded guidance 4.0, schnell without guidance."""
    family = request.getfixturevalue(variant)
    latents = torch.randn(1, 16, WINDOW, WINDOW, generator=torch.Generator().manual_seed(1))
    guidance = 4.0 if variant == "dev" else None
    ours = engine_window(family, latents, guidance)
    expected = stock_window(family, latents, **({"guidance_scale": guidance} if guidance else {}))
    assert ours.shape == latents.shape
    assert relative_error(ours, expected) < 1e-4


@pytest.mark.parametrize(
    "guidance",
    [
        3.5,
        5.0,
    ],
)
def test_controlnet_window_equals_stock_pipeline(dev, monkeypatch, guidance):
    from diffusers import FluxControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    controlnet = build_tiny_controlnet(seed=3)
    parts = {k: v for k, v in dev.pipeline.components.items() if k not in ("image_encoder", "feature_extractor")}
    stock = FluxControlNetPipeline(**parts, controlnet=controlnet)
    pixels = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    latents = torch.randn(1, 16, WINDOW, WINDOW, generator=torch.Generator().manual_seed(1))
    condition = dev.control_condition(controlnet, pixels)
    assert condition.shape == (1, 16, WINDOW, WINDOW)
    control = create("conditioner", "controlnet", model=controlnet, image=pixels)
    ours = engine_window(dev, latents, guidance, [control])
    # the family conditions on the posterior mean; make the stock pipeline do the same
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    expected = stock(
        PROMPT, control_image=pixels * 2 - 1, height=128, width=128, num_inference_steps=2, guidance_scale=guidance,
        latents=pack_patches(latents), output_type="latent", max_sequence_length=dev.max_sequence_length,
    ).images
    expected = unpack_patches(expected, (WINDOW, WINDOW))
    assert relative_error(ours, expected) < 1e-4
    assert relative_error(ours, engine_window(dev, latents, guidance)) > 1e-3  # the ControlNet did something


def test_fill_window_equals_stock_pipeline(dev, monkeypatch):
    """FluxFill with the ``inpaint_model`` conditioner: the masked-image latents and the
    8×8-per-cell mask, unpacked at canvas scale, join the latents as ``concat_condition``;
    equal to FluxFillPipeline (tests/test_inpaint_model.py checks the condition itself)."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    torch.manual_seed(5)
    transformer = FluxTransformer2DModel(
        in_channels=64 + 64 + 256, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    parts = {k: v for k, v in dev.pipeline.components.items() if k not in ("image_encoder", "feature_extractor")}
    fill = Flux(FluxFillPipeline(**{**parts, "transformer": transformer}))
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(6))  # [0, 1]
    mask = (torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    latents = torch.randn(1, 16, WINDOW, WINDOW, generator=torch.Generator().manual_seed(1))
    inpaint = create("conditioner", "inpaint_model", image=image, mask=mask)
    ours = engine_window(fill, latents, 30.0, [inpaint])
    expected = fill.pipeline(
        PROMPT, image=image * 2 - 1, mask_image=mask, height=128, width=128, num_inference_steps=2, guidance_scale=30.0,
        latents=pack_patches(latents), output_type="latent", max_sequence_length=512,
    ).images
    assert fill.latent_format.channels == 16 and fill.is_inpainting
    assert relative_error(ours, unpack_patches(expected, (WINDOW, WINDOW))) < 1e-4


def test_offsets_equal_shifted_image_ids(dev):
    """Batched windows with canvas offsets equal one transformer call per window with the
    stock image ids shifted by (top/2, left/2)."""
    transformer = dev.pipeline.transformer
    latents = torch.randn(3, 16, 8, 12, generator=torch.Generator().manual_seed(4))
    offsets = torch.tensor([[0, 0], [6, 10], [40, 96]])
    embeds, _ = dev.encode_prompts([PROMPT, "a red barn", PROMPT])
    t, scale = torch.tensor(700.0), torch.full((3,), 4.0)
    with torch.no_grad():
        ours = dev.forward(latents, t, embeds, guidance_scale=scale, offsets=offsets)
        plain = dev.forward(latents, t, embeds, guidance_scale=scale)
        for i, (top, left) in enumerate(offsets.tolist()):
            ids = type(dev.pipeline)._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32)
            ids[:, 1] += top // 2
            ids[:, 2] += left // 2
            tokens = transformer(
                hidden_states=pack_patches(latents[i : i + 1]), timestep=t.reshape(1) / 1000, guidance=scale[:1],
                pooled_projections=embeds["pooled_prompt_embeds"][i : i + 1],
                encoder_hidden_states=embeds["prompt_embeds"][i : i + 1],
                txt_ids=torch.zeros(embeds["prompt_embeds"].shape[1], 3), img_ids=ids, return_dict=False,
            )[0]
            assert relative_error(ours[i : i + 1], unpack_patches(tokens, (8, 12))) < 1e-5
    assert torch.equal(ours[0], plain[0])
    assert relative_error(ours[2], plain[2]) > 1e-3


# -- math and window facts ------------------------------------------------------------------


def test_controlnet_residuals_follow_the_transformer_rule():
    """One residual per block: XLabs nets repeat theirs (``i mod K``), InstantX nets spread
    them (``i // ceil(blocks / K)``), as FluxTransformer2DModel indexes them."""
    from jointdiff.models.families.flux import _per_block

    samples = [torch.tensor(0.0), torch.tensor(1.0)]
    assert [int(s) for s in _per_block(samples, 5, repeat=True)] == [0, 1, 0, 1, 0]
    assert [int(s) for s in _per_block(samples, 5, repeat=False)] == [0, 0, 0, 1, 1]
    assert _per_block(None, 5, repeat=False) is None


def test_x0_round_trip(dev):
    scheduler = copy.deepcopy(dev.scheduler)
    dev.set_timesteps(scheduler, 4, (WINDOW, WINDOW))
    x, v = torch.randn(2, 2, 16, 8, 8).unbind(0)
    for t in scheduler.timesteps:
        x0 = dev.predicted_x0(x, v, t, scheduler)
        torch.testing.assert_close(dev.output_from_x0(x, x0, t, scheduler), v, rtol=1e-5, atol=1e-5)


def test_packing_matches_pipeline_and_round_trips():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    tokens = pack_patches(latents)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack_patches(tokens, (6, 10)), latents)
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 48, 80, 8), latents)


def test_timesteps_and_ids_follow_the_window(dev, schnell):
    """A 16×32-cell window: mu from its 128 tokens (not the canvas'), the stock image ids."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mine, stock = copy.deepcopy(dev.scheduler), copy.deepcopy(dev.scheduler)
    dev.set_timesteps(mine, 4, (16, 32))
    stock.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=calculate_shift(128), device="cpu")
    assert torch.equal(mine.timesteps, stock.timesteps)
    square = copy.deepcopy(dev.scheduler)
    dev.set_timesteps(square, 4, (16, 16))
    assert not torch.equal(mine.timesteps, square.timesteps)
    flat = copy.deepcopy(schnell.scheduler)
    schnell.set_timesteps(flat, 4, (16, 32))
    assert torch.allclose(flat.sigmas[:-1], torch.linspace(1.0, 0.25, 4, dtype=flat.sigmas.dtype))
    ids = dev._cached_ids("image", 8, 16, torch.device("cpu"), torch.float32)
    assert torch.equal(ids, type(dev.pipeline)._prepare_latent_image_ids(1, 8, 16, "cpu", torch.float32))


def test_checkpoint_facts(dev, schnell):
    assert (dev.guidance_mode, schnell.guidance_mode) == ("distilled", "none")
    assert (dev.max_sequence_length, schnell.max_sequence_length) == (512, 256)
    fmt = dev.latent_format
    assert (fmt.channels, fmt.scale_factor, fmt.patch, fmt.native_window) == (16, 8, 2, 128)
    assert Flux.accepts(dev.pipeline) and dev.cuda_dtype == "bfloat16"


def test_vae_round_trip_and_decode(dev):
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(dev.to_vae_latents(dev.from_vae_latents(z)), z)
    with torch.no_grad():
        assert dev.decode(torch.randn(1, 16, 4, 6)).shape == (1, 3, 32, 48)


# -- bad input ------------------------------------------------------------------------------


def test_negative_prompt_is_an_error(dev, schnell):
    for family in (dev, schnell):
        with pytest.raises(ConfigError, match="negative_prompts"):
            family.encode_prompts([PROMPT], ["blurry"])


def test_window_must_be_whole_patches(dev):
    with pytest.raises(ConfigError, match="15 latent cells"):
        dev.latent_format.check_window(15, "window_size", "geometry 'tiles'")
    embeds, _ = dev.encode_prompts([PROMPT])
    with pytest.raises(ConfigError, match=r"\(9, 8\)"):
        dev.forward(torch.zeros(1, 16, 9, 8), torch.tensor(500.0), embeds)
    with pytest.raises(ValueError, match="offsets"):
        dev.forward(torch.zeros(1, 16, 8, 8), torch.tensor(500.0), embeds, offsets=torch.zeros(2, 2))


def test_options_and_long_prompts(dev):
    with pytest.raises(ConfigError, match="max_sequence_length"):
        Flux(dev.pipeline, max_sequence_length=600)
    short = Flux(dev.pipeline, max_sequence_length=8)
    with pytest.warns(UserWarning, match="cut: 'snow'"):
        embeds, _ = short.encode_prompts(["a fox the snow"])
    assert embeds["prompt_embeds"].shape[1] == 8

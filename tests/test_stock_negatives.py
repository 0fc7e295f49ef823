"""Prompt and guidance options mean what they mean in the stock pipelines: one window with no
negative prompt (None), the empty one ("") and a real one equals the stock diffusers pipeline
called with the same ``negative_prompt`` (SD, SD3 and FLUX.2 klein base here; SDXL, whose
None and "" differ, and Qwen-Image, whose true CFG runs only with a negative prompt, in their
own family tests). Guidance-distilled FLUX.1: "" is no negative prompt, as stock, and a real
one is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_stock

from jointdiff import JointDiffusion, create
from jointdiff.models.loading import as_model, load_pipeline
from jointdiff.testing import OneWindowGeometry
from jointdiff.utils.errors import ConfigError

PROMPT = "a photo of a lighthouse"
STEPS = 2
NEGATIVES = [None, "", "blurry, low quality"]


def engine_window(family, noise, negative, guidance_scale):
    text = create("conditioner", "text", prompt=PROMPT, negative_prompt=negative, guidance_scale=guidance_scale)
    job = JointDiffusion(family, OneWindowGeometry(noise.shape[-2:]), [text])
    return job(STEPS, latents=noise.clone(), output_type="latent", progress=False).latents


def stock_window(pipeline, noise, negative, guidance_scale):
    h, w = noise.shape[-2:]
    with torch.no_grad():
        return pipeline(
            PROMPT, negative_prompt=negative, height=8 * h, width=8 * w, num_inference_steps=STEPS,
            guidance_scale=guidance_scale, latents=noise.clone(), output_type="latent",
        ).images


@pytest.fixture(scope="module", params=["tiny", "tiny-sd3"])
def cfg_pipeline(request):
    pipeline = load_pipeline(request.param, device="cpu", dtype="float32")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("negative", NEGATIVES, ids=["none", "empty", "real"])
def test_one_window_negative_prompt_equals_stock(cfg_pipeline, negative):
    family = as_model(cfg_pipeline)
    noise = torch.randn((1, family.latent_format.channels, 16, 24), generator=torch.Generator().manual_seed(3))
    ours = engine_window(family, noise, negative, 5.0)
    assert_close_to_stock(ours, stock_window(cfg_pipeline, noise, negative, 5.0))


def test_guidance_distilled_flux_takes_empty_but_refuses_a_real_negative():
    family = as_model(load_pipeline("tiny-flux", device="cpu", dtype="float32"))
    noise = torch.randn((1, 16, 16, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(engine_window(family, noise, "", 3.5), engine_window(family, noise, None, 3.5), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="negative_prompt = 'blurry' cannot be used with model family 'flux'"):
        engine_window(family, noise, "blurry", 3.5)


@pytest.mark.parametrize("negative", NEGATIVES, ids=["none", "empty", "real"])
def test_flux2_klein_base_negative_prompt_equals_stock(negative):
    """FLUX.2 klein base runs true CFG; its stock pipeline encodes "" for the negative branch
    and takes another one only as ``negative_prompt_embeds``: None and "" give the stock
    default, a real negative prompt the stock pipeline given its encoding."""
    from jointdiff.models.families.flux2 import Flux2, build_tiny_pipeline

    pipe = build_tiny_pipeline(variant="klein-base")
    family = Flux2(pipe)
    noise = torch.randn((1, 128, 8, 8), generator=torch.Generator().manual_seed(3))
    ours = family.to_vae_latents(engine_window(family, noise, negative, 3.5))
    extra = {}
    if negative:
        with torch.no_grad():
            extra["negative_prompt_embeds"] = pipe.encode_prompt(negative, device=torch.device("cpu"))[0]
    with torch.no_grad():
        stock = pipe(prompt=PROMPT, height=128, width=128, num_inference_steps=STEPS, guidance_scale=3.5,
                     latents=noise.clone(), output_type="latent", **extra).images
    assert_close_to_stock(ours, stock)

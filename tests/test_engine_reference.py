"""The engine against diffusers' own pipelines on the same components, latents and scheduler.

- A canvas of exactly one window is plain Stable Diffusion: it must equal
  ``StableDiffusionPipeline`` for DDIM, for multistep solvers and for v-prediction.
- A strip with DDIM and stride 8 is MultiDiffusion: it must equal diffusers'
  ``StableDiffusionPanoramaPipeline``, with and without circular padding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_job

from jointdiff.models.loading import make_scheduler

STEPS = 3
PROMPT = "a photo of a city"


def canvas_noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def diffusers_sd(pipeline, latents, output_type):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline(**pipeline.components)
    reference.set_progress_bar_config(disable=True)
    return reference(
        PROMPT, height=512, width=512, num_inference_steps=STEPS, guidance_scale=7.5,
        latents=latents.clone(), output_type=output_type,
    ).images


@pytest.mark.parametrize("scheduler, prediction_type", [("ddim", None), ("dpm++", None), ("unipc", None), ("ddim", "v_prediction")])
def test_single_window_equals_stable_diffusion_pipeline(fresh_tiny_pipeline, scheduler, prediction_type):
    pipeline = fresh_tiny_pipeline
    pipeline.scheduler = make_scheduler(scheduler, pipeline.scheduler.config, prediction_type)
    latents = canvas_noise((1, 4, 64, 64))
    expected = diffusers_sd(pipeline, latents, "latent")
    result = make_job(pipeline, "strip", dict(length_px=512), PROMPT)(STEPS, latents=latents, progress=False, output_type="latent")
    torch.testing.assert_close(result.latents, expected, rtol=1e-4, atol=1e-4)


def test_single_window_image_equals_stable_diffusion_pipeline(tiny_pipeline):
    latents = canvas_noise((1, 4, 64, 64))
    expected = diffusers_sd(tiny_pipeline, latents, "pt")
    result = make_job(tiny_pipeline, "strip", dict(length_px=512), PROMPT)(STEPS, latents=latents, progress=False)
    torch.testing.assert_close((result.pixels / 2 + 0.5).clamp(0, 1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("circular", [False, True])
def test_strip_equals_panorama_pipeline(tiny_pipeline, circular):
    from diffusers import StableDiffusionPanoramaPipeline

    reference = StableDiffusionPanoramaPipeline(**tiny_pipeline.components)
    reference.set_progress_bar_config(disable=True)
    latents = canvas_noise((1, 4, 64, 96))
    expected = reference(
        PROMPT, height=512, width=768, num_inference_steps=STEPS, guidance_scale=7.5, view_batch_size=3,
        latents=latents.clone(), circular_padding=circular, output_type="pt",
    ).images
    job = make_job(tiny_pipeline, "strip", dict(length_px=768, stride_latent=8, wrap=circular), PROMPT, view_batch_size=3)
    result = job(STEPS, latents=latents, progress=False)
    assert job.geometry.num_windows == (12 if circular else 5)
    torch.testing.assert_close((result.pixels / 2 + 0.5).clamp(0, 1), expected, rtol=1e-4, atol=1e-4)

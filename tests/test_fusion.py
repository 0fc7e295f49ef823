"""x̂0 fusion (SyncTweedies) against latent fusion (MultiDiffusion)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_job

from jointdiff.core.synchronizer import Synchronizer
from jointdiff.models.loading import make_scheduler


class RecordingSynchronizer(Synchronizer):
    """Records the noisy latents of window 0 at the start of every step."""

    name = "recording"

    def setup(self, context):
        self.seen = []

    def begin_step(self, state):
        self.seen.append(state.window_latents([0]).clone())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_output_from_x0_inverts_predicted_x0(tiny_pipeline, prediction_type):
    from jointdiff.models.loading import as_model

    model = as_model(tiny_pipeline)
    scheduler = make_scheduler("ddim", tiny_pipeline.scheduler.config, prediction_type)
    scheduler.set_timesteps(10, device="cpu")
    latents, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[3]
    x0 = model.predicted_x0(latents, output, t, scheduler)
    torch.testing.assert_close(model.output_from_x0(latents, x0, t, scheduler), output, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_single_window_x0_fusion_follows_plain_denoising(fresh_tiny_pipeline, scheduler):
    """With one window, fusing x̂0 changes nothing: the window's noisy latents must follow
    exactly the trajectory of latent fusion (which equals diffusers' pipeline)."""
    pipeline = fresh_tiny_pipeline
    pipeline.scheduler = make_scheduler(scheduler, pipeline.scheduler.config)
    trajectory = []
    plain = make_job(pipeline, "strip", dict(length_px=512))
    plain(4, progress=False, output_type="latent", callback=lambda i, t, c: trajectory.append(c.clone()))
    recorder = RecordingSynchronizer()
    fused = make_job(pipeline, "strip", dict(length_px=512), fusion="x0")
    fused.synchronizer = recorder
    fused(4, progress=False, output_type="latent")
    for step in range(1, 4):
        torch.testing.assert_close(recorder.seen[step], trajectory[step - 1], rtol=1e-4, atol=1e-4)


class TwoRegionsOfOnePrompt:
    """Wraps a text conditioner: the same prompt twice, with complementary region masks."""

    name = "two-regions"

    def __init__(self, text, mask):
        self.text, self.mask = text, mask

    def setup(self, context):
        self.text.setup(context)

    def prompt(self):
        from jointdiff.core.conditioner import Prompt

        inner = self.text.prompt()
        masks = torch.stack([self.mask, 1 - self.mask])
        twice = [0, 0]
        return Prompt(inner.embeds.select(twice), inner.negative_embeds.select(twice), inner.guidance_scale, region_masks=masks)

    def modify_latents(self, latents, batch, state):
        return latents

    def model_kwargs(self, *args):
        return {}


@pytest.mark.parametrize("fusion", ["latent", "x0"])
def test_region_branches_with_complementary_masks_equal_the_plain_job(tiny_pipeline, fusion):
    """Each window is denoised once per region prompt and fused with the region's mask: two
    branches of the same prompt whose masks sum to one must give the plain result."""
    options = dict(length_px=640, stride_latent=16)
    plain = make_job(tiny_pipeline, "strip", options, fusion=fusion)
    expected = plain(2, progress=False, output_type="latent").latents
    mask = torch.zeros(1, 1, 64, 80)
    mask[..., :, :30] = 1.0
    mask[..., :, 30:50] = 0.25
    regions = make_job(tiny_pipeline, "strip", options, fusion=fusion)
    regions.conditioners = [TwoRegionsOfOnePrompt(regions.conditioners[0], mask)]
    actual = regions(2, progress=False, output_type="latent").latents
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)

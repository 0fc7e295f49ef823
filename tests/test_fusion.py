"""x̂0 fusion (SyncTweedies) against latent fusion (MultiDiffusion)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_job
from jointdiff.models import make_scheduler
from jointdiff.synchronizer import Synchronizer


class RecordingSynchronizer(Synchronizer):
    """Records the noisy latents of window 0 at the start of every step."""

    name = "recording"

    def setup(self, context):
        self.seen = []

    def begin_step(self, state):
        self.seen.append(state.window_latents([0]).clone())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_output_from_x0_inverts_predicted_x0(tiny_pipeline, prediction_type):
    from jointdiff.denoiser import Denoiser

    scheduler = make_scheduler("ddim", tiny_pipeline.scheduler.config, prediction_type)
    scheduler.set_timesteps(10, device="cpu")
    denoiser = Denoiser.__new__(Denoiser)
    denoiser.prediction_type = prediction_type
    latents, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[3]
    x0 = denoiser.predicted_x0(latents, output, t, scheduler)
    torch.testing.assert_close(denoiser.output_from_x0(latents, x0, t, scheduler), output, rtol=1e-4, atol=1e-4)


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

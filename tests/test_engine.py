"""Engine behaviour: determinism, scheduler isolation, callbacks, bad input, NaN abort."""

from __future__ import annotations

import pytest
import torch

from conftest import make_job
from jointdiff import JointDiffusion
from jointdiff.errors import ConfigError, NonFiniteLatentsError
from jointdiff.models import make_scheduler
from jointdiff.plugins import create

SMALL_STRIP = dict(length_px=640, stride_latent=16)  # 80 latent cells: 2 windows


def test_same_seed_same_result_different_seed_different_result(tiny_pipeline):
    job = make_job(tiny_pipeline, "strip", SMALL_STRIP)
    first = job(2, seed=7, progress=False, output_type="latent").latents
    again = job(2, seed=7, progress=False, output_type="latent").latents
    other = job(2, seed=8, progress=False, output_type="latent").latents
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("scheduler", ["dpm++", "unipc"])
def test_multistep_scheduler_state_does_not_leak_between_windows(fresh_tiny_pipeline, scheduler):
    """Each window batch owns its solver history: one window per batch must give the same
    canvas as all windows in one batch. A shared history would mix windows' model outputs."""
    pipeline = fresh_tiny_pipeline
    pipeline.scheduler = make_scheduler(scheduler, pipeline.scheduler.config)
    options = dict(length_px=768, stride_latent=16)  # 3 windows
    one_by_one = make_job(pipeline, "strip", options, view_batch_size=1)(4, progress=False, output_type="latent")
    together = make_job(pipeline, "strip", options, view_batch_size=3)(4, progress=False, output_type="latent")
    torch.testing.assert_close(one_by_one.latents, together.latents, rtol=1e-4, atol=1e-4)


def test_initial_latents_are_used_and_checked(tiny_pipeline):
    job = make_job(tiny_pipeline, "strip", SMALL_STRIP)
    noise = torch.randn(1, 4, 64, 80, generator=torch.Generator().manual_seed(3))
    from_noise = job(2, seed=0, latents=noise, progress=False, output_type="latent").latents
    from_seed = job(2, seed=3, progress=False, output_type="latent").latents
    torch.testing.assert_close(from_noise, from_seed)  # the seed draws exactly this noise
    with pytest.raises(ConfigError, match=r"latents must have shape \(1, 4, 64, 80\)"):
        job(2, latents=torch.zeros(1, 4, 64, 64), progress=False)


def test_callback_sees_every_step(tiny_pipeline):
    seen = []
    job = make_job(tiny_pipeline, "strip", SMALL_STRIP)
    result = job(3, progress=False, output_type="latent", callback=lambda i, t, canvas: seen.append((i, t, canvas.clone())))
    assert [i for i, _, _ in seen] == [0, 1, 2]
    assert [t for _, t, _ in seen] == tiny_pipeline.scheduler.timesteps.tolist()
    torch.testing.assert_close(seen[-1][2], result.latents)


def test_nan_in_latents_aborts_naming_the_step(fresh_tiny_pipeline):
    pipeline = fresh_tiny_pipeline
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] > 1:  # the second UNet call (step 1) returns NaN
            return (output[0] * float("nan"),) if isinstance(output, tuple) else output * float("nan")

    pipeline.unet.register_forward_hook(poison)
    job = make_job(pipeline, "strip", dict(length_px=512))
    with pytest.raises(NonFiniteLatentsError, match="at step 1"):
        job(3, progress=False, output_type="latent")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),
        (dict(num_inference_steps=2.5), "num_inference_steps must be an integer >= 1, got 2.5"),
        (dict(output_type="np"), "output_type must be 'pil' or 'latent'"),
    ],
)
def test_bad_call_arguments(tiny_pipeline, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_job(tiny_pipeline, "strip", SMALL_STRIP)(**{"progress": False, **kwargs})


def test_bad_construction(tiny_pipeline):
    geometry = create("geometry", "strip", **SMALL_STRIP)
    text = create("conditioner", "text", prompt="x")
    with pytest.raises(ConfigError, match="view_batch_size must be a positive integer, got 0"):
        JointDiffusion(tiny_pipeline, geometry, [text], view_batch_size=0)
    with pytest.raises(ConfigError, match="exactly one prompt conditioner"):
        JointDiffusion(tiny_pipeline, geometry, [])(1, progress=False)
    with pytest.raises(ConfigError, match="geometry must be a Geometry"):
        JointDiffusion(tiny_pipeline, "strip", [text])


def test_stochastic_scheduler_noise_does_not_depend_on_batching_order(fresh_tiny_pipeline):
    """Each window batch draws its scheduler noise from its own seeded generator."""
    pipeline = fresh_tiny_pipeline
    pipeline.scheduler = make_scheduler("euler_a", pipeline.scheduler.config)
    job = make_job(pipeline, "strip", dict(length_px=768, stride_latent=16), view_batch_size=1)
    in_order = job(3, seed=1, progress=False, output_type="latent").latents
    batches = job._window_batches
    job._window_batches = lambda *args: list(reversed(batches(*args)))  # as if run elsewhere
    reversed_order = job(3, seed=1, progress=False, output_type="latent").latents
    torch.testing.assert_close(reversed_order, in_order)

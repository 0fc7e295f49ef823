"""Model loading: tiny, local diffusers folder, pipeline objects, schedulers, bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import make_job
from jointdiff.errors import ConfigError, ModelLoadError
from jointdiff.models import load_pipeline, make_scheduler


def test_tiny_model_is_built_deterministically():
    first = load_pipeline("tiny", device="cpu")
    second = load_pipeline("tiny", device="cpu")
    for a, b in zip(first.unet.parameters(), second.unet.parameters()):
        assert torch.equal(a, b)
    assert first.vae_scale_factor == 8 and first.unet.config.sample_size == 64


def test_local_diffusers_folder_loads_the_same_model(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(str(tmp_path / "model"), device="cpu", dtype="float32")
    options = dict(length_px=512)
    expected = make_job(tiny_pipeline, "strip", options)(2, progress=False, output_type="latent").latents
    actual = make_job(loaded, "strip", options)(2, progress=False, output_type="latent").latents
    torch.testing.assert_close(actual, expected)


def test_pipeline_object_is_used_as_is(tiny_pipeline):
    assert load_pipeline(tiny_pipeline, device="cpu", dtype="float32") is tiny_pipeline


def test_scheduler_and_prediction_type_override(fresh_tiny_pipeline):
    pipeline = load_pipeline(fresh_tiny_pipeline, device="cpu", scheduler="unipc", prediction_type="v_prediction")
    assert type(pipeline.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipeline.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(model="./missing-folder"), ModelLoadError, "model path './missing-folder' does not exist"),
        (dict(model="weights.safetensors"), ModelLoadError, "does not exist"),
        (dict(model="nobody/nothing"), ModelLoadError, "offline or unreachable.*'tiny'"),
        (dict(model=object()), ConfigError, "not a pipeline of a supported model family"),
        (dict(model="tiny", device="gpu0"), ConfigError, "device must be"),
        (dict(model="tiny", dtype="float8"), ConfigError, "dtype must be"),
        (dict(model="tiny", scheduler="heun2"), ConfigError, "scheduler must be one of"),
    ],
)
def test_bad_models_get_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_pipeline(**{"device": "cpu", **kwargs})


def test_make_scheduler_keeps_the_noise_schedule(tiny_pipeline):
    scheduler = make_scheduler("dpm++", tiny_pipeline.scheduler.config)
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.beta_schedule == tiny_pipeline.scheduler.config.beta_schedule

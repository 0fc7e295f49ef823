"""Model loading: tiny, local diffusers folder, pipeline objects, schedulers, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import make_job

from jointdiff.models.loading import load_pipeline, make_scheduler
from jointdiff.utils.errors import ConfigError, ModelLoadError


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
        (dict(model="tiny", device="mps"), ConfigError, "device = 'mps': MPS .*not available"),
        (dict(model="tiny", device="cpu:x"), ConfigError, "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'cpu:x'"),
    ],
)
def test_bad_models_get_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_pipeline(**{"device": "cpu", **kwargs})


def test_make_scheduler_keeps_the_noise_schedule(tiny_pipeline):
    scheduler = make_scheduler("dpm++", tiny_pipeline.scheduler.config)
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.beta_schedule == tiny_pipeline.scheduler.config.beta_schedule


def test_cuda_is_refused_before_loading_where_there_is_none(monkeypatch):
    from jointdiff.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device = 'cuda:0': CUDA is not available on this machine"):
        load_pipeline("nobody/never-loaded", device="cuda:0")
    assert resolve_device("auto") == torch.device("cpu")


def test_schedulers_are_checked_against_the_family():
    from jointdiff.models.loading import check_scheduler_name, family_class

    assert check_scheduler_name("flow_euler") == "flow_euler"  # family not known yet: either set
    assert check_scheduler_name("flow_euler", family_class("flux")) == "flow_euler"
    with pytest.raises(ConfigError, match=r"one of \['flow_euler'.*\] for model family 'flux', got 'ddim'"):
        check_scheduler_name("ddim", family_class("flux"))


def test_a_local_folder_that_fails_to_load_is_not_blamed_on_the_hub(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "model")
    weights = next((tmp_path / "model" / "unet").glob("*.safetensors"))
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(str(tmp_path / "model"), device="cpu")
    message = str(info.value)
    assert message.startswith(f"could not load the local model folder '{tmp_path / 'model'}': ")
    assert "hub" not in message
    weights.unlink()
    with pytest.raises(ModelLoadError, match="lists component 'unet' in model_index.json, but 'unet/' has config.json but no weights"):
        load_pipeline(str(tmp_path / "model"), device="cpu")


def test_sd_prompt_past_clip_window_warns_naming_the_cut_words(fresh_tiny_pipeline, capfd):
    from jointdiff.models.loading import as_model

    model = as_model(fresh_tiny_pipeline)
    prompt = "a photo of a city " * 20 + "with a purple zeppelin"
    with pytest.warns(UserWarning, match=r"prompt .* is longer than CLIP's 77 tokens; cut off: '.*purple zeppelin'"):
        model.encode_prompts([prompt], [""])
    assert "Token indices sequence length" not in capfd.readouterr().err


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_on_the_cpu_is_refused_with_one_line(offload):
    from jointdiff.models.loading import load_model

    with pytest.raises(ConfigError, match=f"offload = '{offload}' keeps weights on the CPU"):
        load_model("tiny", device="cpu", offload=offload)

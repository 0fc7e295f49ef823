"""A forced model family that does not fit the model is refused with one line naming both:
before loading where the model shows its family (tiny names, local folders, pipeline
objects), right after loading otherwise (a pipeline of another family, or one lacking a
component the family's stock pipeline needs)."""

from __future__ import annotations

import json

import pytest

from jointdiff.cli import main
from jointdiff.models import loading
from jointdiff.utils.errors import ConfigError

FAMILIES = sorted(loading.family_classes())
TINY = {name: cls.name for cls in loading.family_classes().values() for name in cls.tiny_models}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_forced_family_is_checked_against_every_tiny_model(family):
    for model, own in TINY.items():
        if own == family:
            loading.check_family_fits(model, family)  # the right family is accepted
            continue
        with pytest.raises(ConfigError) as refused:
            loading.check_family_fits(model, family)
        message = str(refused.value)
        assert "\n" not in message
        assert f"family = {family!r}" in message and f"{own!r} model" in message and repr(model) in message


def test_a_local_folder_shows_its_family_before_loading(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    loading.check_family_fits(str(tmp_path), "sdxl")
    with pytest.raises(ConfigError, match=r"family = 'flux' does not fit model .*'sdxl' model"):
        loading.check_family_fits(str(tmp_path), "flux")


def test_cli_refuses_before_loading_with_one_line(capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "_load_from_string", no_loading)
    code = main(["generate", "a lake", "--model", "tiny", "--family", "flux", "--steps", "1", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("jointdiff: error: family = 'flux' does not fit model 'tiny'")
    assert "'sd' model" in err


@pytest.fixture(scope="module")
def sd_pipeline():
    return loading.load_pipeline("tiny", device="cpu")


def test_a_pipeline_of_another_family_is_refused(sd_pipeline):
    for family in FAMILIES:
        if family == "sd":
            assert loading.as_model(sd_pipeline, "sd").name == "sd"
            continue
        with pytest.raises(ConfigError, match=rf"family = {family!r} does not fit the StableDiffusionPipeline given.*'sd' model"):
            loading.as_model(sd_pipeline, family)


def test_after_loading_a_pipeline_is_checked_by_its_components(sd_pipeline):
    """An unknown pipeline class (a checkpoint's custom class) is judged by what the forced
    family's stock pipeline needs: an SD-shaped one fits 'sd' but not 'flux'."""
    Custom = type("MyPipeline", (type(sd_pipeline),), {})
    custom = Custom(**sd_pipeline.components)
    loading.check_pipeline_fits(custom, loading.family_class("sd"), "my-checkpoint.safetensors")
    with pytest.raises(ConfigError, match=r"family = 'flux' does not fit model 'my-checkpoint.safetensors': a MyPipeline without .*transformer"):
        loading.check_pipeline_fits(custom, loading.family_class("flux"), "my-checkpoint.safetensors")
    loaded = loading.family_class("sdxl")
    with pytest.raises(ConfigError, match=r"it loaded as a StableDiffusionPipeline, a 'sd' model; .*family = 'sd'"):
        loading.check_pipeline_fits(sd_pipeline, loaded, "model.safetensors")

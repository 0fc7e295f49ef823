"""Quiet, honest output: library chatter off stdout and folded into one line, warnings one
line each, the hub not retried when it is evidently out of reach, and work that would do
nothing (or far more than its purpose) told before the model loads."""

from __future__ import annotations

import logging
import socket
import types
import warnings

import pytest
from PIL import Image

from jointdiff import cli
from jointdiff.jobs import spec as job_spec
from jointdiff.jobs.spec import Job
from jointdiff.models import loading
from jointdiff.utils import quiet
from jointdiff.utils.errors import ConfigError, ModelLoadError
from jointdiff.utils.quiet import stdout_folded

JOB = {
    "model": {"id": "tiny", "device": "cpu"},
    "geometry": {"name": "strip", "length_px": 768, "window_latent": 64, "stride_latent": 32},
    "conditioners": [{"name": "text", "prompt": "a lake"}],
    "steps": 2,
}


def test_library_prints_are_folded_into_one_note(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="jointdiff.libraries"), stdout_folded("LPIPS"):
        print("Setting up [LPIPS] perceptual loss")
        print('Downloading: "https://example.invalid/vgg16.pth"\r 50%\r100%')
    assert capsys.readouterr().out == ""
    (record,) = caplog.records
    assert record.getMessage() == (
        'LPIPS printed: Setting up [LPIPS] perceptual loss | Downloading: "https://example.invalid/vgg16.pth" | 50% | 100%'
    )


def test_warnings_are_one_line_each_without_the_source(capsys, monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    quiet.warnings_as_lines()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for _ in range(2):
            warnings.warn("prompts[0] is longer than CLIP's 77 tokens; cut: 'at dusk'\n  more detail", stacklevel=1)
    err = capsys.readouterr().err
    assert err == "jointdiff: warning: prompts[0] is longer than CLIP's 77 tokens; cut: 'at dusk'\n"


@pytest.fixture
def no_hub_cache(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setattr(loading, "_hub_reach", {})


def test_offline_hub_id_is_refused_at_once(monkeypatch, no_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as refused:
        loading.check_model_source("someone/a-model")
    message = str(refused.value)
    assert "\n" not in message
    assert "model 'someone/a-model' from the Hugging Face hub (offline or unreachable" in message and "HF_HUB_OFFLINE is set" in message and "'tiny'" in message


def test_no_network_is_seen_without_retries(monkeypatch, no_hub_cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    probes = []

    def refuse(address, timeout=None):
        probes.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for _ in range(2):
        with pytest.raises(ModelLoadError, match=r"no network: huggingface.co cannot be reached \(OSError\)"):
            loading.check_model_source("someone/a-model")
    assert probes == [(("huggingface.co", 443), loading.HUB_PROBE_TIMEOUT_S)]  # asked once


def test_a_cached_hub_id_loads_offline(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    loading.check_model_source("someone/a-model")  # no error: the cache has it


def test_cli_offline_hub_id_one_line_exit_2(capsys, monkeypatch, no_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "_load_from_string", lambda *a, **k: pytest.fail("the model was loaded"))
    code = cli.main(["generate", "x", "--model", "someone/a-model", "--steps", "1", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("jointdiff: error: could not load model 'someone/a-model' from the Hugging Face hub")


def test_steps_beyond_the_schedulers_are_refused_before_loading():
    with pytest.raises(ConfigError, match=r"'steps' = 10000000: .*less than or equal to 1000"):
        Job.from_dict({**JOB, "steps": 10**7})


def test_an_init_strength_that_runs_no_step_is_said_before_loading(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(job_spec, "_noted", set())
    Image.new("RGB", (64, 32)).save(tmp_path / "photo.png")
    job = {**JOB, "geometry": {"name": "strip", "length_px": 128, "window_latent": 8, "stride_latent": 4},
           "init": {"image": str(tmp_path / "photo.png"), "strength": 0.4, "placement": {"kind": "upscale"}}}
    with caplog.at_level(logging.WARNING, logger="jointdiff.jobs.spec"):
        Job.from_dict(job)
        Job.from_dict({**job, "steps": 3})
    assert [r.getMessage() for r in caplog.records] == [
        "init strength = 0.4 with steps = 2 runs no denoising step (the image comes back only re-encoded): "
        "raise steps to at least 3 or strength"
    ]


@pytest.mark.parametrize("flow, steps, strength, refused", [
    (False, 2, 0.4, True), (False, 3, 0.4, False), (False, 10, 0.05, True), (False, 20, 0.05, False),
    (True, 2, 0.4, False), (True, 4, 0.0, True),
])
def test_the_zero_step_rule_is_the_familys(flow, steps, strength, refused, monkeypatch):
    """SD's img2img runs ``int(n·s)`` steps; the flow pipelines ``n − int(n − n·s)``: the
    same job may run nothing on one and a step on the other."""
    family = types.SimpleNamespace(flow_matching=flow)
    init = types.SimpleNamespace(resolved_strength=lambda: strength)
    job = types.SimpleNamespace(init=init, steps=steps, fusion=None)
    said = []
    monkeypatch.setattr(job_spec, "_note_once", said.append)
    job_spec._check_steps_run(job, family)
    assert bool(said) == refused and all("runs no denoising step" in s for s in said)


def test_x0_renoise_on_many_steps_is_said_once(caplog, monkeypatch):
    monkeypatch.setattr(job_spec, "_noted", set())
    with caplog.at_level(logging.WARNING, logger="jointdiff.jobs.spec"):
        job = Job.from_dict({**JOB, "fusion": "x0_renoise", "steps": 50})
        job.build_plugins()
        Job.from_dict({**JOB, "fusion": "x0_renoise", "steps": 4})
    assert [r.getMessage() for r in caplog.records] == [
        "fusion = 'x0_renoise' is for few-step models (1-8 steps) and this job has steps = 50; "
        "for an ordinary model use fusion = 'x0' or 'latent' (docs/fast-modes.md)"
    ]


def test_a_2_gigapixel_canvas_is_refused_by_arithmetic(monkeypatch, capsys):
    """Refused from the canvas shape alone: before a model loads, and in the engine before
    the cost estimate walks the windows."""
    from jointdiff.engine.loop import JointDiffusion

    monkeypatch.setattr(JointDiffusion, "estimate", lambda *a, **k: pytest.fail("the estimate walked the windows"))
    monkeypatch.setattr(loading, "_load_from_string", lambda *a, **k: pytest.fail("the model was loaded"))
    big = {"name": "grid", "height_px": 45056, "width_px": 45056}
    with pytest.raises(ConfigError, match=r"the canvas is 2030\.0 megapixels \(45056×45056 px; [\d,]+ windows\), above max_megapixels = 64"):
        Job.from_dict({**JOB, "geometry": big})
    code = cli.main(["generate", "x", "--geometry", "grid", "-g", "height_px=45056", "-g", "width_px=45056", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and "2030.0 megapixels" in err


def test_the_engine_refuses_a_huge_canvas_before_its_estimate(monkeypatch):
    from jointdiff.core.registry import create
    from jointdiff.engine.loop import JointDiffusion
    from jointdiff.testing import tiny_model

    engine = JointDiffusion(tiny_model("tiny"), create("geometry", "grid", height_px=45056, width_px=45056),
                            [create("conditioner", "text", prompt="x")])
    monkeypatch.setattr(JointDiffusion, "estimate", lambda *a, **k: pytest.fail("the estimate walked the windows"))
    with pytest.raises(ConfigError, match="2030.0 megapixels"):
        engine(1, progress=False)


def test_a_hub_lora_is_not_retried_offline(monkeypatch, no_hub_cache, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "local.safetensors").write_bytes(b"")  # local: never looked up on the hub
    with pytest.raises(ConfigError, match=r"loras\[1\].path = 'someone/style-lora' is a hub id, .*HF_HUB_OFFLINE is set"):
        loading.check_hub_loras([{"path": str(tmp_path / "local.safetensors")}, {"path": "someone/style-lora"}])
    job = Job.from_dict({**JOB, "model": {**JOB["model"], "loras": [{"path": "someone/style-lora"}]}})
    with pytest.raises(ConfigError, match="is a hub id"):
        job_spec.check_before_loading(job)

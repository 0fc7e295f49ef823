"""Job specs, the CLI, and outputs that carry their job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from jointdiff.cli import main, parse_assignment
from jointdiff.errors import ConfigError
from jointdiff.job import Job
from jointdiff.job_toml import dump_job_toml
from jointdiff.output import JOB_KEY, SEED_KEY

JOB_TOML = """
steps = 2
seed = 5
output = "{output}"
view_batch_size = 2

[model]
id = "tiny"
device = "cpu"

[geometry]
name = "strip"
length_px = 640
stride_latent = 16

[[conditioners]]
name = "text"
prompt = "a \\"quoted\\" city"
guidance_scale = 5.0

[synchronizer]
name = "none"
"""


def write_job(tmp_path: Path, **replace) -> Path:
    text = JOB_TOML.format(output=tmp_path / "pano.png")
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_toml_round_trip(tmp_path):
    job = Job.from_toml(write_job(tmp_path))
    again = tmp_path / "again.toml"
    again.write_text(dump_job_toml(job))
    assert Job.from_toml(again) == job
    assert job.conditioners[0].options == {"prompt": 'a "quoted" city', "guidance_scale": 5.0}


def test_run_writes_png_with_job_and_seed_and_reproduces_from_it(tmp_path, capsys):
    assert main(["run", str(write_job(tmp_path)), "--quiet"]) == 0
    output = tmp_path / "pano.png"
    with Image.open(output) as image:
        assert image.size == (640, 512)
        assert image.text[SEED_KEY] == "5"
        embedded = json.loads(image.text[JOB_KEY])
        first = image.tobytes()
    assert embedded["geometry"] == {"name": "strip", "length_px": 640, "stride_latent": 16}
    again = tmp_path / "again.png"
    assert main(["run", str(output), "--output", str(again), "--quiet"]) == 0
    with Image.open(again) as image:
        assert image.tobytes() == first


@pytest.mark.parametrize(
    "replace, message",
    [
        ({"length_px = 640": "length_px = 644"}, "length_px = 644 is not a multiple of the VAE factor 8"),
        ({"length_px = 640": "length_px = 256"}, "smaller than one window"),
        ({"stride_latent = 16": "stride_latent = 0"}, "option 'stride_latent' = 0"),
        ({"stride_latent = 16": "stride_latent = 65"}, "must not exceed the window"),
        ({'name = "strip"': 'name = "spiral"'}, "unknown geometry 'spiral'; available: .*grid.*strip"),
        ({'name = "none"': 'name = "lpips"'}, "unknown synchronizer 'lpips'"),
        ({"length_px = 640": "lenght_px = 640"}, "unknown option 'lenght_px'"),
        ({"length_px = 640": 'length_px = "wide"'}, "option 'length_px' = 'wide'"),
        ({"steps = 2": "steps = 0"}, "option 'steps' = 0"),
        ({"steps = 2": "steps = 2\ncolour = 1"}, "unknown option 'colour'"),
        ({"[model]": "[model"}, r"invalid TOML: .*\(at line 7"),
        ({'id = "tiny"': 'id = "./no/such/model"'}, "model path './no/such/model' does not exist"),
        ({'id = "tiny"': 'id = "nobody/no-such-model"'}, "Hugging Face hub \\(offline or unreachable"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_file(tmp_path, capsys, replace, message):
    status = main(["run", str(write_job(tmp_path, **replace)), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("jointdiff: error: ")
    assert __import__("re").search(message, err[0]), err[0]
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".pano*"))


def test_unwritable_output_fails_before_loading_the_model(tmp_path, capsys):
    status = main(["generate", "x", "--output", str(tmp_path / "missing" / "x.png"), "-q"])
    assert status == 2
    assert "output folder" in capsys.readouterr().err


def test_missing_job_file(capsys):
    assert main(["run", "no-such-job.toml"]) == 2
    assert "job file 'no-such-job.toml' does not exist" in capsys.readouterr().err


def test_generate_with_options_and_saved_job(tmp_path):
    output, saved = tmp_path / "g.png", tmp_path / "g.toml"
    argv = ["generate", "a city", "-g", "length_px=640", "-g", "stride_latent=16", "-g", "wrap=true",
            "--steps", "2", "--device", "cpu", "--output", str(output), "--save-job", str(saved), "-q"]
    assert main(argv) == 0
    job = Job.from_toml(saved)
    assert job.geometry.options == {"length_px": 640, "stride_latent": 16, "wrap": True}
    assert Image.open(output).size == (640, 512)


def test_parse_assignment_reads_toml_values():
    assert parse_assignment("a=8") == ("a", 8)
    assert parse_assignment("a=true") == ("a", True)
    assert parse_assignment("a=[1, 2]") == ("a", [1, 2])
    assert parse_assignment("a=hello world") == ("a", "hello world")
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment("novalue")


def test_plugins_command_lists_builtins_with_distribution():
    completed = subprocess.run(
        [sys.executable, "-m", "jointdiff.cli", "plugins"], capture_output=True, text=True, check=True
    )
    assert "geometry 'strip'  (plugin 'tiles' from jointdiff" in completed.stdout
    assert "length_px: int = 2048" in completed.stdout
    assert "conditioner 'text'" in completed.stdout and "synchronizer 'none'" in completed.stdout


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from jointdiff.output import save_image_atomic

    previous = os.umask(0o022)
    try:
        path = save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "x.png")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_checkpoint_table_resumes_to_the_same_image(tmp_path):
    """A job with [checkpoint] saves its state; a run that resumes from it finishes equal."""
    job_path = write_job(tmp_path, **{"steps = 2": "steps = 3", "[model]": f'[checkpoint]\npath = "{tmp_path / "c.ckpt"}"\nevery = 1\n\n[model]'})
    job = Job.from_toml(job_path)
    from jointdiff.job import run_job

    uninterrupted = Job.from_dict({**job.to_dict(), "checkpoint": None})
    expected = run_job(uninterrupted, progress=False).latents
    first_steps, resumed_steps = [], []
    first = run_job(job, progress=False, callback=lambda i, t, c: first_steps.append(i)).latents
    assert (tmp_path / "c.ckpt").exists()  # written after steps 0 and 1
    resumed = run_job(job, progress=False, callback=lambda i, t, c: resumed_steps.append(i)).latents
    assert first_steps == [0, 1, 2] and resumed_steps == [2]
    import torch

    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(resumed, expected)

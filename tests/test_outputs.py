"""Outputs never lose work: existing files are kept, paths in a job are relative to its file,
the output is checked before the model loads, and every PNG carries its job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from jointdiff.cli import main
from jointdiff.image.output import JOB_KEY, SEED_KEY, read_job_metadata
from jointdiff.jobs.spec import Job, resolve_paths
from jointdiff.utils.errors import ConfigError
from jointdiff.utils.files import free_output, save_image_atomic

# One window of 32 latent cells on a 256×256 canvas, one step: a run takes a moment.
TINY_JOB = """
steps = 1
seed = 7
output = "{output}"

[model]
id = "tiny"
device = "cpu"

[geometry]
name = "grid"
height_px = 256
width_px = 256
window_latent = 32

[[conditioners]]
name = "text"
prompt = "a city"
"""


def write_job(folder: Path, output: str = "pano.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.toml"
    path.write_text(TINY_JOB.format(output=output))
    return path


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_reproducing_an_image_never_overwrites_it(tmp_path, capsys, monkeypatch):
    job = write_job(tmp_path)
    assert main(["run", str(job), "-q"]) == 0
    image = tmp_path / "pano.png"
    original = pixels(image)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the PNG's stored output means nothing here
    capsys.readouterr()
    assert main(["run", str(image), "--seed", "8", "-q"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(tmp_path / "pano-1.png")]
    assert err.strip() == f"jointdiff: note: '{image}' exists; writing '{tmp_path / 'pano-1.png'}' instead (--overwrite replaces it)"
    assert pixels(image) == original and pixels(tmp_path / "pano-1.png") != original
    with Image.open(tmp_path / "pano-1.png") as rerun:
        assert rerun.text[SEED_KEY] == "8"
        assert json.loads(rerun.text[JOB_KEY])["output"] == str(tmp_path / "pano-1.png")
    assert names(elsewhere) == []


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    job = write_job(tmp_path)
    assert main(["run", str(job), "-q"]) == 0
    first = pixels(tmp_path / "pano.png")
    assert main(["run", str(job), "-q", "--seed", "1"]) == 0
    assert pixels(tmp_path / "pano.png") == first
    assert names(tmp_path) == ["job.toml", "pano-1.png", "pano.png"]
    assert main(["run", str(job), "-q", "--seed", "1", "--overwrite"]) == 0
    assert pixels(tmp_path / "pano.png") == pixels(tmp_path / "pano-1.png")
    assert names(tmp_path) == ["job.toml", "pano-1.png", "pano.png"]
    image = tmp_path / "pano-1.png"
    assert main(["run", str(image), "-q", "--overwrite"]) == 0  # asked: the image itself is replaced
    assert names(tmp_path) == ["job.toml", "pano-1.png", "pano.png"]


def test_paths_in_a_job_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs"
    job = write_job(jobs, output="renders/pano.png")
    (jobs / "renders").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["run", "jobs/job.toml", "-q"]) == 0
    assert names(jobs / "renders") == ["pano.png"]
    assert Job.from_toml(job).output == str(jobs / "renders" / "pano.png")


def test_relative_plugin_and_model_paths_resolve_against_the_job_folder(tmp_path):
    (tmp_path / "edges.png").touch()
    (tmp_path / "weights").mkdir()
    data = {
        "output": "out.png",
        "checkpoint": {"path": "state.ckpt"},
        "model": {"id": "weights", "loras": [{"path": "style.safetensors"}, {"path": "owner/lora"}]},
        "conditioners": [
            {"name": "regions", "regions": [{"prompt": "sky", "mask": "masks/sky.png"}]},
            {"name": "controlnet", "controls": [{"model": "tiny", "image": "edges.png"}, {"model": "owner/cn", "image": ["a.png", "/abs/b.png"]}]},
        ],
        "synchronizer": {"name": "syncdiffusion", "taesd_path": "madebyollin/taesd"},
    }
    resolved = resolve_paths(data, tmp_path)
    assert resolved["output"] == str(tmp_path / "out.png")
    assert resolved["checkpoint"]["path"] == str(tmp_path / "state.ckpt")
    assert resolved["model"]["id"] == str(tmp_path / "weights")  # exists there: a local folder
    assert [lora["path"] for lora in resolved["model"]["loras"]] == [str(tmp_path / "style.safetensors"), "owner/lora"]
    assert resolved["conditioners"][0]["regions"][0]["mask"] == str(tmp_path / "masks" / "sky.png")
    controls = resolved["conditioners"][1]["controls"]
    assert controls[0] == {"model": "tiny", "image": str(tmp_path / "edges.png")}
    assert controls[1] == {"model": "owner/cn", "image": [str(tmp_path / "a.png"), "/abs/b.png"]}
    assert resolved["synchronizer"]["taesd_path"] == "madebyollin/taesd"  # a hub id stays one
    assert data["output"] == "out.png"  # the input is not changed
    assert resolve_paths({"model": {"id": "tiny"}}, tmp_path)["model"]["id"] == "tiny"


def test_a_mask_next_to_the_job_file_is_found_from_another_folder(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs"
    job = write_job(jobs)
    Image.new("L", (256, 256), 255).save(jobs / "sky.png")
    text = job.read_text().replace('name = "text"\nprompt = "a city"', 'name = "regions"\nprompt = "a city"\nregions = [{ prompt = "sky", mask = "sky.png" }]')
    job.write_text(text)
    monkeypatch.chdir(tmp_path)
    parsed = Job.from_toml("jobs/job.toml")
    assert parsed.conditioners[0].options["regions"][0]["mask"] == str(jobs / "sky.png")


def test_unwritable_output_fails_before_the_model_loads_naming_the_output(tmp_path, capsys, monkeypatch):
    import tempfile

    import jointdiff.jobs.spec

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(jointdiff.jobs.spec, "run_job", lambda *a, **k: pytest.fail("the model must not load"))
    assert main(["run", str(write_job(tmp_path)), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"jointdiff: error: output folder '{tmp_path}' is not writable (Permission denied)"


def test_a_failed_write_names_the_output_not_a_temporary_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(ConfigError, match=f"cannot write output '{tmp_path / 'x.png'}': Permission denied"):
        save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "x.png")
    assert names(tmp_path) == []


def test_free_output_skips_every_taken_name(tmp_path):
    assert free_output(tmp_path / "a.png") == tmp_path / "a.png"
    (tmp_path / "a.png").touch()
    (tmp_path / "a-1_0.png").touch()  # a face of an earlier multi-image a-1
    assert free_output(tmp_path / "a.png") == tmp_path / "a-2.png"
    assert free_output(tmp_path / "a.png", count=1) == tmp_path / "a-1.png"
    with pytest.raises(FileExistsError):
        save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "a.png", overwrite=False)


def test_python_api_pngs_carry_their_job(tiny_pipeline, tmp_path):
    from jointdiff import JointDiffusion, create

    engine = JointDiffusion(
        tiny_pipeline,
        create("geometry", "grid", height_px=256, width_px=256, window_latent=32),
        [create("conditioner", "text", prompt="a city", guidance_scale=3.0)],
    )
    result = engine(num_inference_steps=1, seed=11, progress=False)
    assert result.save(tmp_path / "api.png") == [tmp_path / "api.png"]
    job = Job.from_dict(read_job_metadata(tmp_path / "api.png"))
    assert (job.model.id, job.model.family, job.steps, job.seed) == ("tiny", "sd", 1, 11)
    assert job.geometry.options == {"height_px": 256, "width_px": 256, "window_latent": 32}
    assert job.conditioners[0].options == {"prompt": "a city", "guidance_scale": 3.0}
    assert result.save(tmp_path / "api.png", overwrite=False) == [tmp_path / "api-1.png"]
    # and the image runs again to the same pixels
    assert main(["run", str(tmp_path / "api.png"), "-o", str(tmp_path / "again.png"), "-q"]) == 0
    assert pixels(tmp_path / "again.png") == pixels(tmp_path / "api.png")


def test_save_job_keeps_an_existing_file(tmp_path, capsys):
    saved = tmp_path / "g.toml"
    saved.write_text("# mine\n")
    argv = ["generate", "a city", "-g", "height_px=256", "-g", "width_px=256", "-g", "window_latent=32",
            "--geometry", "grid", "--steps", "1", "--device", "cpu", "-o", str(tmp_path / "g.png"),
            "--save-job", str(saved), "-q"]
    assert main(argv) == 0
    assert saved.read_text() == "# mine\n"
    assert Job.from_toml(tmp_path / "g-1.toml").steps == 1
    assert "writing the job to" in capsys.readouterr().err

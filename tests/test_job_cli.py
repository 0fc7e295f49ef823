"""Job specs, the CLI, and outputs that carry their job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from jointdiff.cli import main, parse_assignment
from jointdiff.image.output import JOB_KEY, SEED_KEY
from jointdiff.jobs.spec import Job
from jointdiff.jobs.toml_writer import dump_job_toml
from jointdiff.utils.errors import ConfigError

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
        ({'id = "tiny"': 'id = "./no/such/model"'}, "model path '/.*/no/such/model' does not exist"),
        ({'id = "tiny"': 'id = "nobody/no-such-model"'}, "Hugging Face hub \\(offline or unreachable"),
        # errors known from the job, reported before diffusers or the model loads
        ({"seed = 5": f"seed = {2**63}"}, f"option 'seed' = {2**63}: .*less than or equal to {2**63 - 1}"),
        ({"seed = 5": "seed = -1"}, "option 'seed' = -1"),
        ({'device = "cpu"': 'device = "mps"'}, "device = 'mps': MPS .* not available on this machine"),
        ({'device = "cpu"': 'device = "gpu0"'}, "option 'model.device' = 'gpu0': device must be"),
        ({'device = "cpu"': 'dtype = "float8"'}, "option 'model.dtype' = 'float8': dtype must be"),
        ({'device = "cpu"': 'scheduler = "heun2"'}, "option 'model.scheduler' = 'heun2': scheduler must be one of"),
        ({'device = "cpu"': 'scheduler = "flow_euler"'}, r"job: model.scheduler must be one of \['ddim', .*\] for model family 'sd', got 'flow_euler'"),
        ({"guidance_scale = 5.0": "guidance_scale = inf"}, "option 'guidance_scale' = inf: Input should be a finite number"),
        ({"guidance_scale = 5.0": "guidance_scale = nan"}, "option 'guidance_scale' = nan"),
        ({"[synchronizer]": '[[conditioners]]\nname = "tile_text"\nprompts = ["a wall"]\n\n[synchronizer]'},
         "conditioners: 'text' and 'tile_text' both provide the prompt"),
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

    from jointdiff.utils.files import save_image_atomic

    previous = os.umask(0o022)
    try:
        path = save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "x.png")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_checkpoint_table_resumes_to_the_same_image(tmp_path):
    """A job with [checkpoint] saves its state; a run stopped after step 1 keeps it, the run
    that resumes from it finishes equal to an uninterrupted one and removes it."""
    import torch

    from jointdiff.engine.loop import StopJob
    from jointdiff.jobs.spec import run_job

    job_path = write_job(tmp_path, **{"steps = 2": "steps = 3", "[model]": '[checkpoint]\npath = "c.ckpt"\nevery = 1\n\n[model]'})
    job = Job.from_toml(job_path)
    assert job.checkpoint.path == str(tmp_path / "c.ckpt")  # relative to the job file's folder
    uninterrupted = Job.from_dict({**job.to_dict(), "checkpoint": None})
    expected = run_job(uninterrupted, progress=False).latents
    first_steps, resumed_steps = [], []

    def stop_after_step_1(i, t, canvas):
        first_steps.append(i)
        if i == 1:
            raise StopJob()

    run_job(job, progress=False, callback=stop_after_step_1)
    assert (tmp_path / "c.ckpt").exists()  # kept: the job did not finish
    resumed = run_job(job, progress=False, callback=lambda i, t, c: resumed_steps.append(i)).latents
    assert first_steps == [0, 1] and resumed_steps == [2]
    torch.testing.assert_close(resumed, expected)
    assert not (tmp_path / "c.ckpt").exists()  # removed once the job finished


# -- errors early and exact ----------------------------------------------------------------


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jointdiff: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_cuda_on_a_machine_without_it_fails_before_loading(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["run", str(write_job(tmp_path)), "--device", "cuda", "-q"]) == 2
    assert "device = 'cuda': CUDA is not available on this machine" in one_error_line(capsys)
    assert main(["generate", "x", "--device", "cuda:1", "-o", str(tmp_path / "g.png"), "-q"]) == 2
    assert "device = 'cuda:1'" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml"]


def test_huge_seed_on_the_command_line(tmp_path, capsys):
    assert main(["run", str(write_job(tmp_path)), "--seed", str(2**64), "-q"]) == 2
    assert f"option 'seed' = {2**64}" in one_error_line(capsys)
    assert main(["generate", "x", "--seed", "-3", "-o", str(tmp_path / "g.png"), "-q"]) == 2
    assert "option 'seed' = -3" in one_error_line(capsys)


def test_local_folder_that_is_not_a_model_is_not_blamed_on_the_hub(tmp_path, capsys):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    job = write_job(tmp_path, **{'id = "tiny"': 'id = "my-model"'})  # relative to the job file's folder
    assert main(["run", str(job), "-q"]) == 2
    line = one_error_line(capsys)
    assert f"model folder '{folder}' lists component 'unet' in model_index.json, but the folder 'unet/' is missing" in line
    assert "hub" not in line
    (folder / "model_index.json").unlink()
    assert main(["run", str(job), "-q"]) == 2
    assert "has no model_index.json: it is not a diffusers pipeline folder" in one_error_line(capsys)


def test_run_on_an_image_without_a_job_says_so(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    assert main(["run", str(tmp_path / "photo.jpg")]) == 2
    assert "is a JPEG image, which carries no jointdiff job: only PNGs made by jointdiff carry one" in one_error_line(capsys)
    (tmp_path / "photo.jpg").rename(tmp_path / "photo.toml")  # the content decides, not the suffix
    assert main(["run", str(tmp_path / "photo.toml")]) == 2
    assert "JPEG image" in one_error_line(capsys)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["run", str(tmp_path / "plain.png")]) == 2
    assert "carries no jointdiff job: only PNGs made by jointdiff carry one" in one_error_line(capsys)


def test_a_job_without_a_prompt_conditioner(tmp_path, capsys):
    job = write_job(tmp_path, **{'name = "text"': 'name = "controlnet"\nmodel = "tiny"\nimage = "edges.png"', 'prompt = "a \\"quoted\\" city"\nguidance_scale = 5.0': ""})
    Image.new("RGB", (640, 512)).save(tmp_path / "edges.png")
    assert main(["run", str(job), "-q"]) == 2
    assert "conditioners: ['controlnet'] provide no prompt" in one_error_line(capsys)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "job.toml", "--seed", "x"])
    assert info.value.code == 2
    assert "argument --seed: invalid int value: 'x'" in one_error_line(capsys)


BAD_JOBS_SCRIPT = """
import sys
from jointdiff.cli import main
statuses = [main(["run", path, "-q"]) for path in sys.argv[1:]]
heavy = sorted(m for m in ("diffusers", "transformers") if m in sys.modules)
print(statuses, heavy)
"""


def test_errors_known_from_the_job_come_before_diffusers_is_imported(tmp_path):
    """Typos, bad values, devices, seeds, schedulers, guidance scales, a second prompt
    conditioner, a folder that is no model: none of them imports diffusers or transformers."""
    cases = [
        {"length_px = 640": "lenght_px = 640"},
        {"seed = 5": f"seed = {2**63}"},
        {'device = "cpu"': 'device = "mps"'},
        {'device = "cpu"': 'scheduler = "flow_euler"'},
        {"guidance_scale = 5.0": "guidance_scale = inf"},
        {'id = "tiny"': 'id = "./nothing-here"'},
    ]
    paths = []
    for index, replace in enumerate(cases):
        folder = tmp_path / str(index)
        folder.mkdir()
        paths.append(str(write_job(folder, **replace)))
    completed = subprocess.run([sys.executable, "-c", BAD_JOBS_SCRIPT, *paths], capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip() == f"{[2] * len(cases)} []", completed.stderr
    assert len(completed.stderr.strip().splitlines()) == len(cases)


# -- help ------------------------------------------------------------------------------------


def test_every_option_of_every_command_has_help_and_shows_its_default(capsys):
    from jointdiff.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in {"": parser, **commands}.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "denoising steps (default: 50)" in text and "(default: strip)" in text and "(default: jointdiff.png)" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("jointdiff 0.")


def test_plugins_command_shows_descriptions_and_allowed_values(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "direction: 'horizontal' | 'vertical' = 'horizontal'" in out
    assert "length_px: int = 2048  [> 0]  -- strip length in pixels" in out
    assert "guidance_scale: float | None = None  [>= 0.0, finite]" in out
    assert "        rect: list[float] | None = None" in out  # the fields of each region table


def test_taesd_folder_without_config_json_is_named(tmp_path, capsys):
    folder = tmp_path / "taesd"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").touch()
    sync = '[synchronizer]\nname = "syncdiffusion"\ndecoder = "taesd"\ntaesd_path = "taesd"\nnet = "alex"\nlpips_random_backbone = true'
    job = write_job(tmp_path, **{'[synchronizer]\nname = "none"': sync})
    assert main(["run", str(job), "-q"]) == 2
    line = one_error_line(capsys)
    assert f"taesd_path = '{folder}': the folder has no config.json" in line
    assert "hub" not in line

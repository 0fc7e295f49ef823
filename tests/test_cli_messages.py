"""Errors the command line alone shows come as one line with exit 2 before a model loads;
``view`` keeps the output rules of every other command; Ctrl-C says what was kept."""

from __future__ import annotations

import tempfile

import pytest
from PIL import Image

from jointdiff import cli
from jointdiff.cli import commands
from jointdiff.models import loading


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(loading, "_load_from_string", lambda *a, **k: pytest.fail("the model was loaded"))


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_lora_with_a_strength_that_is_no_number(capsys, no_loading):
    code, out, err = _run(["generate", "x", "--lora", "style.safetensors:abc", "--steps", "1"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--lora 'style.safetensors:abc': the strength after ':' must be a number, got 'abc'" in err
    assert commands._lora_table("style.safetensors:0.5") == {"path": "style.safetensors", "scale": 0.5}


def test_a_path_with_a_colon_is_a_path(tmp_path):
    odd = tmp_path / "a:b.safetensors"
    odd.write_bytes(b"")
    assert commands._lora_table(str(odd)) == {"path": str(odd)}


def test_estimate_and_profile_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "x", "--estimate", "--profile"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "argument --profile: not allowed with argument --estimate" in err


@pytest.fixture
def pano(tmp_path):
    path = tmp_path / "pano.png"
    Image.new("RGB", (64, 32), (10, 20, 30)).save(path)
    return path


def test_view_keeps_an_existing_page(pano, capsys):
    page = pano.with_suffix(".html")
    page.write_text("mine")
    code, out, err = _run(["view", str(pano)], capsys)
    assert code == 0 and page.read_text() == "mine"
    assert out.strip() == str(pano.with_name("pano-1.html"))
    assert "exists; writing" in err and "--overwrite replaces it" in err
    code, out, err = _run(["view", str(pano), "--overwrite"], capsys)
    assert code == 0 and out.strip() == str(page) and page.read_text().lower().startswith("<!doctype html>")


def test_view_says_a_panorama_is_not_2_to_1(tmp_path, capsys):
    square = tmp_path / "square.png"
    Image.new("RGB", (32, 32)).save(square)
    code, out, err = _run(["view", str(square)], capsys)
    assert code == 0
    assert "jointdiff: note: " in err and "is 32×32 px, not 2:1" in err
    code, out, err = _run(["view", str(tmp_path / "square.png"), "-o", str(tmp_path / "b.html")], capsys)
    assert err.count("not 2:1") == 1


def test_view_failed_write_names_the_page(pano, capsys, monkeypatch):
    def refuse(prefix="", suffix="", dir=None):
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}x1y2{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, out, err = _run(["view", str(pano), "-o", str(pano.with_name("page.html"))], capsys)
    assert code == 2 and out == ""
    assert err == f"jointdiff: error: cannot write the viewer page {str(pano.with_name('page.html'))!r} (Permission denied)\n"


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_names_the_checkpoint_and_how_to_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(commands, "run_job", _interrupt)
    (tmp_path / "job.ckpt").write_bytes(b"state")
    (tmp_path / "job.toml").write_text(
        'steps = 2\noutput = "out.png"\n[model]\nid = "tiny"\ndevice = "cpu"\n'
        '[geometry]\nname = "strip"\nlength_px = 768\n[[conditioners]]\nname = "text"\nprompt = "x"\n'
        '[checkpoint]\npath = "job.ckpt"\n'
    )
    code, out, err = _run(["run", str(tmp_path / "job.toml")], capsys)
    assert code == 130
    assert err == (f"jointdiff: interrupted; the steps done are kept in checkpoint {str(tmp_path / 'job.ckpt')!r}: "
                   "run the same command again to resume from it\n")


def test_ctrl_c_without_a_checkpoint_says_how_to_have_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(commands, "run_job", _interrupt)
    code, out, err = _run(["generate", "x", "-g", "length_px=768", "--steps", "1", "--device", "cpu",
                           "-o", str(tmp_path / "x.png")], capsys)
    assert code == 130 and err.startswith("jointdiff: interrupted; nothing was written; to resume a long job")


def test_a_checkpoint_in_a_missing_folder_is_refused_before_loading(tmp_path, capsys, no_loading):
    (tmp_path / "job.toml").write_text(
        'steps = 2\noutput = "out.png"\n[model]\nid = "tiny"\ndevice = "cpu"\n'
        '[geometry]\nname = "strip"\nlength_px = 768\n[[conditioners]]\nname = "text"\nprompt = "x"\n'
        '[checkpoint]\npath = "no-such-folder/job.ckpt"\n'
    )
    code, out, err = _run(["run", str(tmp_path / "job.toml")], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"checkpoint.path {str(tmp_path / 'no-such-folder' / 'job.ckpt')!r}: its folder" in err and "does not exist" in err


def test_a_failed_checkpoint_write_names_the_checkpoint(tmp_path, monkeypatch):
    import torch

    from jointdiff.engine import distributed
    from jointdiff.utils.errors import ConfigError

    def full(payload, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ConfigError) as error:
        distributed._atomic_save({}, tmp_path / "job.ckpt")
    assert str(error.value) == f"checkpoint.path {str(tmp_path / 'job.ckpt')!r}: cannot write it (No space left on device)"
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_a_table_typo_names_the_table_and_echoes_no_job(tmp_path, capsys):
    (tmp_path / "job.toml").write_text(
        'steps = 2\n[model]\nid = "tiny"\n[geometry]\nname = "strip"\nlength_px = 768\n'
        '[[conditioner]]\nname = "text"\nprompt = "a long prompt that must not be echoed back"\n'
    )
    code, out, err = _run(["run", str(tmp_path / "job.toml")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err == ("jointdiff: error: job: option 'conditioners' is missing; "
                   "job: unknown option 'conditioner' (did you mean 'conditioners'?)\n")


@pytest.mark.parametrize("region, message", [
    ({"prompt": "boat", "rect": [900, 0, 1000, 100]}, r"rect = \[900.0, 0.0, 1000.0, 100.0\] lies outside the 768×512 px canvas"),
    ({"prompt": "boat", "rect": [100, 0, 50, 100]}, r"must be \[left, top, right, bottom\] with right > left"),
    ({"prompt": "boat", "polygon": [[0, 0], [10, 10]]}, r"at least three \[x, y\] points"),
    ({"prompt": "boat", "rect": [0, 0, 10, 10], "sheet": 1}, r"sheet = 1 but the canvas has 1 sheet"),
])
def test_region_shapes_are_refused_before_loading(region, message, capsys, no_loading):
    from jointdiff.jobs.spec import Job
    from jointdiff.utils.errors import ConfigError

    job = {"model": {"id": "tiny", "device": "cpu"}, "geometry": {"name": "strip", "length_px": 768},
           "conditioners": [{"name": "regions", "prompt": "a lake", "regions": [region]}], "steps": 2}
    with pytest.raises(ConfigError, match=message):
        Job.from_dict(job)


def test_a_region_mask_of_another_size_is_refused_before_loading(tmp_path, no_loading):
    from jointdiff.jobs.spec import Job
    from jointdiff.utils.errors import ConfigError

    Image.new("L", (512, 768), 255).save(tmp_path / "tall.png")  # stored portrait ...
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("L", (512, 768), 255).save(tmp_path / "turned.png", exif=exif)  # ... shown landscape
    job = {"model": {"id": "tiny", "device": "cpu"}, "geometry": {"name": "strip", "length_px": 768},
           "conditioners": [{"name": "regions", "prompt": "a lake",
                             "regions": [{"prompt": "boat", "mask": str(tmp_path / "tall.png")}]}], "steps": 2}
    with pytest.raises(ConfigError, match=r"mask is 512×768 px \(w×h\) but the canvas sheet is 768×512 px"):
        Job.from_dict(job)
    job["conditioners"][0]["regions"][0]["mask"] = str(tmp_path / "turned.png")
    Job.from_dict(job)  # upright it has the canvas's size

"""Path confinement of jobs composed in the browser (jointdiff.ui.safety): a LoRA's
weight_name stays inside its folder, and path-like options of plugins the server does not
know by name are confined like the known ones."""

from __future__ import annotations

import pytest

from jointdiff.ui.safety import confine_paths
from jointdiff.utils.errors import ConfigError


def job(**geometry_options) -> dict:
    return {
        "model": {"id": "tiny", "device": "cpu"},
        "geometry": {"name": "strip", "length_px": 96, **geometry_options},
        "conditioners": [{"name": "text", "prompt": "a road to/from ../nowhere", "negative_prompt": "/blurry"}],
        "steps": 1,
    }


@pytest.fixture
def root(tmp_path, monkeypatch):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "lora").mkdir(parents=True), outside.mkdir()
    (root / "lora" / "style.safetensors").write_bytes(b"x")
    (root / "reference.png").write_bytes(b"x")
    (outside / "secret.txt").write_bytes(b"x")
    (root / "lora" / "link.safetensors").symlink_to(outside / "secret.txt")
    monkeypatch.chdir(outside)  # the server's working folder lies outside the roots
    return root


def test_lora_weight_name_must_stay_inside_the_lora_folder(root):
    data = job()
    data["model"]["loras"] = [{"path": "lora", "weight_name": "style.safetensors"}]
    assert confine_paths(data, [root])["model"]["loras"][0]["weight_name"] == "style.safetensors"
    for bad in ("/etc/passwd", "../../outside/secret.txt", "link.safetensors", "~/.ssh/id_rsa"):
        data["model"]["loras"][0]["weight_name"] = bad
        with pytest.raises(ConfigError, match=rf"model\.loras\[0\]\.weight_name = '{bad}' must name a file inside"):
            confine_paths(data, [root])
    data["model"]["loras"] = [{"path": "org/style-lora", "weight_name": "../../x.safetensors"}]  # a hub id
    with pytest.raises(ConfigError, match=r"weight_name = '\.\./\.\./x\.safetensors'"):
        confine_paths(data, [root])


@pytest.mark.parametrize("value", ["/etc/passwd", "../outside/secret.txt", "secret.txt", "~/secret.txt"])
def test_path_like_options_of_unknown_plugins_are_confined(root, value):
    with pytest.raises(ConfigError, match=rf"geometry\.reference_file = '{value}' is outside the folders"):
        confine_paths(job(reference_file=value), [root])
    nested = job(extra={"files": ["reference.png", value]})
    with pytest.raises(ConfigError, match=rf"geometry\.extra\.files\[1\] = '{value}' is outside"):
        confine_paths(nested, [root])


def test_files_inside_the_roots_words_prompts_and_hub_ids_pass(root):
    data = job(reference_file="./reference.png", style="watercolor", helper="org/some-model", small="tiny")
    confined = confine_paths(data, [root])
    geometry = confined["geometry"]
    assert geometry["reference_file"] == str((root / "reference.png").resolve())
    assert (geometry["style"], geometry["helper"], geometry["small"]) == ("watercolor", "org/some-model", "tiny")
    assert confined["conditioners"] == data["conditioners"]  # prompts are text, never files

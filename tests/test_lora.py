"""LoRAs: loaded through diffusers, several at once, checked against weights merged by hand.

The LoRAs are made here, for the tiny SD UNet, with peft (random ``lora_B`` from fixed seeds
so they change the output). A job with LoRAs must equal the same job on a fresh tiny
pipeline whose attention weights were merged by hand: ``W += scale · α/r · B A``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from jointdiff.utils.errors import ConfigError

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TOLERANCE = 1e-4
B_STD = 2.0
"""Standard deviation of the random ``lora_B`` weights."""


@dataclass(frozen=True)
class SavedLora:
    """A LoRA written to disk: what a job names (``path``, ``weight_name``), the weights
    file itself and its ``α / r``."""

    path: str
    weight_name: str | None
    file: Path
    scaling: float

    def spec(self, scale: float) -> dict[str, Any]:
        spec: dict[str, Any] = {"path": self.path, "scale": scale}
        if self.weight_name is not None:
            spec["weight_name"] = self.weight_name
        return spec


def unet_for_lora(cross_attention_dim: int = 32):
    """The tiny UNet's architecture (``cross_attention_dim`` changes its attention shapes)."""
    from diffusers import UNet2DConditionModel

    from jointdiff.models.tiny import tiny_unet

    if cross_attention_dim == 32:
        return tiny_unet()
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def lora_tensors(seed: int, rank: int, alpha: int, cross_attention_dim: int = 32):
    """(peft state dict of a random UNet LoRA, its LoraConfig)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = unet_for_lora(cross_attention_dim)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        unet.add_adapter(config)
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: draw it, so the LoRA does something
                parameter.normal_(std=B_STD)
    state = {key: value.detach().clone() for key, value in get_peft_model_state_dict(unet).items()}
    return state, config


def save_unet_lora(folder: Path, state: dict[str, torch.Tensor], config=None, weight_name: str | None = None) -> Path:
    """Write a diffusers LoRA file for the UNet (``metadata``: the LoraConfig, so α is kept)."""
    from diffusers import StableDiffusionPipeline

    metadata = config.to_dict() if config is not None else None
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=state, weight_name=weight_name, unet_lora_adapter_metadata=metadata
    )
    return folder / (weight_name or "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, SavedLora]:
    """Two good UNet LoRAs (a file named directly, α = r, no metadata; a folder with
    ``weight_name``, α = 2r, with metadata), a text-encoder LoRA and three that fit nothing."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("loras")
    out = {}
    state, _ = lora_tensors(seed=1, rank=4, alpha=4)
    file = save_unet_lora(root / "first", state)
    out["first"] = SavedLora(str(file), None, file, scaling=1.0)
    state, config = lora_tensors(seed=2, rank=2, alpha=4)
    file = save_unet_lora(root / "second", state, config, weight_name="second.safetensors")
    out["second"] = SavedLora(str(root / "second"), "second.safetensors", file, scaling=2.0)
    out["text_encoder"] = _text_encoder_lora(root / "text_encoder")

    unet_keys = {f"unet.{key}": value for key, value in lora_tensors(seed=3, rank=4, alpha=4)[0].items()}
    save_file({key.replace("unet.", "transformer.", 1): v for key, v in unet_keys.items()}, root / "other_prefix.safetensors")
    save_file({key.replace("transformer_blocks", "blocks_x"): v for key, v in unet_keys.items()}, root / "renamed.safetensors")
    out["other_prefix"] = SavedLora(str(root / "other_prefix.safetensors"), None, root / "other_prefix.safetensors", 1.0)
    out["renamed"] = SavedLora(str(root / "renamed.safetensors"), None, root / "renamed.safetensors", 1.0)
    state, _ = lora_tensors(seed=4, rank=4, alpha=4, cross_attention_dim=48)
    file = save_unet_lora(root / "other_shape", state)
    out["other_shape"] = SavedLora(str(file), None, file, 1.0)
    return out


def _text_encoder_lora(folder: Path) -> SavedLora:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from jointdiff.models.tiny import tiny_text_encoder

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        encoder = inject_adapter_in_model(config, tiny_text_encoder())
    StableDiffusionPipeline.save_lora_weights(folder, text_encoder_lora_layers=get_peft_model_state_dict(encoder))
    return SavedLora(str(folder), None, folder / "pytorch_lora_weights.safetensors", 1.0)


def job_dict(loras=()) -> dict[str, Any]:
    return {
        "model": {"id": "tiny", "device": "cpu", "dtype": "float32", "loras": list(loras)},
        "geometry": {"name": "strip", "length_px": 512},
        "conditioners": [{"name": "text", "prompt": "x"}],
        "steps": 1,
    }


def merge_by_hand(unet: torch.nn.Module, lora: SavedLora, scale: float) -> int:
    """``W += scale · α/r · B A`` for every LoRA pair in the file; returns how many layers."""
    from safetensors.torch import load_file

    tensors = load_file(lora.file)
    merged = 0
    with torch.no_grad():
        for key, down in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            up = tensors[key.replace(".lora_A.", ".lora_B.")]
            layer = unet.get_submodule(key.removeprefix("unet.").removesuffix(".lora_A.weight"))
            layer.weight += scale * lora.scaling * (up @ down)
            merged += 1
    return merged


def run(loras=(), pipeline=None) -> torch.Tensor:
    from jointdiff.jobs.spec import Job, run_job

    return run_job(Job.from_dict(job_dict(loras)), pipeline=pipeline, progress=False).latents


def run_merged(*parts: tuple[SavedLora, float]) -> torch.Tensor:
    """The job without LoRAs on a fresh tiny pipeline with ``parts`` merged by hand."""
    from jointdiff.models.tiny import build_tiny_pipeline

    pipeline = build_tiny_pipeline()
    for lora, scale in parts:
        assert merge_by_hand(pipeline.unet, lora, scale) == 32  # q, k, v, out of 8 attentions
    return run(pipeline=pipeline)


@pytest.fixture(scope="module")
def plain() -> torch.Tensor:
    return run()


def assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


# -- (a), (b): results equal weights merged by hand -------------------------------------------


@pytest.fixture(scope="module")
def first_only(loras) -> torch.Tensor:
    """The job with the first LoRA at 0.8, loaded by jointdiff."""
    return run([loras["first"].spec(0.8)])


def test_one_lora_equals_weights_merged_by_hand(loras, plain, first_only):
    expected = run_merged((loras["first"], 0.8))
    assert (first_only - plain).abs().max() > 100 * TOLERANCE  # the LoRA changes the result
    torch.testing.assert_close(first_only, expected, atol=TOLERANCE, rtol=0)


def test_two_loras_at_once_equal_both_merged_by_hand(loras, first_only):
    first, second = loras["first"], loras["second"]
    actual = run([first.spec(0.8), second.spec(-0.6)])
    expected = run_merged((first, 0.8), (second, -0.6))
    assert (actual - first_only).abs().max() > 100 * TOLERANCE  # the second LoRA counts too
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)


def test_loras_are_named_adapters_with_their_scales(loras):
    from jointdiff.models.loading import load_model

    model = load_model("tiny", device="cpu", dtype="float32", loras=[loras["first"].spec(0.8), loras["second"].spec(0.5)])
    assert model.pipeline.get_list_adapters() == {"unet": ["lora_0", "lora_1"]}
    layer = model.pipeline.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    assert layer.scaling == {"lora_0": pytest.approx(0.8), "lora_1": pytest.approx(2.0 * 0.5)}


def test_a_text_encoder_lora_is_accepted(loras):
    from jointdiff.models.lora import injected_layers, load_loras
    from jointdiff.models.tiny import build_tiny_pipeline

    pipeline = build_tiny_pipeline()
    names = load_loras(pipeline, [loras["text_encoder"].spec(1.0)])
    assert injected_layers(pipeline, names[0]) == {"text_encoder": 4}


# -- (c): paths are checked before any model loads --------------------------------------------


@pytest.mark.parametrize("path", ["/no/such/lora.safetensors", "./missing-lora", "~/no-such-lora.bin", "no/such/folder"])
def test_a_missing_local_lora_fails_when_the_job_is_read(path):
    from jointdiff.jobs.spec import Job

    with pytest.raises(ConfigError) as error:
        Job.from_dict(job_dict([{"path": path, "scale": 0.8}]))
    assert_one_line(error, "model.loras.0.path", repr(path), "no such LoRA file or folder")


def test_a_hub_repository_id_is_left_for_loading():
    from jointdiff.jobs.spec import Job

    job = Job.from_dict(job_dict([{"path": "someone/some-lora", "weight_name": "lora.safetensors"}]))
    assert job.model.loras[0].path == "someone/some-lora"


def test_a_missing_weight_name_in_a_local_folder_fails_early(loras):
    from jointdiff.jobs.spec import Job

    with pytest.raises(ConfigError) as error:
        Job.from_dict(job_dict([{"path": loras["second"].path, "weight_name": "nope.safetensors"}]))
    assert_one_line(error, "model.loras.0.weight_name", "'nope.safetensors'")


def test_check_lora_paths_names_the_bad_one(loras):
    from jointdiff.models.lora import check_lora_paths

    with pytest.raises(ConfigError) as error:
        check_lora_paths([loras["first"].spec(1.0), {"path": "/no/such.safetensors"}])
    assert_one_line(error, "loras[1].path = '/no/such.safetensors'")
    with pytest.raises(ConfigError) as error:
        check_lora_paths([{"path": loras["first"].path, "strength": 1.0}])
    assert_one_line(error, "loras[0]", "'strength'")


def test_paths_are_checked_before_the_pipeline_is_touched():
    from jointdiff.models.lora import load_loras

    with pytest.raises(ConfigError) as error:
        load_loras(SimpleNamespace(pipeline=None), [{"path": "/no/such.safetensors"}])
    assert_one_line(error, "loras[0].path", "no such LoRA file")


# -- (d) and families: LoRAs that do not fit are refused --------------------------------------


@pytest.mark.parametrize("name", ["other_prefix", "renamed", "other_shape"])
def test_a_lora_that_fits_nothing_is_refused(loras, name):
    from jointdiff.models.loading import load_model

    path = loras[name].path
    with pytest.raises(ConfigError) as error:
        load_model("tiny", device="cpu", dtype="float32", loras=[{"path": path}])
    assert_one_line(error, f"loras[0].path = {path!r}")


def test_a_refused_lora_leaves_no_adapters_behind(loras):
    from jointdiff.models.lora import load_loras
    from jointdiff.models.tiny import build_tiny_pipeline

    pipeline = build_tiny_pipeline()
    with pytest.raises(ConfigError) as error:
        load_loras(pipeline, [loras["first"].spec(1.0), {"path": loras["other_prefix"].path}])
    assert_one_line(error, "loras[1].path", "fit")
    assert pipeline.get_list_adapters() == {}


def test_a_family_without_lora_support_is_refused(loras):
    from jointdiff.models.lora import load_loras

    family = SimpleNamespace(name="fake", pipeline=SimpleNamespace())
    with pytest.raises(ConfigError) as error:
        load_loras(family, [loras["first"].spec(1.0)])
    assert_one_line(error, "'fake'", "no LoRA support")


def test_a_lora_of_another_shape_says_so_in_words(loras, recwarn):
    """A LoRA made for another model (here: a cross-attention width of 48, the tiny UNet's is
    32) is named with the layer and both shapes, not torch's raw state-dict message, and the
    library's warnings about the failed load are not passed on."""
    from jointdiff.models.loading import load_model

    path = loras["other_shape"].path
    with pytest.raises(ConfigError) as error:
        load_model("tiny", device="cpu", dtype="float32", loras=[{"path": path}])
    message = str(error.value)
    assert re.search(r"do not fit StableDiffusionPipeline \(layer '[\w.]+attn2.to_k[\w.]*' is torch.Size\(\[4, 48\]\) "
                     r"in the LoRA, torch.Size\(\[4, 32\]\) in the model\)", message), message
    assert "another model family or size" in message and "Error(s)" not in message and "\n" not in message
    assert not [w for w in recwarn if "lora" in str(w.message).lower()]

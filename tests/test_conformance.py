"""The conformance checks of :mod:`jointdiff.testing`: every built-in plugin passes them, on
a UNet family (``tiny``, SD) and a transformer family (``tiny-flux``, FLUX.1); every built-in
model family passes the model-layer checks; and each check fails on a plugin or family that
breaks the property it checks."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import pytest
import torch
from PIL import Image

from jointdiff.core.conditioner import Conditioner, Prompt
from jointdiff.core.family import LatentFormat
from jointdiff.core.registry import get_registry
from jointdiff.core.synchronizer import Synchronizer
from jointdiff.models.families.flux import Flux
from jointdiff.models.families.sd import StableDiffusion
from jointdiff.testing import (
    ConditionerConformance,
    FamilyConformance,
    GeometryConformance,
    SynchronizerConformance,
    check_conditioner,
    check_family,
    check_geometry,
    check_geometry_batching,
    check_geometry_coverage,
    check_geometry_decode,
    check_geometry_insert_is_linear,
    check_geometry_round_trip,
    check_geometry_shapes,
    check_plugin_class,
    check_synchronizer_deterministic,
    check_synchronizer_noop,
    example_geometry,
    example_options,
    make_context,
    tiny_model,
    zero_strength_options,
)
from jointdiff.testing.geometry import check_geometry_origins, check_geometry_pixel_scale
from jointdiff_plugins.none import NoSynchronizer
from jointdiff_plugins.text import TextConditioner
from jointdiff_plugins.tiles import GridGeometry, StripGeometry


def builtin_plugins():
    """Every class registered by jointdiff's own distribution, as pytest parameters."""
    infos = [info for info in get_registry().all() if info.distribution.split(" ")[0] == "jointdiff"]
    return [pytest.param(info, id=f"{info.kind}-{info.name}") for info in infos]


MODELS = ("tiny", "tiny-flux")
"""Every geometry, conditioner and synchronizer is checked on a UNet family (SD) and on a
transformer family (FLUX.1: 16 channels, 2×2 patches, distilled guidance)."""


CASE_MODELS = {("conditioner", "inpaint_model"): ("tiny-inpaint",), ("conditioner", "flux_control"): ("tiny-flux-control",)}
"""Plugins that need a particular kind of model: ``inpaint_model`` runs on an inpainting
checkpoint (the tiny SD inpainting pipeline, 9-channel UNet), ``flux_control`` on a
channel-concatenated control checkpoint (the tiny FLUX.1 Depth/Canny-dev pipeline)."""


def case_model(model: str | None):
    """The model a case runs on: a tiny model name, or one of the tiny special checkpoints."""
    if model == "tiny-inpaint":
        from jointdiff.models.families.sd import StableDiffusion
        from jointdiff.models.tiny import build_tiny_inpaint_pipeline

        return StableDiffusion(build_tiny_inpaint_pipeline(seed=0))
    if model == "tiny-flux-control":
        from jointdiff.models.families.flux import Flux, build_tiny_control_pipeline

        return Flux(build_tiny_control_pipeline(seed=0))
    return model


def flux_control_options(model: str, tmp_path) -> dict:
    """The ``flux_control`` conditioner of the checks: a control image of the example
    geometry's canvas size (FLUX.1's VAE factor, 8), saved as a PNG."""
    geometry = example_geometry()
    geometry.setup(tiny_model("tiny-flux").latent_format)
    _, height, width = geometry.canvas_shape_latent
    scale = geometry.latent_scale
    pixels = torch.rand(scale * height, scale * width, 3, generator=torch.Generator().manual_seed(7))
    path = tmp_path / "control.png"
    Image.fromarray((pixels * 255).round().to(torch.uint8).numpy()).save(path)
    return {"image": str(path)}


def conformance_cases():
    """``(plugin, model)`` pairs: plugins on every model of :data:`MODELS` (or of
    :data:`CASE_MODELS`); a model family on its own (first) tiny model."""
    cases = []
    for param in builtin_plugins():
        info = param.values[0]
        for model in [None] if info.kind == "family" else CASE_MODELS.get((info.kind, info.name), MODELS):
            suffix = f"-{model}" if model else ""
            cases.append(pytest.param(info, model, id=f"{info.kind}-{info.name}{suffix}"))
    return cases


def controlnet_options(model: str, tmp_path) -> dict:
    """The ``controlnet`` conditioner of the checks: the family's random tiny ControlNet and
    a condition image of the example geometry's canvas size, saved as a PNG (a path, so
    the options survive the JSON round trip; a tensor image would not)."""
    geometry = example_geometry()
    geometry.setup(tiny_model(model).latent_format)
    sheets, height, width = geometry.canvas_shape_latent
    scale = geometry.latent_scale
    pixels = torch.rand(scale * height, scale * width, 3, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "condition.png"
    Image.fromarray((pixels * 255).round().to(torch.uint8).numpy()).save(path)
    return {"model": "tiny", "image": str(path)}


TEST_OPTIONS = {("conditioner", "controlnet"): controlnet_options, ("conditioner", "flux_control"): flux_control_options}
"""Options, built here, for built-in plugins whose example_options() would need a model."""


def geometry_latent(model: str) -> LatentFormat:
    """The latent format geometries are checked with: the model's (channels, patch, VAE
    factor), with the 64-cell native window the example options are sized for (FLUX's 128
    would make the default window larger than some example canvases)."""
    return dataclasses.replace(tiny_model(model).latent_format, native_window=64)


@pytest.mark.parametrize(("info", "model"), conformance_cases())
def test_every_builtin_plugin_conforms(info, model, tmp_path):
    # Geometries build from their defaults; conditioners and synchronizers may load weights,
    # so only their example_options() (or TEST_OPTIONS) are trusted to run offline.
    make_options = TEST_OPTIONS.get((info.kind, info.name))
    if make_options is not None:
        options = make_options(model, tmp_path)
    else:
        options = example_options(info.cls, guess=info.kind in ("geometry", "family"))
    assert options is not None, f"{info.kind} {info.name!r} has no example_options() classmethod"  # none skipped
    check_plugin_class(info.kind, info.cls, options, geometry_latent(model) if info.kind == "geometry" else case_model(model))


def builtin_tiny_model_variants():
    """Every built-in tiny model but each family's first (checked above as the family plugin):
    schnell (no guidance), LCM (distilled), refiner, SD 3.5, FLUX.2 klein, ..."""
    names = []
    for param in builtin_plugins():
        info = param.values[0]
        if info.kind == "family":
            names += list(info.cls.tiny_models)[1:]
    return names


@pytest.mark.parametrize("name", builtin_tiny_model_variants())
def test_every_builtin_tiny_model_variant_passes_the_family_checks(name):
    from jointdiff.models.loading import load_model

    check_family(load_model(name, device="cpu", dtype="float32"))


def test_the_core_builtins_are_all_checked():
    checked = {(p.values[0].kind, p.values[0].name) for p in builtin_plugins()}
    assert {("geometry", "strip"), ("geometry", "grid"), ("conditioner", "text"), ("synchronizer", "none")} <= checked
    families = {("family", name) for name in ("sd", "sdxl", "sd3", "flux", "flux2", "qwenimage")}
    assert {("conditioner", "controlnet")} | families <= checked
    assert {type(tiny_model(m)).flow_matching for m in MODELS} == {False, True}  # a UNet and a transformer
    for kind, name in checked:
        cls = get_registry().get(kind, name)
        if cls in (StripGeometry, GridGeometry, TextConditioner, NoSynchronizer):
            assert example_options(cls) is not None
    assert zero_strength_options(NoSynchronizer) == {}


@pytest.mark.parametrize(
    "options",
    [
        {"length_px": 1000, "direction": "vertical", "wrap": True, "stride_latent": 24, "window_latent": 32},
        {"length_px": 1024, "wrap": True, "stride_latent": 40},
        {"length_px": 512},  # a single window
    ],
    ids=["vertical-wrap", "horizontal-wrap-uneven", "one-window"],
)
@pytest.mark.filterwarnings("ignore:wrapped")  # a wrapped strip may announce a smaller stride
def test_strip_variants_conform(options):
    check_geometry(StripGeometry(**options))


def test_grid_with_an_uneven_stride_conforms():
    check_geometry(GridGeometry(height_px=704, width_px=840, window_latent=32, stride_latent=20))


# ----------------------------------------------------------------------------- the mixins on built-ins


class TestStripMixin(GeometryConformance):
    def make_geometry(self):
        return StripGeometry(length_px=768, window_latent=32, stride_latent=16, direction="vertical")


# --8<-- [start:mixins]
class TestTextMixin(ConditionerConformance):
    def make_conditioner(self):
        return TextConditioner(prompt="a photo of a lake", guidance_scale=5.0)


class TestNoneMixin(SynchronizerConformance):
    def make_synchronizer(self):
        return NoSynchronizer()

    def make_zero_strength_synchronizer(self):
        return NoSynchronizer()
# --8<-- [end:mixins]


class TestTextMixinOnFlux(TestTextMixin):
    def make_pipeline(self):
        return tiny_model("tiny-flux")


class TestFluxFamilyMixin(FamilyConformance):
    def make_model(self):
        return tiny_model("tiny-flux")


# ----------------------------------------------------------------------------- broken geometries


class Broken(StripGeometry):
    """A small horizontal strip (64 × 128 latent cells, three windows) to break on purpose."""

    name = "broken"

    def __init__(self, **options):
        super().__init__(length_px=1024, stride_latent=32, **options)
        self.setup(8)


class Gap(Broken):
    def setup(self, latent_scale):
        super().setup(latent_scale)
        self.origins = self.origins[:-1]  # the last 32 columns are in no window


class Overwrites(Broken):
    def insert(self, target, values, window_ids):
        for b, window_id in enumerate(window_ids):
            top, left = self.origins[window_id]
            target[0, :, top : top + 64, left : left + 64] = values[b]


class SortsBatch(Broken):
    def extract(self, canvas, window_ids):
        return super().extract(canvas, sorted(window_ids))


class ShiftedInsert(Broken):
    def extract(self, canvas, window_ids):
        return super().extract(torch.roll(canvas, 1, dims=-1), window_ids)


class NegativeWeights(Broken):
    def window_weights(self, window_ids, device="cpu"):
        return -super().window_weights(window_ids, device)


class MisalignedDecode(Broken):
    def decode(self, canvas, decode):
        return super().decode(torch.roll(canvas, 1, dims=-1), decode)


class WrongDtype(Broken):
    def extract(self, canvas, window_ids):
        return super().extract(canvas, window_ids).float()


class ShiftedOrigins(Broken):
    def window_origins_latent(self):
        return super().window_origins_latent() + torch.tensor([0, 1])


class LatentOnlyCrops(Broken):
    """Takes every window at latent resolution, whatever the canvas's resolution (a geometry
    that ignores the k× contract ControlNet conditions and region masks rely on)."""

    def extract(self, canvas, window_ids):
        if canvas.shape[-1] == self._size[1]:
            return super().extract(canvas, window_ids)
        k = canvas.shape[-1] // self._size[1]
        (h, w), out = self._window, []
        for window_id in window_ids:
            top, left = self.origins[window_id]
            crop = canvas[0, :, top : top + k * h, left : left + k * w]  # origins not scaled by k
            out.append(crop)
        return torch.stack(out)


@pytest.mark.parametrize(
    ("geometry", "check", "message"),
    [
        (LatentOnlyCrops, check_geometry_pixel_scale, "windows extracted at 8x, average-pooled"),
        (Gap, check_geometry_coverage, "2048 canvas cells get no window weight, e.g. sheet 0, row 0, column 96"),
        (Overwrites, check_geometry_insert_is_linear, "it must add, not overwrite"),
        (SortsBatch, check_geometry_batching, "extract of a batch vs. one window at a time"),
        (ShiftedInsert, check_geometry_round_trip, "round trip with unit weights"),
        (NegativeWeights, check_geometry_shapes, "finite and non-negative"),
        (MisalignedDecode, check_geometry_decode, "decode\\(canvas\\) vs. decoding each sheet"),
        (WrongDtype, check_geometry_shapes, "torch.float64"),
        (ShiftedOrigins, check_geometry_origins, "window 0 is not the canvas crop at its origin \\(0, 1\\)"),
    ],
)
def test_geometry_checks_catch_the_defect_they_check(geometry, check, message):
    check(Broken())  # the unbroken base passes
    with pytest.raises(AssertionError, match=message):
        check(geometry())


# ----------------------------------------------------------------------------- broken conditioners


class Fixed(Conditioner):
    """A conditioner with a prompt of two entries and, optionally, extra UNet arguments."""

    name = "fixed"

    def setup(self, context):
        d = context.pipeline.unet.config.cross_attention_dim
        embeds = torch.randn(2, 77, d, generator=torch.Generator().manual_seed(0))
        self._prompt = Prompt(embeds, torch.zeros_like(embeds), 7.5, window_prompt=self.window_prompt)

    def window_prompt(self, window_id: int) -> int:
        return window_id % 2

    def prompt(self):
        return self._prompt

    def model_kwargs(self, model_input, timestep, embeds, window_ids: Sequence[int], context):
        scale = model_input.mean(dim=(1, 2, 3))  # one value per model input row: correct
        return {"cross_attention_kwargs": None, "timestep_cond": None} | self.extra(scale, window_ids)

    def extra(self, scale, window_ids):
        return {}


class OutOfRangePrompt(Fixed):
    def window_prompt(self, window_id):
        return 2


class PerWindowOnly(Fixed):
    def extra(self, scale, window_ids):
        return {"added": {"rows": torch.ones(len(window_ids), 3)}}  # forgets the guidance rows


class BatchDependent(Fixed):
    def extra(self, scale, window_ids):
        return {"added": {"rows": torch.full((len(scale), 3), float(len(window_ids)))}}


def test_conditioner_with_per_window_prompts_passes():
    check_conditioner(Fixed(), make_context())


@pytest.mark.parametrize(
    ("conditioner", "message"),
    [
        (OutOfRangePrompt, r"prompt indices for windows \[2\] must be 1 ints in \[0, 2\)"),
        (PerWindowOnly, r"model_kwargs\['added'\]\['rows'\] has shape \(1, 3\); expected 2 rows"),
        (BatchDependent, "of window 1 in a batch of 2"),
    ],
)
def test_conditioner_checks_catch_the_defect_they_check(conditioner, message):
    with pytest.raises(AssertionError, match=message):
        check_conditioner(conditioner(), make_context())


# ----------------------------------------------------------------------------- broken synchronizers


class Noisy(Synchronizer):
    name = "noisy"

    def update(self, latents, batch, state):
        return latents + 0.01 * torch.randn_like(latents)  # global RNG: not reproducible


class AlwaysOn(Synchronizer):
    name = "always-on"

    def update(self, latents, batch, state):
        return latents + 0.01


class TouchesCanvas(Synchronizer):
    name = "touches-canvas"

    def begin_step(self, state):
        state.canvas.mul_(1.0001)


def test_synchronizer_checks_catch_the_defect_they_check():
    check_synchronizer_deterministic(AlwaysOn)  # deterministic, even if not a no-op
    with pytest.raises(AssertionError, match="of two identical runs"):
        check_synchronizer_deterministic(Noisy)
    with pytest.raises(AssertionError, match="zero-strength synchronizer output 0 vs. its input"):
        check_synchronizer_noop(AlwaysOn)
    with pytest.raises(AssertionError, match="modified the canvas in place"):
        check_synchronizer_noop(TouchesCanvas)


# ----------------------------------------------------------------------------- broken model families


class MixesRows(StableDiffusion):
    def forward(self, latents, timestep, embeds, **kwargs):
        output = super().forward(latents, timestep, embeds, **kwargs)
        return output + 0.1 * output.mean(0, keepdim=True)  # e.g. a batch norm over windows


class FirstScaleOnly(Flux):
    def forward(self, latents, timestep, embeds, *, guidance_scale=None, **kwargs):
        scale = guidance_scale[:1].expand(len(latents))  # row 0's guidance for every window
        return super().forward(latents, timestep, embeds, guidance_scale=scale, **kwargs)


class FirstOffsetOnly(Flux):
    def forward(self, latents, timestep, embeds, *, offsets=None, **kwargs):
        offsets = offsets[:1].expand(len(latents), 2) if offsets is not None else None
        return super().forward(latents, timestep, embeds, offsets=offsets, **kwargs)


class WrongInverse(StableDiffusion):
    def output_from_x0(self, latents, x0, timestep, scheduler):
        return -super().output_from_x0(latents, x0, timestep, scheduler)


class StartsClean(StableDiffusion):
    def add_noise(self, x0, noise, timestep, scheduler):
        return x0 + 0.1 * noise


class ForgetsShift(Flux):
    def from_vae_latents(self, latents):
        return latents * self.pipeline.vae.config.scaling_factor


class OneRow(StableDiffusion):
    def encode_prompts(self, prompts, negative_prompts=None):
        embeds, negative = super().encode_prompts(prompts[:1], negative_prompts and negative_prompts[:1])
        return embeds, negative


class NoNegatives(StableDiffusion):
    def encode_prompts(self, prompts, negative_prompts=None):
        return super().encode_prompts(prompts)[0], None


class HalfDecode(StableDiffusion):
    def decode(self, latents):
        return torch.nn.functional.avg_pool2d(super().decode(latents), 2)


class Unaccepting(StableDiffusion):
    pipeline_classes = ("FluxPipeline",)


class OddNative(Flux):
    latent = LatentFormat(channels=16, scale_factor=8, patch=2, native_window=127)


@pytest.mark.parametrize(
    ("family", "model", "message"),
    [
        (MixesRows, "tiny", "forward is not batch-invariant: row 0 of a batch of 2 vs. that window alone"),
        (FirstScaleOnly, "tiny-flux", "forward is not batch-invariant: row 1 of a batch of 2"),
        (FirstOffsetOnly, "tiny-flux", "forward with offsets is not batch-invariant: row 1"),
        (WrongInverse, "tiny", r"output_from_x0\(predicted_x0\(output\)\) vs. output at timestep 501"),
        (StartsClean, "tiny", "must be mostly noise at the initial noise level 1: got 1·x0 \\+ 0.1·noise"),
        (ForgetsShift, "tiny-flux", r"from_vae_latents\(to_vae_latents\(x\)\) vs. x: differs"),
        (OneRow, "tiny", r"encode_prompts of 2 prompt\(s\) must have 2 row\(s\)"),
        (NoNegatives, "tiny", "with negative prompts returned no negative embeddings"),
        (HalfDecode, "tiny", r"decode of \(2, 4, 8, 8\) has shape \(2, 3, 32, 32\), expected \(2, 3, 64, 64\)"),
        (Unaccepting, "tiny", "accepts\\(\\) refuses its own pipeline, a StableDiffusionPipeline"),
        (OddNative, "tiny-flux", "native_window 127 is not a whole number of 2-cell patches"),
    ],
)
def test_family_checks_catch_the_defect_they_check(family, model, message):
    pipeline = tiny_model(model).pipeline
    check_family(family.__base__(pipeline))  # the unbroken base passes
    with pytest.raises(AssertionError, match=message):
        check_family(family(pipeline))

"""The ``flux_control`` conditioner and FLUX.1 Depth/Canny-dev's channel-concatenated control,
against diffusers' stock ``FluxControlPipeline`` on a tiny control model built in code
(random weights, fixed seeds, CPU, float32); geometry maps (``image = "depth"``) per window.
"""

from __future__ import annotations

from typing import Sequence

import pytest
import torch
from PIL import Image

from jointdiff import JointDiffusion, create
from jointdiff.jobs.spec import Job
from jointdiff.models.families.flow import pack_patches, unpack_patches
from jointdiff.models.families.flux import Flux, build_tiny_control_pipeline, build_tiny_pipeline
from jointdiff.testing import check_conditioner, make_context
from jointdiff.utils.errors import ConfigError
from jointdiff_plugins.tiles import StripGeometry

PROMPT = "a carved wooden owl"
WINDOW = 16  # latent cells: 128 px, 64 tokens


@pytest.fixture(scope="module")
def control():
    return Flux(build_tiny_control_pipeline(seed=0))


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers samples the VAE posterior with its generator; the family conditions on its
    mean. Make the stock pipeline take the mean too."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def engine(family, geometry, conditioners, latents, guidance=10.0, view_batch_size=4):
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=guidance)
    job = JointDiffusion(family, geometry, [text, *conditioners], view_batch_size=view_batch_size)
    return job(2, latents=latents.clone(), output_type="latent", progress=False).latents


def one_window():
    return create("geometry", "strip", length_px=128, window_latent=WINDOW, stride_latent=WINDOW)


def noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("guidance", [10.0, 3.5])
def test_one_window_equals_stock_flux_control_pipeline(control, posterior_mean, guidance):
    """One 16-cell window, 2 steps: the engine with ``flux_control`` equals FluxControlPipeline
    from the same latents and control image (the control latents join the latents along
    channels, packed to 64 + 64 features per token)."""
    pixels = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    latents = noise((1, 16, WINDOW, WINDOW), 1)
    ours = engine(control, one_window(), [create("conditioner", "flux_control", image=pixels)], latents, guidance)
    expected = control.pipeline(
        PROMPT, control_image=pixels * 2 - 1, height=128, width=128, num_inference_steps=2, guidance_scale=guidance,
        latents=pack_patches(latents), output_type="latent", max_sequence_length=control.max_sequence_length,
    ).images
    assert control.takes_control_image and control.latent_format.channels == 16 and not control.is_inpainting
    assert relative_error(ours, unpack_patches(expected, (WINDOW, WINDOW))) < 1e-4
    other = engine(control, one_window(), [create("conditioner", "flux_control", image=1 - pixels)], latents, guidance)
    assert relative_error(ours, other) > 1e-3  # the control image did something


def test_a_canvas_image_is_cut_per_window_and_batching_does_not_matter(control, tmp_path):
    """On a strip of three overlapping windows each window's rows are the canvas condition
    under it (the conformance kit: every batch size and guidance branch, options round trip
    with a file), and the job gives the same latents one window per batch and three per batch."""
    geometry = create("geometry", "strip", length_px=256, window_latent=WINDOW, stride_latent=8)
    values = torch.randint(0, 256, (128, 256, 3), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    Image.fromarray(values.numpy()).save(tmp_path / "depth.png")
    pixels = values.permute(2, 0, 1).float() / 255
    conditioner = create("conditioner", "flux_control", image=str(tmp_path / "depth.png"))
    context = make_context(control, geometry)
    check_conditioner(conditioner, context)
    canvas = control.control_image_condition(pixels[None] * 2 - 1)
    model_input = noise((3, 16, WINDOW, WINDOW), 5)
    rows = conditioner.model_kwargs(model_input, torch.tensor(500.0), None, [0, 1, 2], context)["concat_condition"]
    for window, left in enumerate((0, 8, 16)):
        torch.testing.assert_close(rows[window], canvas[0, :, :, left : left + WINDOW].to(rows))
    latents = noise((1, 16, WINDOW, 32), 6)
    one = engine(control, geometry, [create("conditioner", "flux_control", image=pixels)], latents, view_batch_size=1)
    three = engine(control, geometry, [create("conditioner", "flux_control", image=pixels)], latents, view_batch_size=3)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-5)


class MappedStrip(StripGeometry):
    """A strip whose windows render a ``depth`` map that differs per window (a ramp plus the
    window's index), at the asked pixel scale."""

    name = "mapped_strip"
    window_maps = ("depth",)

    def window_map(self, name: str, window_ids: Sequence[int], scale: int = 1) -> torch.Tensor:
        if name not in self.window_maps:
            return super().window_map(name, window_ids, scale)
        h, w = (scale * size for size in self.window_size_latent)
        ramp = torch.linspace(0, 1, w).expand(h, w)
        return torch.stack([(ramp * (i + 1) / (self.num_windows + 1))[None] for i in window_ids])


def test_a_geometry_map_conditions_every_window_on_its_own_map(control):
    """``image = "depth"``: window k's control latents are the VAE latents of the geometry's
    depth map of window k (repeated to RGB, mapped to [-1, 1]), in every batch layout."""
    geometry = MappedStrip(length_px=256, window_latent=WINDOW, stride_latent=8)
    conditioner = create("conditioner", "flux_control", image="depth")
    context = make_context(control, geometry)
    check_conditioner(conditioner, context)
    maps = geometry.window_map("depth", [0, 1, 2], scale=8)
    expected = control.control_image_condition(maps.expand(-1, 3, -1, -1) * 2 - 1)
    rows = conditioner.model_kwargs(noise((6, 16, WINDOW, WINDOW), 7), torch.tensor(500.0), None, [2, 0, 1], context)
    torch.testing.assert_close(rows["concat_condition"], expected[[2, 0, 1, 2, 0, 1]].to(rows["concat_condition"]))
    assert not torch.equal(expected[0], expected[1])


def test_errors_name_the_model_and_the_conditioner(control):
    """A model that takes no control image, a control model without one, a geometry that
    renders no depth: one line each, the last before any model loads."""
    plain = Flux(build_tiny_pipeline(seed=0))
    pixels = torch.rand(3, 128, 128)
    with pytest.raises(ConfigError, match="flux_control: the job's model .* takes no control image"):
        engine(plain, one_window(), [create("conditioner", "flux_control", image=pixels)], noise((1, 16, 16, 16), 1))
    with pytest.raises(ConfigError, match="add the 'flux_control' conditioner"):
        engine(control, one_window(), [], noise((1, 16, 16, 16), 1))
    with pytest.raises(ConfigError, match="renders no per-window maps$"):
        Job.from_dict({
            "model": {"id": "tiny-flux"},
            "geometry": {"name": "strip", "length_px": 256},
            "conditioners": [{"name": "text", "prompt": PROMPT}, {"name": "flux_control", "image": "depth"}],
        })
    with pytest.raises(ConfigError, match="no such image file 'missing.png'"):
        create("conditioner", "flux_control", image="missing.png")
    with pytest.raises(ConfigError, match="image is 64×128 px .* canvas is 128×128 px"):
        narrow = create("conditioner", "flux_control", image=pixels[:, :, :64])
        engine(control, one_window(), [narrow], noise((1, 16, 16, 16), 1))

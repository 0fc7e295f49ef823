"""Conditions from the geometry: ``controlnet`` with ``image = "depth"`` / ``"normal"`` /
``"mask"`` takes each window's map from the geometry (``Geometry.window_map``).

The test geometry is a crop geometry (``strip``) that renders known maps: the crops of
canvas-sized maps. So a job whose ControlNet reads the geometry's map must equal the job that
reads the same canvas-sized map as an image, and the ControlNet must receive exactly each
window's map (tiny SD model, tiny random ControlNet, CPU).
"""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

from jointdiff import JointDiffusion
from jointdiff.core.registry import create
from jointdiff.jobs.spec import Job
from jointdiff.models.families.flow import pack_patches
from jointdiff.models.tiny import tiny_controlnet
from jointdiff.utils.errors import ConfigError
from jointdiff_plugins.tiles import StripGeometry

PROMPT = "a stone tower"
LENGTH_PX, WINDOW, STRIDE = 192, 16, 8  # two 128 px windows overlapping by half


def canvas_maps() -> dict[str, torch.Tensor]:
    """Canvas-sized maps ``(1, C, H_px, W_px)`` in [0, 1], distinct per pixel."""
    generator = torch.Generator().manual_seed(11)
    size = (128, LENGTH_PX)
    return {
        "depth": torch.rand(1, 1, *size, generator=generator),
        "normal": torch.rand(1, 3, *size, generator=generator),
        "mask": (torch.rand(1, 1, *size, generator=generator) > 0.5).float(),
    }


class MappedStrip(StripGeometry):
    """A strip whose windows render ``maps`` (or the names in ``renders`` of them): each
    window's crop of a canvas-sized map, at the asked pixel scale."""

    name = "mapped_strip"
    window_maps = ("depth", "normal", "mask")

    def __init__(self, maps: dict[str, torch.Tensor], renders: Sequence[str] | None = None, **options) -> None:
        super().__init__(**options)
        self.maps = maps
        if renders is not None:
            self.window_maps = tuple(renders)

    def window_map(self, name: str, window_ids: Sequence[int], scale: int = 1) -> torch.Tensor:
        if name not in self.window_maps:
            return super().window_map(name, window_ids, scale)
        canvas = self.maps[name]
        if scale != self.latent_scale:  # the maps are held at pixel scale
            canvas = torch.nn.functional.interpolate(canvas, scale_factor=scale / self.latent_scale, mode="area")
        return self.extract(canvas, window_ids)


def geometry(maps=None, renders=None):
    return MappedStrip(maps or canvas_maps(), renders, length_px=LENGTH_PX, window_latent=WINDOW, stride_latent=STRIDE)


def run(pipeline, geometry, control, view_batch_size=2):
    text = create("conditioner", "text", prompt=PROMPT, negative_prompt="blurry", guidance_scale=7.5)
    job = JointDiffusion(pipeline, geometry, [text, control], view_batch_size=view_batch_size)
    latents = torch.randn(1, 4, WINDOW, LENGTH_PX // 8, generator=torch.Generator().manual_seed(3))
    return job(2, latents=latents, progress=False, output_type="latent").latents


@pytest.fixture(scope="module")
def controlnet(tiny_pipeline):
    return tiny_controlnet(tiny_pipeline.unet, seed=0)


@pytest.mark.parametrize("name", ["depth", "normal", "mask"])
def test_a_geometry_map_equals_the_same_map_given_as_an_image(tiny_pipeline, controlnet, name):
    """``image = name`` on the geometry that renders the crops of a canvas map gives the same
    latents as ``image = <that canvas map>`` (the file-based path: the geometry crops it)."""
    maps = canvas_maps()

    def job(image):
        return run(tiny_pipeline, geometry(maps), create("conditioner", "controlnet", model=controlnet, image=image))

    from_geometry, from_image, without = job(name), job(maps[name][0]), job(maps[name][0] * 0)
    torch.testing.assert_close(from_geometry, from_image, rtol=0, atol=1e-6)
    assert (from_geometry - without).abs().max() > 1e-4  # the map did something


@pytest.mark.parametrize("view_batch_size", [1, 2])
def test_the_controlnet_receives_each_windows_map(tiny_pipeline, controlnet, view_batch_size):
    """The ControlNet's ``controlnet_cond`` rows are the geometry's depth map of the rows'
    windows at the VAE factor, repeated to RGB, on both guidance branches, in any batching."""
    shapes = geometry()
    received = []
    hook = controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(kwargs["controlnet_cond"].clone()), with_kwargs=True
    )
    try:
        control = create("conditioner", "controlnet", model=controlnet, image="depth")
        run(tiny_pipeline, shapes, control, view_batch_size)
    finally:
        hook.remove()
    maps = shapes.window_map("depth", list(range(shapes.num_windows)), scale=8).expand(-1, 3, -1, -1)
    assert maps.shape == (2, 3, 128, 128) and not torch.equal(maps[0], maps[1])
    per_step = [maps[list(ids)].repeat(2, 1, 1, 1) for ids in ([0, 1],)] if view_batch_size == 2 else [
        maps[[i]].repeat(2, 1, 1, 1) for i in (0, 1)
    ]
    assert len(received) == 2 * len(per_step)  # 2 steps
    for got, expected in zip(received, per_step * 2):
        assert torch.equal(got, expected)


def test_a_geometry_without_the_map_is_refused_before_any_model_loads(tiny_pipeline):
    """One line naming what the geometry renders; the ControlNet (an id that cannot load)
    is never loaded."""
    control = create("conditioner", "controlnet", model="nobody/no-such-controlnet", image="normal")
    text = create("conditioner", "text", prompt=PROMPT)
    job = JointDiffusion(tiny_pipeline, geometry(renders=["depth"]), [text, control])
    with pytest.raises(ConfigError, match=r"^controlnet: image = 'normal' is a map .* renders 'depth'$"):
        job(1, progress=False, output_type="latent")


def test_a_job_on_a_geometry_without_maps_fails_at_validation():
    """A TOML job (``Job.from_dict``) with ``image = "depth"`` on a ``strip`` fails while the
    job is validated, with no model and no file involved."""
    data = {
        "model": {"id": "tiny"},
        "geometry": {"name": "strip", "length_px": 512},
        "conditioners": [
            {"name": "text", "prompt": PROMPT},
            {"name": "controlnet", "model": "tiny", "image": "depth"},
        ],
    }
    with pytest.raises(ConfigError, match=r"geometry 'strip' renders no per-window maps$") as error:
        Job.from_dict(data)
    assert "\n" not in str(error.value)
    data["conditioners"][1]["image"] = "no_such_file.png"  # a file name is still a file
    with pytest.raises(ConfigError, match="no such image file"):
        Job.from_dict(data)


def test_canny_of_a_geometry_map_is_taken_per_window(tiny_pipeline, controlnet):
    """``preprocess = "canny"`` on a map: Canny edges of each window's own map."""
    from jointdiff_plugins.controlnet import canny

    shapes = geometry()
    control = create("conditioner", "controlnet", model=controlnet, image="normal", preprocess="canny")
    received = []
    hook = controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(kwargs["controlnet_cond"].clone()), with_kwargs=True
    )
    try:
        run(tiny_pipeline, shapes, control)
    finally:
        hook.remove()
    maps = shapes.window_map("normal", [0, 1], scale=8)
    edges = torch.stack([canny(window, 100, 200) for window in maps]).expand(-1, 3, -1, -1)
    assert edges.sum() > 0
    assert torch.equal(received[0], edges.repeat(2, 1, 1, 1))


def test_a_flux_controlnet_gets_the_latents_of_each_windows_map():
    """FLUX ControlNets take VAE latents: with ``image = "depth"`` window k's ControlNet
    condition is the family's latents of window k's own map (not a crop of canvas latents)."""
    from jointdiff.models.families.flux import Flux, build_tiny_controlnet, build_tiny_pipeline

    family, controlnet = Flux(build_tiny_pipeline(seed=0)), build_tiny_controlnet(seed=3)
    shapes = geometry()
    received = []
    hook = controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(kwargs["controlnet_cond"].clone()), with_kwargs=True
    )
    text = create("conditioner", "text", prompt=PROMPT)
    control = create("conditioner", "controlnet", model=controlnet, image="depth")
    latents = torch.randn(1, 16, WINDOW, LENGTH_PX // 8, generator=torch.Generator().manual_seed(3))
    try:
        job = JointDiffusion(family, shapes, [text, control], view_batch_size=2)
        job(1, latents=latents, progress=False, output_type="latent")
    finally:
        hook.remove()
    maps = shapes.window_map("depth", [0, 1], scale=8).expand(-1, 3, -1, -1)
    expected = torch.cat([family.control_condition(controlnet, window[None]) for window in maps])
    assert len(received) == 1 and received[0].shape == (2, 64, 64)  # packed: 8×8 tokens of 4·16 features
    torch.testing.assert_close(received[0], pack_patches(expected).to(received[0]), rtol=0, atol=1e-6)

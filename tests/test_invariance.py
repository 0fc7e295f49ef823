"""Invariance of results: batch size, batch order and resume (tiny models, tiny canvases).

A job's canvas must not depend on ``view_batch_size``, on the order window batches run in,
or on an interruption and resume (ranks: tests/test_distributed.py), for every built-in
geometry, conditioner and synchronizer and for deterministic and stochastic schedulers.
Checked with :mod:`jointdiff.testing.invariance`, the kit third-party plugins use. Windows
are 16 latent cells (128 px; 8 for the cubemap) and jobs 2–3 steps: cheap on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from jointdiff import JointDiffusion
from jointdiff.core.registry import create
from jointdiff.models.loading import as_model, load_model, make_scheduler
from jointdiff.testing.invariance import (
    check_batch_order_invariance,
    check_batch_size_invariance,
    check_resume_invariance,
)

GEOMETRIES = {
    "strip": ("strip", dict(length_px=256, window_latent=16, stride_latent=8)),
    "grid": ("grid", dict(height_px=192, width_px=192, window_latent=16, stride_latent=8)),
    "wrap": ("strip", dict(length_px=256, window_latent=16, stride_latent=8, wrap=True)),
    "equirect": ("equirect", dict(width_px=256, window_latent=16, rings=[(0.0, 4), (60.0, 2), (-60.0, 2)])),
    "cubemap": ("cubemap", dict(face_px=64, window_latent=8, edge_views=False, corner_views=False)),
    "torus": ("torus", dict(height_px=192, width_px=192, window_latent=16, stride_latent=8)),
    "atlas": ("atlas", dict(tiles=2, tile_height_px=192, tile_width_px=192, window_latent=16, stride_latent=8)),
    "cube_texture": ("cube_texture", dict(face_px=128, window_latent=16, stride_latent=8)),
}
BOOTSTRAP = dict(prompt="a lake", regions=[{"prompt": "a red boat", "rect": [40, 0, 200, 100]}], bootstrap_steps=2)
SYNC = dict(lpips_random_backbone=True, net="alex", w=20.0)


@pytest.fixture(scope="module")
def models(tiny_pipeline):
    """``models(scheduler)``: the tiny SD model with its own scheduler (components shared)."""
    cache = {}

    def model(scheduler: str = "ddim"):
        if scheduler not in cache:
            swapped = make_scheduler(scheduler, tiny_pipeline.scheduler.config)
            cache[scheduler] = as_model(type(tiny_pipeline)(**{**tiny_pipeline.components, "scheduler": swapped}))
        return cache[scheduler]

    return model


def text():
    return create("conditioner", "text", prompt="a photo of a city", guidance_scale=7.5)


def conditioners(name: str, geometry) -> list:
    """Fresh conditioners of the kind ``name`` for ``geometry`` (a 128×256 px strip but for
    ``tile_text``)."""
    if name == "text":
        return [text()]
    if name == "regions":
        return [create("conditioner", "regions", **BOOTSTRAP)]
    if name == "tile_text":
        return [create("conditioner", "tile_text", prompts=["red bricks"])]
    if name == "controlnet":
        pixels = torch.randint(0, 256, (128, 256, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        return [text(), create("conditioner", "controlnet", model="tiny", image=Image.fromarray(pixels.numpy()))]
    raise ValueError(name)


def factory(model, geometry: str = "strip", conditioner: str = "text", synchronizer: str | None = None, **engine):
    """A job factory ``(view_batch_size) -> JointDiffusion`` with fresh plugins every call."""
    name, options = GEOMETRIES[geometry]

    def job(view_batch_size: int) -> JointDiffusion:
        shape = create("geometry", name, **options)
        sync = create("synchronizer", "syncdiffusion", **SYNC) if synchronizer == "syncdiffusion" else None
        return JointDiffusion(model, shape, conditioners(conditioner, shape), sync, view_batch_size=view_batch_size, **engine)

    return job


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_batch_size_invariance_of_every_geometry(models, geometry):
    """Euler ancestral (noise every step) on every geometry, with its preferred fusion
    (resampled views of ``equirect``/``cubemap`` start from fresh noise of their own)."""
    check_batch_size_invariance(factory(models("euler_a"), geometry), sizes=(1, 64), steps=2)


@pytest.mark.parametrize("scheduler, eta", [("ddim", 1.0), ("euler_a", 0.0), ("ddpm", 0.0), ("dpm++", 0.0), ("unipc", 0.0)])
def test_batch_size_invariance_of_every_scheduler(models, scheduler, eta):
    check_batch_size_invariance(factory(models(scheduler), eta=eta), sizes=(1, 2, 64), steps=3)


@pytest.mark.parametrize("conditioner", ["text", "regions", "controlnet", "tile_text"])
def test_batch_size_and_order_invariance_of_every_conditioner(models, conditioner):
    geometry = "torus" if conditioner == "tile_text" else "strip"
    job = factory(models("ddpm"), geometry, conditioner)
    check_batch_size_invariance(job, sizes=(1, 64), steps=2)
    check_batch_order_invariance(job, orders=("reversed", "interleaved"), steps=2)


@pytest.mark.parametrize("fusion", ["latent", "x0"])
def test_batch_size_and_order_invariance_of_syncdiffusion(models, fusion):
    job = factory(models("euler_a"), synchronizer="syncdiffusion", fusion=fusion)
    check_batch_size_invariance(job, sizes=(1, 64), steps=2)
    check_batch_order_invariance(job, orders=("reversed",), steps=2)


RESUME_CASES = {
    "ddim": dict(scheduler="ddim"),
    "ddim_eta": dict(scheduler="ddim", eta=1.0),
    "euler_a": dict(scheduler="euler_a"),
    "ddpm": dict(scheduler="ddpm"),
    "dpm++": dict(scheduler="dpm++", stop_after=(0, 1)),  # a solver history of model outputs
    "unipc": dict(scheduler="unipc", stop_after=(0, 1)),
    "pndm": dict(scheduler="pndm", stop_after=(0, 5), steps=4),  # 4 PLMS steps: 13 model calls
    "regions": dict(scheduler="ddpm", conditioner="regions"),
    "syncdiffusion_x0": dict(scheduler="euler_a", synchronizer="syncdiffusion", fusion="x0"),
    "equirect": dict(scheduler="euler_a", geometry="equirect"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_invariance(models, case, tmp_path):
    """Stopped after a step and resumed by a fresh job with other batches (the checkpoint
    holds every window's state): the uninterrupted canvas, and no checkpoint left."""
    options = dict(RESUME_CASES[case])
    model = models(options.pop("scheduler"))
    stop_after, steps = options.pop("stop_after", (0,)), options.pop("steps", 3)
    job = factory(model, **options)
    check_resume_invariance(job, steps=steps, stop_after=stop_after, resume_view_batch_size=2, directory=tmp_path,
                            rtol=1e-4, atol=1e-4)


def test_tiny_flux_batch_size_and_resume_invariance(tmp_path):
    """A transformer family with a stochastic flow-matching Euler step."""
    model = load_model("tiny-flux", device="cpu", dtype="float32")
    pipeline = model.pipeline
    pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, stochastic_sampling=True)
    job = factory(model)
    expected = check_batch_size_invariance(job, sizes=(1, 64), steps=2)
    assert torch.isfinite(expected).all()
    check_resume_invariance(job, steps=3, resume_view_batch_size=3, directory=tmp_path, rtol=1e-4, atol=1e-4)


def test_the_checks_catch_noise_tied_to_batches(models):
    """A conditioner drawing from one stream in batch order fails the order and resume
    checks; one seeding its noise per batch fails the batch-size check; keyed noise passes."""
    from jointdiff.core.conditioner import Conditioner

    class Streamed(Conditioner):
        name = "streamed"

        def setup(self, context):
            self.generator = torch.Generator().manual_seed(0)

        def modify_latents(self, latents, batch, state):
            return latents + 0.1 * torch.randn(latents.shape, generator=self.generator)

    class PerBatch(Conditioner):
        name = "per-batch"

        def modify_latents(self, latents, batch, state):
            generator = state.generator_for("per-batch", state.step_index, batch.index)
            return latents + 0.1 * torch.randn(latents.shape, generator=generator)

    class Keyed(Conditioner):
        name = "keyed"

        def modify_latents(self, latents, batch, state):
            noise = [torch.randn(latents[:1].shape, generator=state.generator_for("keyed", state.step_index, w))
                     for w in batch.window_ids]
            return latents + 0.1 * torch.cat(noise)

    def factory_of(plugin):
        def job(view_batch_size):
            name, options = GEOMETRIES["strip"]
            return JointDiffusion(models("ddim"), create("geometry", name, **options), [text(), plugin()],
                                  view_batch_size=view_batch_size)
        return job

    with pytest.raises(AssertionError, match="batch-order invariance: reversed vs natural order"):
        check_batch_order_invariance(factory_of(Streamed), orders=("reversed",))
    with pytest.raises(AssertionError, match="resume invariance: stopped after step 0 and resumed"):
        check_resume_invariance(factory_of(Streamed), steps=3)
    with pytest.raises(AssertionError, match="batch-size invariance: view_batch_size=64 vs 1"):
        check_batch_size_invariance(factory_of(PerBatch), sizes=(1, 64))
    check_batch_size_invariance(factory_of(Keyed), sizes=(1, 64))
    check_batch_order_invariance(factory_of(Keyed), orders=("reversed",))

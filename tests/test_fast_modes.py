"""Fast modes: shifted non-overlapping windows (SpotDiffusion) and few-step x̂0 re-noising
(StreamMultiDiffusion), on tiny models with tiny canvases and 2–3 steps (docs/fast-modes.md).

Shifted windows must cover every canvas cell exactly once per step (checked on the fusion's
weights at every step of real jobs), move with a seeded shift, and give results independent
of ``view_batch_size`` and of a resume; few-step re-noising must run on FLUX.1 schnell, SD
with an LCM scheduler and the LCM-distilled SDXL, equal LCM's own sampler on one window, and
be deterministic and batch-invariant. Modes that cannot apply raise one-line ConfigErrors.
"""

from __future__ import annotations

import copy

import pytest
import torch

from jointdiff import JointDiffusion
from jointdiff.core.context import keyed_generator
from jointdiff.core.family import SD_LATENT
from jointdiff.core.registry import create
from jointdiff.core.tiling import shifted_segments
from jointdiff.engine.shifted import ShiftedFusion, ShiftedLayout, evaluation_counts
from jointdiff.jobs.spec import Job
from jointdiff.models.loading import as_model, load_model, make_scheduler
from jointdiff.testing.invariance import check_batch_size_invariance, check_resume_invariance, run_latents
from jointdiff.utils.errors import ConfigError

GEOMETRIES = {
    "strip": ("strip", dict(length_px=384, window_latent=16, stride_latent=8)),
    "wrap": ("strip", dict(length_px=320, window_latent=16, stride_latent=8, wrap=True)),
    "grid": ("grid", dict(height_px=200, width_px=264, window_latent=16, stride_latent=8)),
    "torus": ("torus", dict(height_px=192, width_px=256, window_latent=16, stride_latent=8)),
    "atlas": ("atlas", dict(tiles=2, tile_height_px=128, tile_width_px=192, window_latent=16, stride_latent=8)),
}


@pytest.fixture(scope="module")
def sd(tiny_pipeline):
    """``sd(scheduler)``: the tiny SD model with a scheduler by short name or class (shared components)."""
    cache = {}

    def model(scheduler: str = "ddim"):
        if scheduler not in cache:
            if scheduler == "lcm":
                from diffusers import LCMScheduler

                swapped = LCMScheduler.from_config(tiny_pipeline.scheduler.config)
            else:
                swapped = make_scheduler(scheduler, tiny_pipeline.scheduler.config)
            cache[scheduler] = as_model(type(tiny_pipeline)(**{**tiny_pipeline.components, "scheduler": swapped}))
        return cache[scheduler]

    return model


def text(**options):
    return create("conditioner", "text", prompt="a photo of a city", **options)


def factory(model, geometry="strip", conditioners=None, **engine):
    name, options = GEOMETRIES[geometry]

    def job(view_batch_size: int) -> JointDiffusion:
        made = conditioners() if conditioners is not None else [text(guidance_scale=7.5)]
        return JointDiffusion(model, create("geometry", name, **options), made, view_batch_size=view_batch_size, **engine)

    return job


# -- the layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("extent,window", [(48, 16), (50, 16), (16, 16), (40, 16)])
@pytest.mark.parametrize("wrap", [False, True])
def test_shifted_segments_cover_every_cell_once(extent, window, wrap):
    for shift in range(window):
        counts = torch.zeros(extent, dtype=torch.long)
        for origin, start, length in shifted_segments(extent, window, shift, wrap):
            assert length > 0 and 0 <= start and start + length <= window
            assert wrap or 0 <= origin <= extent - window  # clamped into a canvas that does not wrap
            cells = (torch.arange(origin + start, origin + start + length)) % extent
            counts[cells] += 1
        assert bool((counts == 1).all()), (extent, window, shift, wrap, counts)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_shifted_tiling_owns_every_cell_once_on_every_sheet(geometry):
    name, options = GEOMETRIES[geometry]
    shape = create("geometry", name, **options)
    shape.setup(SD_LATENT)
    overlap = list(shape.origins)
    ones = lambda batch: torch.ones(len(batch), 1, 16, 16)  # noqa: E731
    layout = ShiftedLayout(shape, [None], 3, ones, lambda *keys: keyed_generator(7, *keys))
    sheets, height, width = shape.canvas_shape_latent
    layouts = set()
    for step in range(6):
        batches = layout.batches(step, scheduler=None)
        layouts.add(tuple(shape.origins))
        total = torch.zeros(sheets, 1, height, width)
        for batch in batches:
            shape.insert(total, layout.weights_of(batch), batch.window_ids)
        assert bool((total == 1).all()), f"{geometry}, step {step}: cells owned {total.unique().tolist()} times"
    assert len(layouts) > 1, "the window grid must move between steps"
    layout.restore()
    assert shape.origins == overlap


# -- shifted windows in the engine -----------------------------------------------------------


def _record_weights(monkeypatch, kind=ShiftedFusion):
    """Record every step's fusion weight sum, window origins and evaluations."""
    seen = []
    original = kind.end_step

    def end_step(self, t, denoiser):
        seen.append((self.step_index, self.weight_sum.clone(), list(self.geometry.origins), len(self.batches_now)))
        return original(self, t, denoiser)

    monkeypatch.setattr(kind, "end_step", end_step)
    return seen


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_shifted_job_denoises_every_cell_once_per_step(sd, monkeypatch, geometry):
    seen = _record_weights(monkeypatch)
    tiles = lambda: [create("conditioner", "tile_text", prompts=["bricks", "moss"])]  # noqa: E731
    conditioners = tiles if geometry == "atlas" else None
    job = factory(sd(), geometry, conditioners, windows="shifted")(2)
    result = job(3, seed=3, progress=False, output_type="latent")
    assert [s[0] for s in seen] == [0, 1, 2]
    for step, weights, origins, _ in seen:
        assert bool((weights == 1).all()), f"{geometry} step {step}: a cell is weighted {weights.unique().tolist()}"
    assert len({tuple(map(tuple, s[2])) for s in seen}) > 1, "the windows must move between steps"
    assert job.geometry.num_windows == result.metadata["windows"]  # the geometry's own windows are back
    counts = evaluation_counts(job.geometry, 3, seed=3)
    assert [len(s[2]) for s in seen] == counts
    assert sum(counts) <= 3 * job.geometry.num_windows


def test_shifted_is_deterministic_and_batch_size_invariant(sd):
    job = factory(sd(), "grid", windows="shifted")
    first = check_batch_size_invariance(job, sizes=(1, 64), steps=2, seed=5)
    assert torch.equal(first, run_latents(job(1), 2, 5))
    assert not torch.allclose(first, run_latents(job(1), 2, 6))


@pytest.mark.parametrize("scheduler,fusion", [("dpm++", None), ("euler_a", None), ("lcm", "x0_renoise")])
def test_shifted_multistep_and_stochastic_resume(sd, scheduler, fusion):
    """One canvas scheduler: multistep history and step noise survive a resume with other
    batches (and the re-noising fusion keeps nothing but the canvas)."""
    check_resume_invariance(factory(sd(scheduler), "wrap", windows="shifted", fusion=fusion), steps=3,
                            stop_after=(1,), view_batch_size=1, resume_view_batch_size=4)


def test_shifted_with_regions_and_first_order_equivalence(sd):
    """Region branches fuse by mask on top of ownership; with one window per step and DDIM the
    shifted mode equals a plain one-window job (the canvas is the window)."""
    regions = lambda: [create("conditioner", "regions", prompt="a lake", guidance_scale=7.5,
                              regions=[{"prompt": "a boat", "rect": [0, 0, 128, 200]}])]
    canvas = run_latents(factory(sd(), "strip", regions, windows="shifted")(2), 2, 0)
    assert torch.isfinite(canvas).all()
    one = dict(length_px=128, window_latent=16)
    single = lambda windows: JointDiffusion(sd(), create("geometry", "strip", **one), [text(guidance_scale=7.5)],
                                           windows=windows)
    shifted, overlap = run_latents(single("shifted"), 2, 1), run_latents(single("overlap"), 2, 1)
    torch.testing.assert_close(shifted, overlap, rtol=1e-5, atol=1e-5)


def test_shifted_flux_canvas_positions_follow_the_windows(monkeypatch):
    """positions = "canvas": the offsets handed to the transformer are this step's windows."""
    model = load_model("tiny-flux", device="cpu", dtype="float32", options={"positions": "canvas"})
    calls = []
    forward = type(model).forward

    def spy(self, latents, timestep, embeds, *, offsets=None, **kwargs):
        calls.append(offsets.clone())
        return forward(self, latents, timestep, embeds, offsets=offsets, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    seen = _record_weights(monkeypatch)
    geometry = create("geometry", "strip", length_px=384, window_latent=16, wrap=True)
    job = JointDiffusion(model, geometry, [text()], windows="shifted", view_batch_size=8)
    job(2, seed=2, progress=False, output_type="latent")
    for (_, _, origins, _), offsets in zip(seen, calls):
        assert offsets.tolist() == [list(o) for o in origins]


# -- few-step re-noising -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-flux-schnell", "tiny-sdxl-lcm", "sd-lcm"])
def test_fewstep_runs_deterministic_and_batch_invariant(sd, name):
    model = sd("lcm") if name == "sd-lcm" else load_model(name, device="cpu", dtype="float32")
    guidance = {"guidance_scale": 7.5} if name == "sd-lcm" else {}
    job = factory(model, "strip", lambda: [text(**guidance)], fusion="x0_renoise")
    canvas = check_batch_size_invariance(job, sizes=(1, 64), steps=3, seed=4)
    assert torch.equal(canvas, run_latents(job(1), 3, 4))
    shifted = factory(model, "wrap", lambda: [text(**guidance)], fusion="x0_renoise", windows="shifted")
    check_batch_size_invariance(shifted, sizes=(1, 64), steps=2, seed=4)


def test_fewstep_one_window_equals_lcm_sampler(sd):
    """On one window, x̂0 re-noising is LCM's multistep sampler (LCMScheduler.step with the
    same keyed noise), up to its boundary-condition scalings."""
    model = sd("lcm")
    geometry = create("geometry", "strip", length_px=128, window_latent=16)
    job = JointDiffusion(model, geometry, [text(guidance_scale=1.0)], fusion="x0_renoise")
    ours = run_latents(job, 3, 9)
    scheduler = copy.deepcopy(model.scheduler)
    model.set_timesteps(scheduler, 3, (16, 16))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9)) * scheduler.init_noise_sigma
    embeds = job.conditioners[0].prompt().embeds
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            output = model.forward(scheduler.scale_model_input(latents, t), t, embeds)
        latents = scheduler.step(output, t, latents, generator=keyed_generator(9, "renoise", i), return_dict=False)[0]
    torch.testing.assert_close(ours, latents, rtol=1e-5, atol=1e-5)


def test_fewstep_resume(sd):
    check_resume_invariance(factory(sd("lcm"), "strip", fusion="x0_renoise"), steps=3, stop_after=(0,),
                            view_batch_size=1, resume_view_batch_size=3)


# -- where a mode cannot apply -------------------------------------------------------------


@pytest.mark.parametrize("name,options", [
    ("equirect", dict(width_px=256, window_latent=16)),
    ("cubemap", dict(face_px=64, window_latent=8)),
    ("cube_texture", dict(face_px=128, window_latent=16)),
])
def test_shifted_refuses_geometries_that_cannot_shift(sd, name, options):
    with pytest.raises(ConfigError, match=rf"windows = 'shifted'.*geometry '{name}' cannot shift"):
        JointDiffusion(sd(), create("geometry", name, **options), [text()], windows="shifted")


def test_clear_errors(sd):
    strip = lambda: create("geometry", "strip", length_px=256, window_latent=16)
    with pytest.raises(ConfigError, match="windows must be 'overlap'"):
        JointDiffusion(sd(), strip(), [text()], windows="spot")
    with pytest.raises(ConfigError, match="cannot use fusion = 'x0'"):
        JointDiffusion(sd(), strip(), [text()], windows="shifted", fusion="x0")
    with pytest.raises(ConfigError, match="x0_renoise.*resamples"):
        JointDiffusion(sd(), create("geometry", "equirect", width_px=256, window_latent=16), [text()], fusion="x0_renoise")
    with pytest.raises(ConfigError, match="eta = 0.5 has no effect"):
        JointDiffusion(sd(), strip(), [text()], fusion="x0_renoise", eta=0.5)
    sync = create("synchronizer", "syncdiffusion", lpips_random_backbone=True, net="alex")
    with pytest.raises(ConfigError, match="does not combine with synchronizer 'syncdiffusion'"):
        JointDiffusion(sd(), strip(), [text()], sync, windows="shifted")(2, progress=False, output_type="latent")
    job = {"geometry": {"name": "cubemap", "face_px": 64}, "conditioners": [{"name": "text", "prompt": "x"}],
           "windows": "shifted"}
    with pytest.raises(ConfigError, match="job: windows = 'shifted'"):
        Job.from_dict(job)


def test_job_records_the_modes(sd):
    job = factory(sd(), "strip", windows="shifted", fusion="x0_renoise")(4)
    result = job(2, seed=0, progress=False, output_type="latent")
    recorded = result.metadata["job"]
    assert recorded["windows"] == "shifted" and recorded["fusion"] == "x0_renoise"
    assert Job.from_dict({**recorded, "model": {"id": "tiny"}}).windows == "shifted"

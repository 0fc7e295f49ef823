"""The engine on several windows of a transformer family (the tiny FLUX.1-dev-like model,
random weights, CPU, float32): MultiDiffusion equals a reference written here from the stock
transformer and scheduler only; batching, checkpoints, SyncDiffusion, region and tile prompts.

Windows are 16 latent cells (128 px, 64 tokens); canvases 16 × 24 cells; 2–3 steps.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from jointdiff import JointDiffusion, create
from jointdiff.core.context import JobContext, StepState, WindowBatch
from jointdiff.engine.denoiser import Denoiser
from jointdiff.engine.distributed import Checkpoint
from jointdiff.models.loading import load_model

PROMPT = "a watercolor fox in the snow"
WINDOW, STRIDE = 16, 8  # latent cells
LENGTH = 24  # latent cells of the strip: 2 windows, or 3 with wrap (one straddles the seam)
GUIDANCE = 4.0  # not the family's default 3.5: the scale must reach the transformer


@pytest.fixture(scope="module")
def flux():
    return load_model("tiny-flux", device="cpu", dtype="float32")


def strip(wrap: bool = False, length: int = LENGTH):
    return create(
        "geometry", "strip", length_px=8 * length, window_latent=WINDOW, stride_latent=STRIDE, wrap=wrap
    )


def text(guidance: float = GUIDANCE):
    return create("conditioner", "text", prompt=PROMPT, guidance_scale=guidance)


def canvas_noise(length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 16, WINDOW, length, generator=torch.Generator().manual_seed(seed))


def run(flux, geometry, conditioners=None, synchronizer=None, steps=2, **call):
    job = JointDiffusion(flux, geometry, conditioners or [text()], synchronizer, **call.pop("engine", {}))
    return job(steps, progress=False, output_type="latent", **call).latents


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# -- MultiDiffusion against a reference from the stock transformer and scheduler -----------


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(1, C, h, w)`` → FLUX tokens ``(1, (h/2)(w/2), 4C)``: 2×2 patches, row-major."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, features = tokens.shape
    return tokens.view(b, h // 2, w // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


@torch.no_grad()
def multidiffusion_reference(pipe, noise, starts, wrap, steps, guidance):
    """MultiDiffusion (Bar-Tal et al. 2023, Eq. 5) along the width of ``noise`` ``(1, 16, h, W)``:
    each step every window ``[s, s + h)`` (columns modulo ``W`` with ``wrap``) is cut out,
    denoised by the stock transformer as FluxPipeline calls it for an image of the window's
    size, stepped by its own copy of the stock scheduler, and the stepped windows are averaged
    on the canvas with uniform weights."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    transformer, (_, _, h, width) = pipe.transformer, noise.shape
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, device="cpu", max_sequence_length=512)
    image_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, h // 2, "cpu", torch.float32)
    scheduler = copy.deepcopy(pipe.scheduler)
    config = scheduler.config
    mu = calculate_shift((h // 2) ** 2, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    scheduler.set_begin_index(0)
    schedulers = [copy.deepcopy(scheduler) for _ in starts]
    guidance = torch.full([1], guidance, dtype=torch.float32)
    x = noise.clone()
    for t in timesteps:
        total, count = torch.zeros_like(x), torch.zeros_like(x)
        for start, window_scheduler in zip(starts, schedulers):
            columns = [(start + j) % width if wrap else start + j for j in range(h)]
            crop = x[..., columns]
            tokens = transformer(
                hidden_states=pack(crop), timestep=t.expand(1) / 1000, guidance=guidance, pooled_projections=pooled,
                encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False,
            )[0]  # fmt: skip
            stepped = window_scheduler.step(unpack(tokens, h, h), t, crop, return_dict=False)[0]
            total[..., columns] += stepped
            count[..., columns] += 1
        x = total / count
    return x


@pytest.mark.parametrize("wrap", [False, True], ids=["open", "wrap"])
def test_strip_equals_multidiffusion_reference(flux, wrap):
    geometry = strip(wrap)
    noise = canvas_noise()
    ours = run(flux, geometry, latents=noise)
    starts = [left for _, left in geometry.origins]
    assert starts == ([0, 8, 16] if wrap else [0, 8])  # with wrap the last window straddles the seam
    expected = multidiffusion_reference(flux.pipeline, noise, starts, wrap, steps=2, guidance=GUIDANCE)
    assert ours.shape == noise.shape
    assert relative_error(ours, expected) < 1e-4


# -- batching and checkpoints --------------------------------------------------------------


def test_view_batch_size_does_not_change_the_result(flux):
    noise = canvas_noise()
    one = run(flux, strip(wrap=True), latents=noise, engine={"view_batch_size": 1})
    three = run(flux, strip(wrap=True), latents=noise, engine={"view_batch_size": 3})
    assert relative_error(three, one) < 1e-5


class Interrupted(Exception):
    pass


def test_interrupted_and_resumed_job_equals_the_uninterrupted_one(flux, tmp_path):
    noise = canvas_noise()
    path = tmp_path / "job.ckpt"
    uninterrupted = run(flux, strip(wrap=True), latents=noise, steps=3)

    def interrupt(step, timestep, canvas):
        if step == 1:
            raise Interrupted  # after the checkpoint of step 1 is written

    with pytest.raises(Interrupted):
        run(flux, strip(wrap=True), latents=noise, steps=3, callback=interrupt, checkpoint=Checkpoint(path, every=1))
    assert path.is_file()
    resumed_steps = []
    resumed = run(
        flux, strip(wrap=True), latents=noise, steps=3, checkpoint=Checkpoint(path, every=1, resume=True),
        callback=lambda step, timestep, canvas: resumed_steps.append(step),
    )  # fmt: skip
    assert resumed_steps == [2]
    torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=0)


# -- SyncDiffusion ---------------------------------------------------------------------------


def syncdiffusion(**options):
    return create("synchronizer", "syncdiffusion", lpips_random_backbone=True, net="alex", **options)


def test_syncdiffusion_runs_on_a_transformer_family(flux):
    noise = canvas_noise()
    synchronized = run(flux, strip(), synchronizer=syncdiffusion(w=20.0), latents=noise)
    plain = run(flux, strip(), latents=noise)
    assert torch.isfinite(synchronized).all()
    assert (synchronized - plain).abs().max() > 1e-3  # the synchronization did something


def test_one_syncdiffusion_step_lowers_lpips_to_the_anchor(flux):
    """As tests/test_syncdiffusion.py measures it for SD: each window's foreseen image
    (flow matching: ``x̂0 = x − σ v``, decoded by the VAE) compared with the anchor's."""
    from jointdiff_plugins.lpips_loader import load_lpips

    step_index, num_steps = 1, 3
    geometry = strip()
    geometry.setup(flux.latent_format)
    generator = torch.Generator("cpu").manual_seed(0)
    context = JobContext(flux, geometry, torch.device("cpu"), torch.float32, num_steps, generator)
    conditioner = text()
    conditioner.setup(context)
    denoiser = Denoiser(context, conditioner.prompt(), [conditioner])
    sync = syncdiffusion(w=20.0)
    sync.setup(context)
    scheduler = copy.deepcopy(flux.scheduler)
    flux.set_timesteps(scheduler, num_steps, geometry.window_size_latent)
    canvas = torch.randn((1, 16, WINDOW, LENGTH), generator=generator)
    t = scheduler.timesteps[step_index]
    state = StepState(step_index, t, num_steps, canvas, denoiser, context)
    sync.begin_step(state)
    batch = WindowBatch(0, tuple(range(geometry.num_windows)), scheduler)
    latents = geometry.extract(canvas, batch.window_ids)
    with torch.no_grad():  # as in the engine's loop
        updated = sync.update(latents, batch, state)
    assert not updated.requires_grad and updated.grad_fn is None

    alex = load_lpips("alex", random_backbone=True)
    vae = flux.pipeline.vae
    sigma = scheduler.sigmas[step_index]

    def loss(x):
        with torch.no_grad():
            velocity = denoiser.model_output(x, t, batch.window_ids, scheduler)
            x0 = x - sigma * velocity
            images = vae.decode(x0 / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
            return alex(images, images[sync.anchor_id : sync.anchor_id + 1]).flatten()

    before, after = loss(latents), loss(updated)
    others = [i for i in batch.window_ids if i != sync.anchor_id]
    assert others and torch.equal(updated[sync.anchor_id], latents[sync.anchor_id])
    assert (after[others] < before[others]).all(), (before, after)


# -- region and tile prompts -------------------------------------------------------------------


def test_regions_run_end_to_end(flux):
    regions = create(
        "conditioner", "regions", prompt="a snowy field", guidance_scale=GUIDANCE, bootstrap_steps=1,
        regions=[{"prompt": "a red fox", "rect": [0, 0, 96, 128], "guidance_scale": 2.5}],
    )  # fmt: skip
    latents = run(flux, strip(), [regions], latents=canvas_noise())
    assert latents.shape == (1, 16, WINDOW, LENGTH) and torch.isfinite(latents).all()
    assert (latents - run(flux, strip(), latents=canvas_noise())).abs().max() > 1e-3


def test_tile_text_on_a_torus_runs_end_to_end(flux):
    torus = create("geometry", "torus", height_px=8 * WINDOW, width_px=8 * LENGTH, window_latent=WINDOW, stride_latent=STRIDE)
    tiles = create("conditioner", "tile_text", prompts=["a stone wall"], style_prompt="seamless", guidance_scale=GUIDANCE)
    latents = run(flux, torus, [tiles], latents=canvas_noise())
    assert torus.num_windows == 6  # 2 × 3, wrapping both ways
    assert latents.shape == (1, 16, WINDOW, LENGTH) and torch.isfinite(latents).all()

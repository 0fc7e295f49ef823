"""Tests of the ``syncdiffusion`` synchronizer (tiny model, random-backbone LPIPS, real TAESD).

Small windows (16 latent cells = 128 px) keep the gradient passes cheap on a CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from sync_oracle import sync_diffusion_oracle

from jointdiff import JointDiffusion
from jointdiff.core.context import JobContext, StepState, WindowBatch
from jointdiff.core.registry import create
from jointdiff.engine.denoiser import Denoiser
from jointdiff.models.loading import as_model, make_scheduler
from jointdiff.utils.errors import ConfigError, ModelLoadError
from jointdiff_plugins.lpips_loader import AnchorDistance, backbone_weights_path, load_lpips
from jointdiff_plugins.syncdiffusion import SyncDiffusion

TAESD_DIR = str(Path(__file__).parent / "fixtures" / "taesd")
PROMPT = "a photo of a city"
WINDOW = {"window_latent": 16, "stride_latent": 8}


@pytest.fixture(scope="module")
def alex():
    return load_lpips("alex", random_backbone=True)


@pytest.fixture(scope="module")
def taesd():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(TAESD_DIR).eval().requires_grad_(False)


def run(pipeline, geometry, geometry_options, synchronizer, steps, view_batch_size=4):
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=7.5)
    job = JointDiffusion(pipeline, create("geometry", geometry, **geometry_options), [text], synchronizer,
                         view_batch_size=view_batch_size)
    return job(num_inference_steps=steps, seed=0, progress=False, output_type="latent").latents


# -- exactness: the plugin equals the one-window-at-a-time oracle --------------------------

CASES = {
    # geometry, its options, engine batch size, synchronizer options, oracle options.
    # strip: the two non-anchor windows share one gradient pass; grid: micro-batches of 2.
    "strip": ("strip", {"length_px": 256, **WINDOW}, 3, {}, {}),
    "grid": ("grid", {"height_px": 192, "width_px": 192, **WINDOW}, 4, {"micro_batch": 2, "anchor": 1},
             {"anchor": 1}),
    "wrap": ("strip", {"length_px": 192, "wrap": True, **WINDOW}, 3, {"until_step": 1, "decoder": "taesd"},
             {"until_step": 1}),
}


@pytest.fixture(scope="module")
def tiny64():
    """The tiny model in float64. LPIPS's ReLUs and max-pools make its gradient jump where a
    pre-activation crosses zero, so float32 rounding differences between a batched and a
    single-window pass would show up as ~0.1 % gradient differences; float64 keeps both paths
    on the same side of every kink (latents stay float32, as the engine keeps them)."""
    from jointdiff.models.loading import load_pipeline

    return load_pipeline("tiny", device="cpu", dtype=torch.float64)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(case, tiny64, alex, taesd):
    geometry, geometry_options, batch_size, sync_options, oracle_options = CASES[case]
    alex64 = copy.deepcopy(alex).double()
    if sync_options.get("decoder") == "taesd":
        sync_options = {**sync_options, "taesd_path": TAESD_DIR}
        oracle_options = {**oracle_options, "taesd": copy.deepcopy(taesd).double()}
    common = {"w": 200.0, "decay": 0.9}
    sync = create("synchronizer", "syncdiffusion", lpips_module=alex64, **common, **sync_options)
    got = run(tiny64, geometry, geometry_options, sync, steps=2, view_batch_size=batch_size)
    expected = sync_diffusion_oracle(
        tiny64, create("geometry", geometry, **geometry_options), prompt=PROMPT, guidance_scale=7.5,
        num_inference_steps=2, seed=0, lpips_module=alex64, **common, **oracle_options,
    )
    unsynchronized = run(tiny64, geometry, geometry_options, None, steps=2, view_batch_size=batch_size)
    assert (expected - unsynchronized).abs().max() > 0.01  # the synchronization does something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- one synchronization step lowers every window's loss -----------------------------------


def one_step(pipeline, sync, step_index=2, num_steps=4):
    """A job context, step state and one window batch built by hand at ``step_index``."""
    geometry = create("geometry", "strip", length_px=256, **WINDOW)
    geometry.setup(pipeline.vae_scale_factor)
    generator = torch.Generator("cpu").manual_seed(0)
    context = JobContext(as_model(pipeline), geometry, torch.device("cpu"), torch.float32, num_steps, generator)
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=7.5)
    text.setup(context)
    denoiser = Denoiser(context, text.prompt(), [text])
    sync.setup(context)
    scheduler = copy.deepcopy(pipeline.scheduler)
    scheduler.set_timesteps(num_steps, device="cpu")
    canvas = torch.randn((1, 4, 16, 32), generator=generator)
    state = StepState(step_index, scheduler.timesteps[step_index], num_steps, canvas, denoiser, context)
    sync.begin_step(state)
    return state, WindowBatch(0, tuple(range(geometry.num_windows)), scheduler)


@pytest.mark.parametrize("decoder", ["taesd", "vae"])
def test_one_step_lowers_lpips_to_anchor(decoder, tiny_pipeline, alex, taesd):
    sync = create("synchronizer", "syncdiffusion", lpips_module=alex, decoder=decoder, taesd_path=TAESD_DIR, w=20.0)
    state, batch = one_step(tiny_pipeline, sync)
    latents = state.context.geometry.extract(state.canvas, batch.window_ids)
    with torch.no_grad():  # as in the engine's loop
        updated = sync.update(latents, batch, state)
    assert not updated.requires_grad and updated.grad_fn is None  # no graph outlives the batch

    def loss(x):  # LPIPS of each window's foreseen image to the anchor's, computed independently
        with torch.no_grad():
            noise = state.denoiser.model_output(x, state.timestep, batch.window_ids, batch.scheduler)
            x0 = batch.scheduler.step(noise, state.timestep, x).pred_original_sample
            images = (taesd.decode(x0).sample if decoder == "taesd"
                      else tiny_pipeline.vae.decode(x0 / tiny_pipeline.vae.config.scaling_factor).sample)
            images = images.clamp(-1, 1)
            return alex(images, images[sync.anchor_id : sync.anchor_id + 1]).flatten()

    before, after = loss(latents), loss(updated)
    others = [i for i in batch.window_ids if i != sync.anchor_id]
    assert torch.equal(updated[sync.anchor_id], latents[sync.anchor_id])  # the anchor is not moved
    assert (after[others] < before[others]).all(), (before, after)


def test_checkpointing_gives_the_same_gradient(tiny_pipeline, alex):
    def gradient(**options):
        sync = create("synchronizer", "syncdiffusion", lpips_module=alex, **options)
        state, batch = one_step(tiny_pipeline, sync)
        sync._prepare_anchor(batch, state)
        latents = state.context.geometry.extract(state.canvas, [0, 2])
        return sync.gradient(latents, [0, 2], batch.scheduler, state)

    plain = gradient()
    checkpointed = gradient(checkpoint_decoder=True, checkpoint_unet=True)
    assert plain.abs().max() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny_pipeline.vae.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny_pipeline.unet.modules())


# -- w = 0 is plain MultiDiffusion ---------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_zero_weight_reproduces_none(scheduler, fresh_tiny_pipeline, alex):
    pipeline = fresh_tiny_pipeline
    pipeline.scheduler = make_scheduler(scheduler, pipeline.scheduler.config)
    options = {"length_px": 256, **WINDOW}
    sync = create("synchronizer", "syncdiffusion", lpips_module=alex, w=0.0, micro_batch=1)
    synchronized = run(pipeline, "strip", options, sync, steps=2, view_batch_size=2)
    plain = run(pipeline, "strip", options, create("synchronizer", "none"), steps=2, view_batch_size=2)
    assert torch.equal(synchronized, plain)


# -- options and errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, words",
    [
        ({"decay": -0.5}, ["decay", "-0.5"]),
        ({"w": -1}, ["'w'", "-1"]),
        ({"net": "resnet"}, ["net", "resnet"]),
        ({"every": 0}, ["every", "0"]),
        ({"anchor": -1}, ["anchor", "-1"]),
        ({"lpips_module": "vgg"}, ["lpips_module", "callable"]),
        ({"preset": "paper"}, ["preset", "paper"]),
        ({"steps": 3}, ["unknown option", "steps"]),
    ],
)
def test_invalid_options(options, words):
    with pytest.raises(ConfigError) as error:
        create("synchronizer", "syncdiffusion", **options)
    for word in words:
        assert word in str(error.value)


def test_presets_fill_only_unspecified_fields():
    control = SyncDiffusion(preset="controlsync").options
    assert (control.w, control.decay, control.every, control.until_step, control.anchor) == (20.0, 0.95, 1, 10, 0)
    paper = SyncDiffusion(preset="syncdiffusion").options
    assert (paper.w, paper.decay, paper.every, paper.until_step, paper.anchor) == (20.0, 0.95, 1, None, None)
    mixed = SyncDiffusion(preset="controlsync", until_step=None, w=5.0).options
    assert (mixed.w, mixed.until_step, mixed.anchor) == (5.0, None, 0)
    sync = SyncDiffusion(preset="controlsync")
    assert [i for i in range(50) if sync.synchronizes(i)] == list(range(10))
    assert [i for i in range(6) if SyncDiffusion(every=2).synchronizes(i)] == [1, 3, 5]


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"anchor": 99}, ConfigError, ["anchor = 99", "3 windows"]),
        ({"autocast": "float16"}, ConfigError, ["float16", "CUDA"]),
        ({"decoder": "taesd", "taesd_path": "/nonexistent/taesd"}, ModelLoadError, ["taesd_path", "/nonexistent/taesd"]),
    ],
)
def test_setup_errors(options, error, words, tiny_pipeline, alex):
    sync = create("synchronizer", "syncdiffusion", lpips_module=alex, **options)
    with pytest.raises(error) as raised:
        run(tiny_pipeline, "strip", {"length_px": 256, **WINDOW}, sync, steps=1)
    for word in words:
        assert word in str(raised.value)


# -- LPIPS: offline loading, anchor feature reuse -------------------------------------------


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache and a download that fails as it does without a network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def test_missing_backbone_weights_explain_how_to_provide_them(offline_torch_home, tiny_pipeline):
    with pytest.raises(ModelLoadError) as error:
        load_lpips("squeeze")
    message = str(error.value)
    assert str(backbone_weights_path("squeeze")) in message and str(offline_torch_home) in message
    assert "squeezenet1_1-b8a52dc0.pth" in message and "lpips_module" in message
    sync = create("synchronizer", "syncdiffusion", net="squeeze")  # no silent random backbone
    with pytest.raises(ModelLoadError):
        run(tiny_pipeline, "strip", {"length_px": 256, **WINDOW}, sync, steps=1)


def test_backbone_weights_are_read_from_the_torch_cache(offline_torch_home):
    from torchvision.models import squeezenet1_1

    torch.manual_seed(1)
    state = squeezenet1_1().state_dict()
    path = backbone_weights_path("squeeze")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    module = load_lpips("squeeze")
    torch.testing.assert_close(module.net.slice1[0].weight, state["features.0.weight"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("net", ["alex", "squeeze"])
def test_anchor_distance_equals_lpips(net):
    module = load_lpips(net, random_backbone=True)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    distance = AnchorDistance(module)
    distance.set_anchor(images[1:2])
    torch.testing.assert_close(distance(images), module(images, images[1:2]).flatten(), rtol=1e-5, atol=1e-7)
    assert distance(images)[1] < 1e-6 < distance(images)[0]  # zero at the anchor itself

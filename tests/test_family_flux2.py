"""The FLUX.2 family (dev, klein, klein base) against the stock diffusers pipelines on tiny
random models (offline, CPU)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_close_to_stock as assert_close

from jointdiff import JointDiffusion, create
from jointdiff.models.families.flow import pack_patches, unpack_patches
from jointdiff.models.families.flux2 import Flux2, build_tiny_pipeline, empirical_mu
from jointdiff.testing import OneWindowGeometry
from jointdiff.utils.errors import ConfigError

PROMPT = "a red fox in the snow"
SIZE = (6, 10)  # canvas cells of a non-square window: 96 × 160 px
WINDOW = (8, 12)  # the engine's non-square window (at least min_window = 8 cells): 128 × 192 px
STEPS = 2


@pytest.fixture(scope="module")
def pipes():
    return {variant: build_tiny_pipeline(variant=variant) for variant in ("dev", "klein", "klein-base")}


@pytest.fixture(scope="module")
def dev(pipes):
    return Flux2(pipes["dev"])


def initial_latents(seed: int = 1, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.randn((1, 128, *size), generator=torch.Generator().manual_seed(seed))


def engine_window(family, noise, guidance_scale=None):
    """The real engine on one window from unit ``noise`` ``(1, 128, h, w)`` with the ``text``
    conditioner (no negative prompt); returns the final latents."""
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=guidance_scale)
    job = JointDiffusion(family, OneWindowGeometry(noise.shape[-2:]), [text])
    return job(STEPS, latents=noise.clone(), output_type="latent", progress=False).latents


@pytest.mark.parametrize("variant", ["dev", "klein", "klein-base"])
def test_window_equals_stock_pipeline(pipes, variant):
    """dev: embedded guidance; klein base: true CFG with "" negatives; klein: no guidance."""
    pipe = pipes[variant]
    family = Flux2(pipe)
    noise = initial_latents(size=WINDOW)
    guided = family.guidance_mode != "none"
    ours = engine_window(family, noise, 3.5 if guided else None)
    h, w = WINDOW
    with torch.no_grad():
        stock = pipe(
            prompt=PROMPT, height=16 * h, width=16 * w, num_inference_steps=STEPS, guidance_scale=3.5,
            latents=noise.clone(), output_type="latent",
        ).images
    if variant == "dev":  # Flux2Pipeline returns packed tokens of the canvas space
        assert_close(pack_patches(ours, patch=1), stock)
    else:  # Flux2KleinPipeline returns VAE latents (batch norm undone, unpatchified)
        assert_close(family.to_vae_latents(ours), stock)


def test_x0_round_trip(dev):
    scheduler = copy.deepcopy(dev.scheduler)
    dev.set_timesteps(scheduler, 4, SIZE)
    x, v = initial_latents(2), initial_latents(3)
    for t in scheduler.timesteps:
        x0 = dev.predicted_x0(x, v, t, scheduler)
        assert torch.allclose(dev.output_from_x0(x, x0, t, scheduler), v, atol=1e-4)


def test_packing_and_vae_round_trips(pipes, dev):
    x = initial_latents(4)
    tokens = pack_patches(x, patch=1)
    assert torch.equal(tokens, pipes["dev"]._pack_latents(x))
    assert torch.equal(unpack_patches(tokens, SIZE, patch=1), x)
    vae_latents = dev.to_vae_latents(x)
    assert vae_latents.shape == (1, 32, 2 * SIZE[0], 2 * SIZE[1])
    vae = pipes["dev"].vae
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    stock = pipes["dev"]._unpatchify_latents(x * std + vae.bn.running_mean.view(1, -1, 1, 1))
    assert torch.allclose(vae_latents, stock, atol=1e-6)
    assert torch.allclose(dev.from_vae_latents(vae_latents), x, atol=1e-5)
    with torch.no_grad():
        assert dev.decode(x[..., :2, :3]).shape == (1, 3, 32, 48)


def test_window_facts(pipes, dev):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    for tokens, steps in [(60, 2), (4096, 28), (6000, 50)]:
        assert empirical_mu(tokens, steps) == pytest.approx(compute_empirical_mu(tokens, steps), rel=1e-12)
    scheduler = copy.deepcopy(dev.scheduler)
    dev.set_timesteps(scheduler, STEPS, SIZE)
    reference = copy.deepcopy(dev.scheduler)
    reference.set_timesteps(sigmas=[1.0, 0.5], mu=compute_empirical_mu(SIZE[0] * SIZE[1], STEPS))
    assert torch.allclose(scheduler.sigmas, reference.sigmas)
    fmt = dev.latent_format
    assert (fmt.channels, fmt.scale_factor, fmt.patch, fmt.native_window) == (128, 16, 1, 64)
    ids = dev.image_ids((2, 3), top=5, left=7)
    assert ids[:, 0].eq(0).all() and ids[:, 3].eq(0).all()
    assert ids[:, 1].tolist() == [5, 5, 5, 6, 6, 6] and ids[:, 2].tolist() == [7, 8, 9] * 2
    assert torch.equal(dev.image_ids((6, 10)), pipes["dev"]._prepare_latent_ids(initial_latents())[0])
    assert Flux2(pipes["klein"]).guidance_mode == "none" and Flux2(pipes["klein-base"]).guidance_mode == "cfg"


def test_offsets_group_windows(dev):
    """Each window's ids are shifted by its own offset even inside one batch."""
    positive, _ = dev.encode_prompts([PROMPT, "a boat"])
    x = torch.cat([initial_latents(5), initial_latents(6)])
    t = torch.tensor(500.0)
    g = torch.tensor([4.0, 2.0])
    offsets = torch.tensor([[0, 0], [3, 8]])
    with torch.no_grad():
        both = dev.forward(x, t, positive, guidance_scale=g, offsets=offsets)
        plain = dev.forward(x, t, positive, guidance_scale=g)
        second = dev.forward(x[1:], t, positive.select([1]), guidance_scale=g[1:], offsets=offsets[1:])
    assert both.dtype == torch.float32 and both.shape == x.shape
    assert torch.allclose(both[:1], plain[:1], atol=1e-6)
    assert torch.allclose(both[1:], second, atol=1e-6)
    assert not torch.allclose(both[1:], plain[1:], atol=1e-6)


def test_bad_inputs(pipes, dev):
    with pytest.raises(ConfigError, match="negative_prompt"):
        dev.encode_prompts([PROMPT], ["blurry"])
    with pytest.raises(ConfigError, match="negative_prompt"):
        Flux2(pipes["klein"]).encode_prompts([PROMPT], ["blurry"])
    for size in (4, 300):
        with pytest.raises(ConfigError, match="window"):
            dev.latent_format.check_window(size, "window", "flux2")
    with pytest.raises(ConfigError, match="max_sequence_length"):
        Flux2(pipes["dev"], max_sequence_length=0)
    with pytest.raises(ConfigError, match="variant"):
        build_tiny_pipeline(variant="schnell")


def test_long_prompt_warns_cut_words(pipes):
    fits = Flux2(pipes["klein"])._token_count("a cat on a mat")  # chat template included
    family = Flux2(pipes["klein"], max_sequence_length=fits)
    with pytest.warns(UserWarning, match="cut: 'purple elephants'"):
        family.encode_prompts(["a cat on a mat purple elephants"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        family.encode_prompts(["a cat"])

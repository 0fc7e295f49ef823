"""Start from an image (jointdiff.image.init_image): img2img and keep-mask inpainting against
diffusers' stock pipelines on one window, strength 1 = text-to-image, the kept region, the
wrap-aware encode, invariance to batching and resume, and one-line errors for bad input.

Equality with diffusers: the engine samples the VAE posterior of sheet ``s`` with the
generator keyed ``(seed, "init_image", s)``; diffusers' img2img / inpaint pipelines draw the
posterior sample and then the noise from the one generator they are given. So the stock
pipeline gets a fresh copy of that keyed generator, and the engine gets as its unit noise
the second draw of it (``latents=``): both then see the same posterior sample and noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jointdiff import JointDiffusion, create
from jointdiff.core.context import keyed_generator
from jointdiff.core.geometry import encode_sheets, encode_wrapped
from jointdiff.image.init_image import ENCODE_PURPOSE, InitImage, encode_image, feather_mask, latent_mask, start_step
from jointdiff.models.families.sd import StableDiffusion
from jointdiff.models.loading import load_model, make_scheduler
from jointdiff.testing.invariance import (
    check_batch_order_invariance,
    check_batch_size_invariance,
    check_resume_invariance,
)
from jointdiff.utils.errors import ConfigError

PROMPT = "a photo of a city"
WINDOW = 16  # latent cells: 128 px windows
SEED = 3


@pytest.fixture(scope="module")
def sd():
    return load_model("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def flux():
    return load_model("tiny-flux", device="cpu", dtype="float32")


def random_pil(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def random_pixels(height: int, width: int, sheets: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand((sheets, 3, height, width), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def stock_draws(channels: int, seed: int = SEED):
    """The unit noise diffusers draws after the posterior sample from the keyed generator of
    sheet 0, and a fresh copy of that generator for the stock pipeline."""
    generator = keyed_generator(seed, ENCODE_PURPOSE, 0)
    torch.randn((1, channels, WINDOW, WINDOW), generator=generator)  # the posterior sample
    noise = torch.randn((1, channels, WINDOW, WINDOW), generator=generator)
    return noise, keyed_generator(seed, ENCODE_PURPOSE, 0)


def one_window_job(model, init, guidance_scale=7.5, **engine) -> JointDiffusion:
    size_px = WINDOW * 8
    geometry = create("geometry", "strip", length_px=size_px, window_latent=WINDOW, stride_latent=WINDOW)
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=guidance_scale)
    return JointDiffusion(model, geometry, [text], init=init, **engine)


def run(job, steps, seed=SEED, **call):
    return job(steps, seed=seed, progress=False, output_type=call.pop("output_type", "latent"), **call)


# -- equality with diffusers ------------------------------------------------------------------


def test_start_step_is_diffusers_get_timesteps(sd):
    from diffusers import StableDiffusionImg2ImgPipeline

    stock = StableDiffusionImg2ImgPipeline(**sd.pipeline.components)
    for steps in (1, 3, 5, 10):
        stock.scheduler.set_timesteps(steps)
        for strength in (0.0, 0.3, 0.5, 0.6, 0.75, 1.0):
            _, left = stock.get_timesteps(steps, strength, "cpu")
            assert start_step(steps, strength) == steps - left


def test_one_window_equals_stable_diffusion_img2img(sd):
    """Strength 0.6 of 5 DDIM steps (3 run): measured difference 0 (bitwise)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    image = random_pil(128, 128)
    noise, generator = stock_draws(4)
    result = run(one_window_job(sd, InitImage.from_pil(image, 0.6)), 5, latents=noise)
    stock = StableDiffusionImg2ImgPipeline(**sd.pipeline.components)
    stock.set_progress_bar_config(disable=True)
    expected = stock(PROMPT, image=image, strength=0.6, num_inference_steps=5, guidance_scale=7.5,
                     generator=generator, output_type="latent").images
    torch.testing.assert_close(result.latents, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_one_window_keep_mask_equals_stable_diffusion_inpaint(sd, strength):
    """The keep blend is diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet
    (mask white = repaint, block-aligned so area and nearest downsampling agree): measured
    difference 0 (bitwise), at strength 1 (pure noise start) and 0.5."""
    from diffusers import StableDiffusionInpaintPipeline

    image = random_pil(128, 128)
    repaint = np.zeros((128, 128), np.uint8)
    repaint[:, 40:104] = 255
    mask = Image.fromarray(repaint)
    noise, generator = stock_draws(4)
    result = run(one_window_job(sd, InitImage.from_pil(image, strength, repaint=mask)), 4, latents=noise)
    stock = StableDiffusionInpaintPipeline(**sd.pipeline.components)
    stock.set_progress_bar_config(disable=True)
    expected = stock(PROMPT, image=image, mask_image=mask, height=128, width=128, strength=strength,
                     num_inference_steps=4, guidance_scale=7.5, generator=generator, output_type="latent").images
    torch.testing.assert_close(result.latents, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [5, 4])
def test_one_window_equals_flux_img2img(flux, steps):
    """tiny-flux (embedded guidance 4), strength 0.6 of 5 steps (5·0.6 is whole) and of 4
    (4·0.6 is not: the flow pipelines' rounding runs one step more than SD's): measured
    relative difference 0."""
    from diffusers import FluxImg2ImgPipeline

    from jointdiff.models.families.flow import unpack_patches

    image = random_pil(128, 128)
    noise, generator = stock_draws(16)
    result = run(one_window_job(flux, InitImage.from_pil(image, 0.6), guidance_scale=4.0), steps, latents=noise)
    stock = FluxImg2ImgPipeline(**flux.pipeline.components)
    stock.set_progress_bar_config(disable=True)
    packed = stock(PROMPT, image=image, strength=0.6, height=128, width=128, num_inference_steps=steps, guidance_scale=4.0,
                   generator=generator, output_type="latent", max_sequence_length=flux.max_sequence_length).images
    expected = unpack_patches(packed, (WINDOW, WINDOW))
    assert ((result.latents - expected).abs().max() / expected.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_strength_one_without_mask_is_text_to_image(family, request):
    """Strength 1 and no keep mask starts from ``noise · init_noise_sigma``, so it equals
    text-to-image from the same noise exactly (bitwise; for SD, diffusers' img2img would
    add √ᾱ_T x0 at strength 1, its inpaint pipeline does not)."""
    model = request.getfixturevalue(family)
    channels = model.latent_format.channels
    noise = torch.randn((1, channels, WINDOW, WINDOW), generator=torch.Generator().manual_seed(0))
    init = InitImage(random_pixels(128, 128), strength=1.0)
    with_image = run(one_window_job(model, init, guidance_scale=None), 2, latents=noise.clone())
    text_only = run(one_window_job(model, None, guidance_scale=None), 2, latents=noise.clone())
    assert torch.equal(with_image.latents, text_only.latents)


def test_strength_zero_returns_the_round_trip(sd):
    """No step runs: the result is the image's latents (and its VAE round trip)."""
    init = InitImage(random_pixels(128, 256), strength=0.0)
    geometry = create("geometry", "strip", length_px=256, window_latent=WINDOW, stride_latent=8)
    job = JointDiffusion(sd, geometry, [create("conditioner", "text", prompt=PROMPT)], init=init)
    calls = []
    result = job(4, seed=SEED, progress=False, callback=lambda *a: calls.append(a))
    x0 = encode_image(init.image, sd, geometry, SEED)
    assert not calls and torch.equal(result.latents, x0)
    torch.testing.assert_close(result.pixels, geometry.decode(x0, sd.decode))


# -- the kept region -------------------------------------------------------------------------


def test_keep_mask_holds_the_image(sd):
    """Left half kept, strength 1, a two-and-more-window strip: the final latents of the kept
    cells are the image's latents exactly (tolerance 0); the free half changes. In pixels the
    random tiny VAE decoder mixes globally (GroupNorm statistics, mid-block attention), so
    the kept half is only nearer the round trip: measured mean |Δ| 0.21 to 0.23 against 0.33
    to 0.35 for the same job without the mask (seeds 0 to 2)."""
    image = random_pixels(128, 256, seed=5)
    keep = torch.zeros(1, 1, 128, 256)
    keep[..., :128] = 1
    geometry = create("geometry", "strip", length_px=256, window_latent=WINDOW, stride_latent=8)
    text = create("conditioner", "text", prompt=PROMPT)
    result = JointDiffusion(sd, geometry, [text], init=InitImage(image, 1.0, keep))(3, seed=SEED, progress=False)
    unmasked = JointDiffusion(sd, geometry, [text], init=InitImage(image, 1.0))(3, seed=SEED, progress=False)
    x0 = encode_image(image, sd, geometry, SEED)
    assert torch.equal(result.latents[..., :16], x0[..., :16])
    assert (result.latents[..., 16:] - x0[..., 16:]).abs().mean() > 1.0
    round_trip = geometry.decode(x0, sd.decode)[..., :128]
    kept = (result.pixels[..., :128] - round_trip).abs().mean()
    assert kept < 0.8 * (unmasked.pixels[..., :128] - round_trip).abs().mean()


def test_feather_mask_stays_inside_and_wraps():
    keep = torch.zeros(1, 1, 8, 64)
    keep[..., :24] = 1
    soft = feather_mask(keep, 8)
    assert torch.equal(soft[..., 24:], torch.zeros_like(soft[..., 24:]))  # never outside the kept region
    torch.testing.assert_close(soft[0, 0, 0, 23], torch.tensor(1 / 9))  # r = 4: 1/(2r+1) at the edge
    assert torch.equal(soft[..., 8:16], torch.ones_like(soft[..., 8:16]))  # 2r px inside: 1
    assert soft[0, 0, 0, 0] == 1  # a canvas border is no edge of the mask
    wrapped = feather_mask(keep, 8, wraps=(False, True))
    assert wrapped[0, 0, 0, 0] < 1  # on a loop the edge at column 0 meets the free end
    assert latent_mask(keep, 8).shape == (1, 1, 1, 8)


# -- encoding with the geometry's continuity ---------------------------------------------------


def local_encoder(pixels: torch.Tensor, sheet: int) -> torch.Tensor:
    """A stand-in encoder with a 3×3 receptive field (zero padding) and factor 8."""
    kernel = torch.arange(27.0).reshape(1, 3, 3, 3) / 27
    return F.avg_pool2d(F.conv2d(pixels, kernel, padding=1), 8) + sheet


@pytest.mark.parametrize("name, options", [
    ("strip", dict(length_px=256, window_latent=16, stride_latent=8, wrap=True)),
    ("torus", dict(height_px=192, width_px=192, window_latent=16, stride_latent=8)),
    ("equirect", dict(width_px=256, window_latent=16, rings=[(0.0, 4), (60.0, 2), (-60.0, 2)])),
])
def test_wrapped_encode_sees_across_the_seam(name, options):
    """With circular context, encoding commutes with a shift around the loop (no seam)."""
    geometry = create("geometry", name, **options)
    geometry.setup(StableDiffusion.latent)
    sheets, height, width = geometry.canvas_shape_latent
    pixels = random_pixels(8 * height, 8 * width, sheets)
    wraps = geometry.wraps()
    shift = (8 * 3 if wraps[0] else 0, 8 * 5 if wraps[1] else 0)
    encoded = geometry.encode(pixels, local_encoder)
    shifted = geometry.encode(pixels.roll(shift, dims=(-2, -1)), local_encoder)
    torch.testing.assert_close(shifted, encoded.roll((shift[0] // 8, shift[1] // 8), dims=(-2, -1)))
    plain = encode_sheets(pixels, local_encoder)
    assert not torch.allclose(encoded, plain)  # zero padding would leave a seam


def test_cubemap_encodes_face_by_face():
    geometry = create("geometry", "cubemap", face_px=64, window_latent=8, edge_views=False, corner_views=False)
    geometry.setup(StableDiffusion.latent)
    pixels = random_pixels(64, 64, 6)
    torch.testing.assert_close(geometry.encode(pixels, local_encoder), encode_sheets(pixels, local_encoder))
    assert encode_wrapped(pixels, local_encoder, (False, False), 8, 8).shape == (6, 1, 8, 8)


class ContextFreeModel:
    """A stand-in family whose encoder has no spatial context (8×8 means)."""

    device = torch.device("cpu")
    latent_format = StableDiffusion.latent

    def encode(self, pixels, generator=None):
        return F.avg_pool2d(pixels, 8)


def test_tiled_encode_reproduces_a_context_free_encoder():
    geometry = create("geometry", "strip", length_px=512, window_latent=16, stride_latent=8, wrap=True)
    geometry.setup(StableDiffusion.latent)
    pixels = random_pixels(128, 512)
    whole = encode_image(pixels, ContextFreeModel(), geometry, SEED, tile_latent=0)
    tiled = encode_image(pixels, ContextFreeModel(), geometry, SEED, tile_latent=8)
    torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole, F.avg_pool2d(pixels, 8))


# -- invariance ------------------------------------------------------------------------------


def masked_job(model, name, options, strength):
    """A job factory with an init image keeping the lower half (feathered) of the canvas."""

    def job(view_batch_size):
        geometry = create("geometry", name, **options)
        geometry.setup(model.latent_format)
        sheets, height, width = geometry.canvas_shape_latent
        keep = torch.zeros(sheets, 1, 8 * height, 8 * width)
        keep[..., 4 * height :, :] = 1
        init = InitImage(random_pixels(8 * height, 8 * width, sheets), strength, keep, feather_px=8)
        text = create("conditioner", "text", prompt=PROMPT)
        return JointDiffusion(model, geometry, [text], view_batch_size=view_batch_size, init=init)

    return job


@pytest.mark.parametrize("name, options, strength", [
    ("strip", dict(length_px=256, window_latent=16, stride_latent=8, wrap=True), 0.75),
    ("equirect", dict(width_px=256, window_latent=16, rings=[(0.0, 4), (60.0, 2), (-60.0, 2)]), 0.75),
])
def test_keep_mask_invariance(name, options, strength, tmp_path):
    """Euler ancestral (fresh noise every step), 4 steps of which 3 run: batch size 1 vs 3,
    batch order and resume give the same canvas; the kept cells hold x0 (latent fusion on
    the strip, the fused x̂0 of the views on equirect)."""
    model = load_model("tiny", device="cpu", dtype="float32")
    model.pipeline.scheduler = make_scheduler("euler_a", model.pipeline.scheduler.config)
    job = masked_job(model, name, options, strength)
    canvas = check_batch_size_invariance(job, sizes=(1, 3), steps=4, seed=SEED)
    check_batch_order_invariance(job, orders=("reversed",), steps=4, seed=SEED)
    check_resume_invariance(job, steps=4, stop_after=(1,), resume_view_batch_size=3, seed=SEED, directory=tmp_path,
                            rtol=1e-4, atol=1e-4)
    engine = job(1)
    engine.geometry.setup(model.latent_format)
    x0 = encode_image(engine.init.image, model, engine.geometry, SEED)
    held = latent_mask(feather_mask(engine.init.keep, 8, engine.geometry.wraps()), 8) == 1
    assert held.any() and torch.equal(canvas[held.expand_as(canvas)], x0[held.expand_as(x0)])
    assert (canvas - x0)[~held.expand_as(x0)].abs().mean() > 0.01


# -- bad input -------------------------------------------------------------------------------


def one_line_error(action) -> str:
    with pytest.raises(ConfigError) as error:
        action()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_config_error_before_the_model():
    image = random_pixels(128, 256)
    assert "strength" in one_line_error(lambda: InitImage(image, strength=1.5))
    assert "strength" in one_line_error(lambda: InitImage(image, strength=-0.1))
    assert "strength" in one_line_error(lambda: InitImage(image, strength=True))
    assert "feather_px" in one_line_error(lambda: InitImage(image, feather_px=-1))
    assert "keep mask" in one_line_error(lambda: InitImage(image, keep=torch.ones(1, 1, 128, 128)))
    assert "[0, 1]" in one_line_error(lambda: InitImage(image, keep=torch.full((1, 1, 128, 256), 2.0)))
    assert "[-1, 1]" in one_line_error(lambda: InitImage(image * 255))
    assert "(S, 3, H_px, W_px)" in one_line_error(lambda: InitImage(torch.zeros(1, 4, 128, 256)))
    small = random_pil(8, 8)
    assert "not both" in one_line_error(lambda: InitImage.from_pil(small, keep=small, repaint=small))
    # The canvas size is known before the model loads: the family's latent format suffices.
    geometry = create("geometry", "strip", length_px=512, window_latent=16, stride_latent=8)
    geometry.setup(StableDiffusion.latent)
    message = one_line_error(lambda: InitImage(image).check(geometry))
    assert "(1, 3, 128, 256)" in message and "(1, 3, 128, 512)" in message


def test_bad_input_at_the_job_and_from_files(sd, tmp_path):
    geometry = create("geometry", "strip", length_px=512, window_latent=16, stride_latent=8)
    job = JointDiffusion(sd, geometry, [create("conditioner", "text", prompt=PROMPT)], init=InitImage(random_pixels(128, 256)))
    assert "init image has shape" in one_line_error(lambda: job(2, progress=False))
    assert "init must be" in one_line_error(lambda: JointDiffusion(sd, geometry, [], init="photo.png"))
    assert "missing.png' does not exist" in one_line_error(lambda: InitImage.from_files(tmp_path / "missing.png"))
    random_pil(16, 24).save(tmp_path / "photo.png")
    Image.fromarray(np.full((16, 24), 255, np.uint8)).save(tmp_path / "repaint.png")
    init = InitImage.from_files(tmp_path / "photo.png", 0.5, repaint=tmp_path / "repaint.png", feather_px=2)
    assert init.image.shape == (1, 3, 16, 24) and torch.equal(init.keep, torch.zeros(1, 1, 16, 24))

"""The ``inpaint_model`` conditioner and the families' inpainting condition, against
diffusers' StableDiffusionInpaintPipeline (a tiny 9-channel UNet, random weights, CPU,
float32). FLUX.1 Fill against FluxFillPipeline: tests/test_family_flux.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from jointdiff import JointDiffusion, create
from jointdiff.models.families.flux import Flux
from jointdiff.models.families.flux import build_tiny_pipeline as build_tiny_flux
from jointdiff.models.families.sd import StableDiffusion
from jointdiff.models.tiny import build_tiny_inpaint_pipeline
from jointdiff.testing import check_conditioner, example_geometry, make_context, tiny_model
from jointdiff.testing.invariance import check_batch_size_invariance
from jointdiff.utils.errors import ConfigError
from jointdiff_plugins.inpaint import InpaintModelConditioner

PROMPT = "a red barn in a field"
WINDOW = 16  # latent cells: 128 px


@pytest.fixture(scope="module")
def sd_inpaint():
    return StableDiffusion(build_tiny_inpaint_pipeline(seed=0))


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers samples the VAE posterior with its generator; the families condition on
    its mean. Make the stock pipelines take the mean too."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def image_and_mask(height_px: int, width_px: int, seed: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGB image ``(1, 3, H, W)`` in [0, 1] and a mask ``(1, 1, H, W)``: 1 (repaint) in a
    rectangle that cuts latent cells in half, plus grey values on both sides of 0.5."""
    image = torch.rand(1, 3, height_px, width_px, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, 1, height_px, width_px)
    mask[..., 20:91, 36:101] = 1.0
    mask[..., :4, :] = 0.7  # binarised to 1
    mask[..., -4:, :] = 0.3  # binarised to 0
    return image, mask


def test_sd_layout_and_condition_equal_the_stock_pipeline(sd_inpaint, posterior_mean):
    """The canvas keeps 4 channels; the condition is [mask, masked-image latents] exactly as
    StableDiffusionInpaintPipeline's prepare_mask_latents makes them."""
    pipe = sd_inpaint.pipeline
    assert sd_inpaint.is_inpainting and sd_inpaint.latent_format.channels == 4
    assert not tiny_model("tiny").is_inpainting and not tiny_model("tiny-flux").is_inpainting
    image, mask = image_and_mask(128, 128)
    ours = sd_inpaint.inpaint_condition(image * 2 - 1, mask)
    binary = (mask >= 0.5).float()
    stock_mask, stock_latents = pipe.prepare_mask_latents(
        binary, (image * 2 - 1) * (binary < 0.5), 1, 128, 128, torch.float32, "cpu", None, False
    )
    assert ours.shape == (1, 5, WINDOW, WINDOW)
    assert torch.equal(ours[:, :1], stock_mask)
    torch.testing.assert_close(ours[:, 1:], stock_latents, rtol=0, atol=1e-6)


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_sd_one_window_equals_stock_inpaint_pipeline(sd_inpaint, posterior_mean, guidance):
    """One 16-cell window, 2 DDIM steps, strength 1: the engine with ``inpaint_model``
    equals StableDiffusionInpaintPipeline (which, for a 9-channel UNet, does not blend the
    kept region back into the latents) from the same noise, image and mask."""
    image, mask = image_and_mask(128, 128)
    latents = torch.randn(1, 4, WINDOW, WINDOW, generator=torch.Generator().manual_seed(1))
    geometry = create("geometry", "strip", length_px=128, window_latent=WINDOW, stride_latent=WINDOW)
    text = create("conditioner", "text", prompt=PROMPT, guidance_scale=guidance)
    inpaint = create("conditioner", "inpaint_model", image=image, mask=mask)
    ours = JointDiffusion(sd_inpaint, geometry, [text, inpaint])(
        2, latents=latents.clone(), output_type="latent", progress=False
    ).latents
    expected = sd_inpaint.pipeline(
        PROMPT, image=image, mask_image=mask, height=128, width=128, strength=1.0, num_inference_steps=2,
        guidance_scale=guidance, latents=latents.clone(), output_type="latent",
    ).images
    assert geometry.num_windows == 1
    assert (ours - expected).abs().max().item() < 1e-4
    other = create("conditioner", "inpaint_model", image=image, mask=torch.zeros_like(mask))
    fresh = create("conditioner", "text", prompt=PROMPT, guidance_scale=guidance)
    without = JointDiffusion(sd_inpaint, geometry, [fresh, other])(
        2, latents=latents.clone(), output_type="latent", progress=False
    ).latents
    assert (ours - without).abs().max().item() > 1e-3  # the mask reaches the model


def test_flux_fill_condition_layout(posterior_mean):
    """FLUX.1 Fill's condition: 16 masked-image latent channels + 64 mask channels (each
    8×8 block of a cell, row-major), FluxFillPipeline's packed layout unpacked."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    from jointdiff.models.families.flow import unpack_patches

    base = build_tiny_flux(seed=0)
    torch.manual_seed(5)
    transformer = FluxTransformer2DModel(
        in_channels=384, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    fill = Flux(FluxFillPipeline(**{**parts, "transformer": transformer}))
    assert fill.is_inpainting and fill.latent_format.channels == 16
    image, mask = image_and_mask(128, 128)
    pixels = image * 2 - 1
    ours = fill.inpaint_condition(pixels, mask)
    binary = (mask >= 0.5).float()
    packed_mask, packed_image = fill.pipeline.prepare_mask_latents(
        binary, pixels * (1 - binary), 1, 16, 1, 128, 128, torch.float32, "cpu", None
    )
    assert ours.shape == (1, 80, WINDOW, WINDOW)
    assert torch.equal(ours[:, 16:], unpack_patches(packed_mask, (WINDOW, WINDOW)))
    torch.testing.assert_close(ours[:, :16], unpack_patches(packed_image, (WINDOW, WINDOW)), rtol=0, atol=1e-6)


# -- many windows ---------------------------------------------------------------------------


def write_pngs(tmp_path, height_px: int, width_px: int) -> tuple[str, str]:
    image, mask = image_and_mask(height_px, width_px)
    image_path, mask_path = tmp_path / "image.png", tmp_path / "mask.png"
    Image.fromarray((image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(image_path)
    Image.fromarray(((mask[0, 0] >= 0.5) * 255).to(torch.uint8).numpy(), mode="L").convert("RGB").save(mask_path)
    return str(image_path), str(mask_path)


def test_conditioner_conforms_and_reads_files(sd_inpaint, tmp_path):
    """The conformance checks (rows per window and guidance branch, batch independence, the
    family's forward accepts them, options survive JSON) on three windows; files are read
    as the tensors they hold (an RGB mask as grayscale)."""
    geometry = example_geometry()
    geometry.setup(sd_inpaint.latent_format)
    sheets, height, width = geometry.canvas_shape_latent
    image_path, mask_path = write_pngs(tmp_path, 8 * height, 8 * width)
    conditioner = InpaintModelConditioner(image=image_path, mask=mask_path)
    check_conditioner(conditioner, make_context(sd_inpaint, example_geometry()))
    image, mask = image_and_mask(8 * height, 8 * width)
    from_tensors = InpaintModelConditioner(image=(image * 255).round() / 255, mask=(mask >= 0.5).float())
    from_tensors.setup(make_context(sd_inpaint, example_geometry()))
    torch.testing.assert_close(conditioner._condition, from_tensors._condition, rtol=0, atol=1e-5)


def test_results_do_not_depend_on_the_batch_size(sd_inpaint, tmp_path):
    image_path, mask_path = write_pngs(tmp_path, 128, 256)

    def job(view_batch_size):
        geometry = create("geometry", "strip", length_px=256, window_latent=WINDOW, stride_latent=8)
        text = create("conditioner", "text", prompt=PROMPT, guidance_scale=5.0)
        inpaint = create("conditioner", "inpaint_model", image=image_path, mask=mask_path)
        return JointDiffusion(sd_inpaint, geometry, [text, inpaint], view_batch_size=view_batch_size)

    check_batch_size_invariance(job, steps=2, seed=0)


# -- bad input ------------------------------------------------------------------------------


def run_job(model, image, mask, length_px=128, conditioners=None):
    geometry = create("geometry", "strip", length_px=length_px, window_latent=WINDOW, stride_latent=WINDOW)
    text = create("conditioner", "text", prompt=PROMPT)
    if conditioners is None:
        conditioners = [create("conditioner", "inpaint_model", image=image, mask=mask)]
    return JointDiffusion(model, geometry, [text, *conditioners])(1, output_type="latent", progress=False)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_config_error(sd_inpaint):
    image, mask = image_and_mask(128, 128)
    with pytest.raises(ConfigError) as error:
        run_job(sd_inpaint, image, mask[..., :64, :])
    assert "mask is 128×64 px" in one_line(error) and "128×128 px" in one_line(error)
    with pytest.raises(ConfigError) as error:
        run_job(sd_inpaint, image, mask, length_px=256)
    assert "image is 128×128 px" in one_line(error)
    with pytest.raises(ConfigError) as error:
        run_job(sd_inpaint, image, torch.rand(3, 128, 128))
    assert "mask must be (1, H, W)" in one_line(error)
    for name in ("tiny", "tiny-flux"):
        with pytest.raises(ConfigError) as error:
            run_job(tiny_model(name), image, mask)
        assert "not an inpainting model" in one_line(error)
    with pytest.raises(ConfigError) as error:
        run_job(sd_inpaint, image, mask, conditioners=[])
    assert "add the 'inpaint_model' conditioner" in one_line(error)
    with pytest.raises(ConfigError) as error:
        two = [create("conditioner", "inpaint_model", image=image, mask=mask) for _ in range(2)]
        run_job(sd_inpaint, image, mask, conditioners=two)
    assert "one 'inpaint_model'" in one_line(error)
    with pytest.raises(ConfigError) as error:
        create("conditioner", "inpaint_model", image="no/such/image.png", mask=mask)
    assert "no such image file" in one_line(error)
    with pytest.raises(ConfigError) as error:
        tiny_model("tiny").inpaint_condition(image, mask)
    assert "9" in one_line(error)

"""The built-in ``tiny`` model: Stable Diffusion's architectures at toy size, random weights.

Built in code from fixed seeds (as diffusers' own tests build their components), fully
offline: the tokenizer is the real SD 1.5 CLIP tokenizer shipped in ``jointdiff/models/assets``.
Its images are noise. It exists for smoke runs, tests and CPU benchmarks of the machinery.

The VAE has four blocks, so its scale factor is 8 like SD's, and the UNet's native sample
size is 64 latent cells: window geometry is the same as with real SD 1.x/2.x models.
"""

from __future__ import annotations

from importlib import resources

TOKENIZER_DIR = "assets/clip-tokenizer"


def _seeded(seed: int, build):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_unet(seed: int = 0, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=64,
            in_channels=in_channels,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
    )


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=512,
        ),
    )


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return _seeded(seed, lambda: CLIPTextModel(config)).eval()


def tokenizer():
    from transformers import CLIPTokenizer

    path = resources.files("jointdiff.models") / TOKENIZER_DIR
    with resources.as_file(path) as folder:
        return CLIPTokenizer.from_pretrained(str(folder))


def tiny_scheduler(prediction_type: str = "epsilon"):
    """DDIM with Stable Diffusion's noise schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A ``StableDiffusionPipeline`` of tiny random components (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tokenizer(),
        unet=tiny_unet(seed),
        scheduler=tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_inpaint_pipeline(seed: int = 0):
    """A ``StableDiffusionInpaintPipeline`` of tiny random components: the tiny UNet with 9
    input channels (latents 4, mask 1, masked-image latents 4), as SD inpainting checkpoints."""
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed), tokenizer=tokenizer(),
        unet=tiny_unet(seed, in_channels=9), scheduler=tiny_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def tiny_controlnet(unet, seed: int = 0, conditioning_embedding_out_channels: tuple[int, ...] = (4, 8, 8, 16)):
    """A ControlNet of random weights for ``unet`` (``ControlNetModel.from_unet``), for tests
    and benchmarks.

    ``from_unet`` copies the UNet's encoder and zero-initialises the conditioning embedding's
    last convolution and the "zero convolutions" (Zhang et al. 2023, Sec. 3.1); with zeros the
    residuals would vanish and no test could see them, so those layers are re-drawn from a
    fixed seed (normal, std 0.1). The embedding has ``len(channels) - 1`` stride-2 stages:
    four channel counts give SD's factor 8 (512×512 px → 64×64 latents).
    """
    import torch
    from diffusers import ControlNetModel

    def build():
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels)
        )
        zero_layers = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block]
        zero_layers += list(controlnet.controlnet_down_blocks)
        with torch.no_grad():
            for layer in zero_layers:
                torch.nn.init.normal_(layer.weight, std=0.1)
                torch.nn.init.normal_(layer.bias, std=0.1)
        controlnet = controlnet.to(unet.device)
        if controlnet.dtype != unet.dtype:  # diffusers warns on every dtype cast, even a no-op
            controlnet = controlnet.to(dtype=unet.dtype)
        return controlnet.eval()

    return _seeded(seed, build)

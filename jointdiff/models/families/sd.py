"""Stable Diffusion 1.x/2.x (Rombach et al. 2022): a UNet with one CLIP text encoder,
ε- or v-prediction, classifier-free guidance, a VAE with factor 8."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

from jointdiff.core.family import (
    Embeddings,
    LatentFormat,
    binary_mask,
    check_inpaint_inputs,
    first_parameter,
)
from jointdiff.models.families.vp import VPFamily
from jointdiff.models.tiny import tiny_controlnet
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch


class StableDiffusion(VPFamily):
    """SD 1.x/2.x. The native window is the UNet's ``sample_size`` (64 cells for SD 1.x and
    SD 2-base, 96 for SD 2-768)."""

    name = "sd"
    pipeline_classes = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionPanoramaPipeline",
        "StableDiffusionControlNetPipeline",
    )
    latent = LatentFormat(channels=4, scale_factor=8, patch=1, native_window=64, min_window=8, max_window=256)
    guidance = "cfg"
    default_guidance_scale = 7.5
    tiny_autoencoder = "madebyollin/taesd"
    controlnet_classes = ("ControlNetModel",)
    tiny_models = {"tiny": "jointdiff.models.tiny:build_tiny_pipeline"}
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    @property
    def latent_format(self) -> LatentFormat:
        """Channels from the UNet's output (an inpainting UNet's 9 inputs also hold the mask
        and the masked-image latents; its canvas has 4), the window from its ``sample_size``."""
        unet, vae = self.pipeline.unet, self.pipeline.vae
        native = int(unet.config.sample_size)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        return LatentFormat(
            channels=int(unet.config.out_channels or unet.config.in_channels), scale_factor=scale, patch=1, native_window=native,
            min_window=self.latent.min_window, max_window=self.latent.max_window,
        )

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None):
        """CLIP last hidden states ``(P, 77, D)`` through the pipeline's own ``encode_prompt``
        (so results equal diffusers' exactly); negatives the same way."""
        import torch

        guided = negative_prompts is not None
        warn_cut_prompts(self.pipeline.tokenizer, list(prompts) + list(negative_prompts or []), self.name)
        with torch.no_grad():
            embeds, negative = self.pipeline.encode_prompt(
                list(prompts), self.device, 1, guided, negative_prompt=list(negative_prompts) if guided else None
            )
        positive = Embeddings({"prompt_embeds": embeds})
        return positive, Embeddings({"prompt_embeds": negative}) if guided else None

    def forward(self, latents, timestep, embeds, *, guidance_scale=None, offsets=None, extra=None):
        """The UNet on ``(N, 4, h, w)``; ``extra`` goes into the UNet call (ControlNet residuals),
        but ``concat_condition`` ``(N, 5, h, w)`` (an inpainting UNet's mask and masked-image
        latents, :meth:`inpaint_condition`) joins the latents along channels, after the
        scheduler's input scaling, as StableDiffusionInpaintPipeline does."""
        unet = self.pipeline.unet
        latents, extra = self.join_inpaint_condition(latents, extra)
        output = unet(
            latents.to(self.dtype), timestep, encoder_hidden_states=embeds["prompt_embeds"],
            return_dict=False, **extra,
        )[0]
        return output.float()

    # -- inpainting ----------------------------------------------------------------------

    @property
    def is_inpainting(self) -> bool:
        """An inpainting UNet: 9 input channels (latents 4, mask 1, masked-image latents 4)."""
        return int(self.pipeline.unet.config.in_channels) == 9

    def inpaint_condition(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(S, 5, H, W)``: [the binarised mask at latent resolution (nearest, 1 channel),
        the VAE latents of ``pixels · (1 − mask)`` (4)], in the order and scaling of
        StableDiffusionInpaintPipeline's ``prepare_mask_latents``. The latents are the VAE
        posterior's mean; the pipeline samples the posterior with its generator."""
        import torch

        if not self.is_inpainting:
            raise ConfigError(
                f"model family 'sd': the UNet has {self.pipeline.unet.config.in_channels} input channels, "
                "not an inpainting model's 9; load an inpainting checkpoint"
            )
        check_inpaint_inputs(pixels, mask, self.name)
        mask = binary_mask(mask).to(pixels.device)
        latents = torch.cat([self.encode_mean(sheet[None] * (1 - sheet_mask)) for sheet, sheet_mask in zip(pixels, mask)])
        small = torch.nn.functional.interpolate(mask, size=tuple(latents.shape[-2:]))
        return torch.cat([small.to(latents), latents], dim=1)

    # -- ControlNet ----------------------------------------------------------------------

    def control_condition(self, controlnet: Any, pixels: torch.Tensor) -> torch.Tensor:
        """UNet ControlNets take the condition image in pixels, [0, 1]."""
        return pixels

    def tiny_controlnet(self, seed: int = 0) -> Any:
        return tiny_controlnet(self.pipeline.unet, seed)

    def controlnet_kwargs(self, controlnet, latents, timestep, embeds, condition, conditioning_scale, guidance_scale=None, offsets=None):
        dtype = first_parameter(controlnet).dtype
        down, mid = controlnet(
            latents.to(dtype), timestep, encoder_hidden_states=embeds["prompt_embeds"],
            controlnet_cond=condition.to(dtype), conditioning_scale=conditioning_scale,
            guess_mode=False, return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"
"""transformers' key for its once-per-tokenizer "Token indices sequence length is longer than
the specified maximum ... will result in indexing errors" log line: false here, since the
pipeline truncates before the encoder sees the ids."""


def warn_cut_prompts(tokenizer: Any, texts: Sequence[str], family: str) -> None:
    """``warnings.warn`` naming the words CLIP cuts off each text longer than its window
    (``model_max_length`` tokens, 77), as the pipeline truncates; silences transformers'
    misleading "indexing errors" line for this tokenizer."""
    if tokenizer is None:
        return
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):
        flags[LENGTH_WARNING] = True
    limit = tokenizer.model_max_length
    for text, ids in zip(texts, tokenizer(list(texts), truncation=False).input_ids):
        if text and len(ids) > limit:
            cut = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True)
            warnings.warn(
                f"model family {family!r}: prompt {text!r} is longer than CLIP's {limit} tokens; cut off: {cut!r}",
                stacklevel=3,
            )

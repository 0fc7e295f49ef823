"""Stable Diffusion XL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis"): a UNet conditioned on two CLIP text encoders and on
*micro-conditioning* time ids, ε-prediction, classifier-free guidance, a VAE with factor 8.

What the stock ``StableDiffusionXLPipeline`` does, and this family reproduces per window:

* text: the penultimate hidden states of CLIP ViT-L (``text_encoder``) and OpenCLIP ViT-bigG
  (``text_encoder_2``) concatenated along features, ``(P, 77, 768 + 1280)``; the *pooled*
  embedding ``(P, 1280)`` comes from encoder 2's projection only (Sec. 2.1 of the paper).
* negatives: with ``force_zeros_for_empty_prompt`` (the default of SDXL base) the unconditional
  branch of an *absent* negative prompt (None) is all zeros (both tensors), while ``""`` is
  encoded, as in the stock pipeline (``absent_negative_differs``: the conditioners hand None
  through for "no negative prompt").
* ``added_cond_kwargs = {"text_embeds": pooled, "time_ids": (orig_h, orig_w, crop_top,
  crop_left, target_h, target_w)}`` (Sec. 2.2); every window is an image of its own pixel
  size ``(8h, 8w)`` with crop ``(0, 0)``, as the stock pipeline conditions an image of that size.
  Refiner-style checkpoints (``requires_aesthetics_score``) use ``(orig_h, orig_w, crop_top,
  crop_left, aesthetic score)`` with the score of the row (6.0 positive, 2.5 negative).
* LCM-distilled UNets (``unet.config.time_cond_proj_dim``, Luo et al. 2023) take the guidance
  scale as an input (``timestep_cond``): guidance ``distilled``, no negative prompt.

Tensor conventions as in :mod:`jointdiff.core.family`: window latents ``(N, 4, h, w)``
float32, already multiplied by the VAE's ``scaling_factor`` (and normalised by
``latents_mean``/``latents_std`` where the VAE config has them, e.g. Playground v2.5).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

import pydantic

from jointdiff.core.family import Embeddings, GuidanceMode, LatentFormat, first_parameter
from jointdiff.models.families.vp import VPFamily
from jointdiff.models.tiny import tiny_controlnet, tokenizer
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["StableDiffusionXL", "build_tiny_pipeline", "build_tiny_lcm_pipeline", "build_tiny_refiner_pipeline"]


class StableDiffusionXL(VPFamily):
    """SDXL base (and fine-tunes, LCM-distilled UNets, refiner-style UNets). The native window is
    the UNet's ``sample_size`` (128 cells = 1024 px)."""

    name = "sdxl"
    absent_negative_differs = True  # force_zeros_for_empty_prompt: None gives zeros, "" is encoded
    pipeline_classes = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusionXLControlNetPipeline",
    )
    latent = LatentFormat(channels=4, scale_factor=8, patch=1, native_window=128, min_window=8, max_window=256)
    guidance = "cfg"
    default_guidance_scale = 5.0
    tiny_autoencoder = "madebyollin/taesdxl"
    controlnet_classes = ("ControlNetModel",)
    tiny_models = {
        "tiny-sdxl": "jointdiff.models.families.sdxl:build_tiny_pipeline",
        "tiny-sdxl-lcm": "jointdiff.models.families.sdxl:build_tiny_lcm_pipeline",
        "tiny-sdxl-refiner": "jointdiff.models.families.sdxl:build_tiny_refiner_pipeline",
    }

    class Options(VPFamily.Options):
        clip_skip: int | None = pydantic.Field(
            None, ge=0, description="CLIP layers skipped before the penultimate one (the pipeline's clip_skip)"
        )
        aesthetic_score: float = pydantic.Field(6.0, description="refiner-style checkpoints: positive rows' score")
        negative_aesthetic_score: float = pydantic.Field(2.5, description="refiner-style checkpoints: negative rows")

    def __init__(self, pipeline: Any, options: Any = None, **kwargs: Any) -> None:
        super().__init__(pipeline, options, **kwargs)
        unet, vae = pipeline.unet, pipeline.vae
        if unet.config.in_channels != vae.config.latent_channels:
            raise ConfigError(
                f"model family 'sdxl': unet.config.in_channels = {unet.config.in_channels} (an inpainting UNet?) "
                f"differs from the VAE's {vae.config.latent_channels} latent channels; use a text-to-image checkpoint"
            )
        self._time_ids: dict[tuple[Any, ...], torch.Tensor] = {}

    # -- facts ---------------------------------------------------------------------------

    @property
    def latent_format(self) -> LatentFormat:
        unet, vae = self.pipeline.unet, self.pipeline.vae
        return LatentFormat(
            channels=int(vae.config.latent_channels),
            scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
            patch=1,
            native_window=int(unet.config.sample_size),
            min_window=self.latent.min_window,
            max_window=self.latent.max_window,
        )

    @property
    def guidance_mode(self) -> GuidanceMode:
        """``distilled`` for UNets that embed the guidance scale (LCM), else ``cfg``."""
        return "distilled" if self.pipeline.unet.config.get("time_cond_proj_dim") is not None else "cfg"

    @property
    def aesthetic(self) -> bool:
        """Refiner-style micro-conditioning (an aesthetic score instead of the target size)."""
        return bool(self.pipeline.config.get("requires_aesthetics_score", False))

    # -- prompts -------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None):
        """Both CLIP encoders through the pipeline's own ``encode_prompt`` (so rows equal the stock
        pipeline's exactly): ``prompt_embeds (P, 77, D1 + D2)``, ``pooled_prompt_embeds (P, D2)``
        and, for refiner-style checkpoints, ``aesthetic_score (P, 1)``. Absent (None) negative
        prompts give zero rows under ``force_zeros_for_empty_prompt``; ``""`` is encoded (see
        the module docstring)."""
        import torch

        prompts = list(prompts)
        negatives = self._checked_negatives(prompts, negative_prompts)
        self._warn_truncated(prompts + [n for n in negatives or [] if n])
        guided = negatives is not None
        with torch.no_grad():
            embeds, neg_embeds, pooled, neg_pooled = self.pipeline.encode_prompt(
                prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                negative_prompt=[n or "" for n in negatives] if guided else None, clip_skip=self.options.clip_skip,
            )
        positive = self._rows(embeds, pooled, self.options.aesthetic_score)
        if not guided:
            return positive, None
        if self.pipeline.config.get("force_zeros_for_empty_prompt", False):
            keep = torch.tensor([n is not None for n in negatives], device=neg_embeds.device)
            neg_embeds = neg_embeds * keep[:, None, None].to(neg_embeds.dtype)
            neg_pooled = neg_pooled * keep[:, None].to(neg_pooled.dtype)
        return positive, self._rows(neg_embeds, neg_pooled, self.options.negative_aesthetic_score)

    def _rows(self, embeds: torch.Tensor, pooled: torch.Tensor, score: float) -> Embeddings:
        import torch

        rows = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.aesthetic:
            rows["aesthetic_score"] = torch.full((len(embeds), 1), score, device=pooled.device, dtype=pooled.dtype)
        return Embeddings(rows)

    def _checked_negatives(self, prompts: list[str], negative_prompts: Sequence[str] | None) -> list[str] | None:
        """The negative prompts to encode, or None (none given, or guidance without a branch)."""
        if negative_prompts is None:
            return None
        negatives = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
        if len(negatives) != len(prompts):
            raise ConfigError(
                f"model family 'sdxl': negative_prompts = {negatives!r} has {len(negatives)} entries "
                f"for {len(prompts)} prompts"
            )
        if self.guidance_mode != "cfg":
            if any(negatives):
                raise ConfigError(
                    f"model family 'sdxl': negative_prompts = {negatives!r} cannot be used with this "
                    f"{self.guidance_mode}-guidance checkpoint (the UNet embeds the guidance scale); remove them"
                )
            return None
        return negatives

    def _warn_truncated(self, texts: list[str]) -> None:
        """``warnings.warn`` naming the words CLIP cuts off (its window is 77 tokens)."""
        tokenizer = self.pipeline.tokenizer if self.pipeline.tokenizer is not None else self.pipeline.tokenizer_2
        limit = tokenizer.model_max_length
        for text, ids in zip(texts, tokenizer(texts).input_ids):
            if len(ids) > limit:
                cut = tokenizer.decode(ids[limit - 1 : -1])
                warnings.warn(
                    f"model family 'sdxl': prompt {text!r} is longer than CLIP's {limit} tokens; cut off: {cut!r}",
                    stacklevel=3,
                )

    # -- the model call ------------------------------------------------------------------

    def window_time_ids(self, size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Micro-conditioning ``(1, 6)`` of a window of ``size`` latent cells, an image of
        ``(f·h, f·w)`` px: ``(orig_h, orig_w, 0, 0, target_h, target_w)``; refiner-style
        checkpoints ``(1, 4)``, the row's aesthetic score is appended in :meth:`added_cond`.
        Cached per size, device and dtype."""
        import torch

        key = (tuple(size), torch.device(device), dtype)
        cached = self._time_ids.get(key)
        if cached is None:
            factor = self.latent_format.scale_factor
            pixels = [size[0] * factor, size[1] * factor]
            values = pixels + [0, 0] + ([] if self.aesthetic else pixels)
            cached = self._time_ids[key] = torch.tensor([values], dtype=dtype).to(device)
        return cached

    def added_cond(self, embeds: Embeddings, size: tuple[int, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``added_cond_kwargs`` of the UNet (and ControlNet) for ``N`` windows of ``size``."""
        import torch

        pooled = embeds["pooled_prompt_embeds"].to(dtype)
        time_ids = self.window_time_ids(size, pooled.device, dtype).expand(len(pooled), -1)
        if "aesthetic_score" in embeds:
            time_ids = torch.cat([time_ids, embeds["aesthetic_score"].to(dtype)], dim=1)
        return {"text_embeds": pooled, "time_ids": time_ids}

    def forward(self, latents, timestep, embeds, *, guidance_scale=None, offsets=None, extra=None):
        """The UNet on ``(N, 4, h, w)`` with the windows' micro-conditioning (a UNet has no
        positional ids: ``offsets`` are not used); ``extra`` goes into the UNet call
        (ControlNet residuals). Returns ε (or v) ``(N, 4, h, w)`` float32."""
        unet = self.pipeline.unet
        dtype = self.dtype
        timestep_cond = None
        if self.guidance_mode == "distilled":
            if guidance_scale is None:
                raise ValueError("model family 'sdxl': this LCM-distilled UNet needs guidance_scale (N,), got None")
            timestep_cond = guidance_embedding(guidance_scale.to(latents.device), unet.config.time_cond_proj_dim)
            timestep_cond = timestep_cond.to(dtype)
        output = unet(
            latents.to(dtype),
            timestep,
            encoder_hidden_states=embeds["prompt_embeds"].to(dtype),
            timestep_cond=timestep_cond,
            added_cond_kwargs=self.added_cond(embeds, latents.shape[-2:], dtype),
            return_dict=False,
            **dict(extra or {}),
        )[0]
        return output.float()

    # -- VAE -----------------------------------------------------------------------------

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``latents_mean``, ``latents_std`` ``(1, C, 1, 1)`` of the VAE config, or None."""
        import torch

        config = self.pipeline.vae.config
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is None or std is None:
            return None
        mean, std = (torch.tensor(v, device=like.device, dtype=like.dtype).view(1, -1, 1, 1) for v in (mean, std))
        return mean, std

    def to_vae_latents(self, latents):
        """``x / scaling_factor``, or ``x · std / scaling_factor + mean`` with latent stats (the
        stock pipeline before ``vae.decode``)."""
        scale = self.pipeline.vae.config.scaling_factor
        stats = self._latent_stats(latents)
        if stats is None:
            return latents / scale
        return latents * stats[1] / scale + stats[0]

    def from_vae_latents(self, latents):
        scale = self.pipeline.vae.config.scaling_factor
        stats = self._latent_stats(latents)
        if stats is None:
            return latents * scale
        return (latents - stats[0]) * scale / stats[1]

    def _upcast_vae(self) -> None:
        """SDXL's VAE overflows in float16 (``force_upcast``): like the stock pipeline, decode and
        encode in float32 (the VAE stays float32 afterwards: one cast, not one per call)."""
        import torch

        vae = self.pipeline.vae
        if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(dtype=torch.float32)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._upcast_vae()
        return super().decode(latents)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._upcast_vae()
        return super().encode(pixels, generator)

    # -- ControlNet ----------------------------------------------------------------------

    def control_condition(self, controlnet: Any, pixels: torch.Tensor) -> torch.Tensor:
        """UNet ControlNets take the condition image in pixels, [0, 1] (the SDXL ControlNet
        pipeline's ``control_image_processor`` does not normalise)."""
        return pixels

    def tiny_controlnet(self, seed: int = 0) -> Any:
        """A random-weight ControlNet copied from this UNet (``jointdiff.models.tiny.tiny_controlnet``)."""
        return tiny_controlnet(self.pipeline.unet, seed)

    def controlnet_kwargs(self, controlnet, latents, timestep, embeds, condition, conditioning_scale, guidance_scale=None, offsets=None):
        """The ControlNet with the same text and micro-conditioning as the UNet
        (``StableDiffusionXLControlNetPipeline``, no guess mode) → its residuals."""
        dtype = first_parameter(controlnet).dtype
        down, mid = controlnet(
            latents.to(dtype),
            timestep,
            encoder_hidden_states=embeds["prompt_embeds"].to(dtype),
            controlnet_cond=condition.to(dtype),
            conditioning_scale=conditioning_scale,
            guess_mode=False,
            added_cond_kwargs=self.added_cond(embeds, latents.shape[-2:], dtype),
            return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def guidance_embedding(guidance_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance-scale embedding ``(N, dim)`` float32 of ``w − 1`` (the stock pipelines pass
    ``guidance_scale − 1``): sinusoidal features of ``1000 (w − 1)`` at frequencies
    ``10000^(−k / (dim/2 − 1))``, sines then cosines, zero-padded to an odd ``dim`` (VDM,
    Kingma et al. 2021). Computed on ``guidance_scale``'s device, without host syncs."""
    import torch

    w = (guidance_scale.float() - 1.0) * 1000.0
    half = dim // 2
    step = torch.log(torch.tensor(10000.0, device=w.device)) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=w.device, dtype=torch.float32) * -step)
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


# -- tiny pipelines ------------------------------------------------------------------------

TINY_TEXT_DIMS = (32, 32)
"""Hidden sizes of the tiny CLIP-L and CLIP-G stand-ins (real: 768 and 1280)."""
TINY_TIME_EMBED = 8
"""Tiny ``addition_time_embed_dim`` (real: 256)."""


def _seeded(seed: int, build):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_unet(seed: int = 0, time_cond_proj_dim: int | None = None, refiner: bool = False):
    """SDXL's UNet layout at toy size: ``text_time`` added embedding, linear-projection
    transformers, real ``sample_size`` 128; the projection input is ``6·8 + 32`` (refiner:
    ``5·8 + 32`` and only CLIP-G's features for cross-attention)."""
    from diffusers import UNet2DConditionModel

    pooled = TINY_TEXT_DIMS[1]
    cross = pooled if refiner else sum(TINY_TEXT_DIMS)
    ids = 5 if refiner else 6
    return _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            cross_attention_dim=cross, addition_embed_type="text_time", addition_time_embed_dim=TINY_TIME_EMBED,
            projection_class_embeddings_input_dim=ids * TINY_TIME_EMBED + pooled,
            time_cond_proj_dim=time_cond_proj_dim,
        ),
    )


def tiny_vae(seed: int = 0):
    """Four blocks (factor 8, as SDXL's) of few channels; SDXL's ``scaling_factor`` 0.13025."""
    from diffusers import AutoencoderKL

    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), sample_size=1024, scaling_factor=0.13025, force_upcast=True,
        ),
    )


def tiny_text_encoders(seed: int = 0):
    """``(CLIPTextModel, CLIPTextModelWithProjection)`` of 2 layers over the real CLIP vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(hidden: int) -> Any:
        return CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, projection_dim=hidden,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu",
        )

    first = _seeded(seed, lambda: CLIPTextModel(config(TINY_TEXT_DIMS[0])).eval())
    second = _seeded(seed + 1, lambda: CLIPTextModelWithProjection(config(TINY_TEXT_DIMS[1])).eval())
    return first, second


def tiny_scheduler(lcm: bool = False):
    """SDXL's Euler scheduler (scaled-linear β from 0.00085 to 0.012, leading spacing); LCM's
    scheduler over the same β for the LCM variant."""
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if lcm:
        return LCMScheduler(**common, timestep_spacing="leading")
    return EulerDiscreteScheduler(**common, timestep_spacing="leading", interpolation_type="linear")


def _clip_g_tokenizer():
    """OpenCLIP ViT-bigG's tokenizer: CLIP's BPE, padding with ``"!"`` (id 0) instead of EOS."""
    clip_g = tokenizer()
    clip_g.pad_token = "!"
    return clip_g


def build_tiny_pipeline(seed: int = 0, time_cond_proj_dim: int | None = None, scheduler: Any = None):
    """A ``StableDiffusionXLPipeline`` of tiny random components, offline (the CLIP BPE
    tokenizer from ``jointdiff/models/assets``; CLIP-G's tokenizer pads with ``"!"``). ``time_cond_proj_dim``
    makes an LCM-style UNet that embeds the guidance scale."""
    from diffusers import StableDiffusionXLPipeline

    first, second = tiny_text_encoders(seed)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=first,
        text_encoder_2=second,
        tokenizer=tokenizer(),
        tokenizer_2=_clip_g_tokenizer(),
        unet=tiny_unet(seed, time_cond_proj_dim),
        scheduler=scheduler if scheduler is not None else tiny_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_lcm_pipeline(seed: int = 0):
    """The ``tiny-sdxl-lcm`` variant: a UNet with ``time_cond_proj_dim`` and LCM's scheduler."""
    return build_tiny_pipeline(seed, time_cond_proj_dim=8, scheduler=tiny_scheduler(lcm=True))


def build_tiny_refiner_pipeline(seed: int = 0):
    """The ``tiny-sdxl-refiner`` variant: a ``StableDiffusionXLImg2ImgPipeline`` with CLIP-G only,
    aesthetic-score micro-conditioning and no zeroed negatives (the SDXL refiner's config)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(seed),
        text_encoder=None,
        text_encoder_2=tiny_text_encoders(seed)[1],
        tokenizer=None,
        tokenizer_2=_clip_g_tokenizer(),
        unet=tiny_unet(seed, refiner=True),
        scheduler=tiny_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )

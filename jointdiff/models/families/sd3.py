"""Stable Diffusion 3 / 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers"): an
MMDiT over 2×2 patches of a 16-channel latent, three text encoders, classifier-free guidance.

What the stock ``StableDiffusion3Pipeline`` (diffusers) does and this family reproduces:

* prompts: CLIP-L and CLIP-G (penultimate hidden states, concatenated on features, zero-padded
  to T5's width) followed by T5 tokens along the sequence → ``prompt_embeds (P, 77 + L, D)``;
  the two CLIP projections concatenated → ``pooled_prompt_embeds (P, 768 + 1280)``. Without a
  T5 encoder its part is zeros. ``clip_skip`` applies to the prompts only, not the negatives.
* the transformer takes *unpacked* latents ``(B, 16, h, w)``, patchifies them itself and adds a
  learned positional embedding centre-cropped to the window (``pos_embed_max_size``); the
  timestep is the scheduler's (``1000 σ``) as it is.
* schedule: ``FlowMatchEulerDiscreteScheduler`` with its static ``shift`` (3.0); the pipeline
  passes no sigmas, and ``mu`` only when the scheduler config asks for dynamic shifting.
* VAE: ``latents / scaling_factor + shift_factor`` before decoding.
* ControlNet (``StableDiffusion3ControlNetPipeline``): the condition image is VAE-encoded; the
  ControlNet returns one residual per block for ``block_controlnet_hidden_states``.
"""

from __future__ import annotations

import string
import warnings
from importlib import resources
from typing import TYPE_CHECKING, Any, Sequence

import pydantic

from jointdiff.core.family import Embeddings, LatentFormat
from jointdiff.models.families.flow import FlowMatchFamily, linear_shift_mu
from jointdiff.models.tiny import TOKENIZER_DIR, _seeded
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch


class SD3Family(FlowMatchFamily):
    """Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo) bound to one pipeline."""

    name = "sd3"
    pipeline_classes = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
        "StableDiffusion3ControlNetPipeline",
        "StableDiffusion3PAGPipeline",
    )
    latent = LatentFormat(channels=16, scale_factor=8, patch=2, native_window=128, min_window=8, max_window=384)
    guidance = "cfg"
    default_guidance_scale = 7.0
    tiny_autoencoder = "madebyollin/taesd3"
    cuda_dtype = "bfloat16"
    controlnet_classes = ("SD3ControlNetModel",)
    supports_offsets = False
    """SD3 has no positional ids: its transformer adds a learned absolute embedding centre-cropped
    to each window (``PatchEmbed.cropped_pos_embed``), so ``positions = "canvas"`` is refused."""
    tiny_models = {
        "tiny-sd3": "jointdiff.models.families.sd3:build_tiny_pipeline",
        "tiny-sd3.5": "jointdiff.models.families.sd3:build_tiny_sd35_pipeline",
    }

    class Options(FlowMatchFamily.Options):
        max_sequence_length: int = pydantic.Field(
            256, ge=1, le=512, description="T5 tokens per prompt (the pipeline's max_sequence_length, at most 512)"
        )
        clip_skip: int | None = pydantic.Field(
            None, ge=0, description="CLIP layers skipped before the penultimate one, for the prompts (not the negatives)"
        )

    def __init__(self, pipeline: Any, options: Any = None, **kwargs: Any) -> None:
        checked = self.validate_options(options, **kwargs)
        if checked.positions == "canvas":
            raise ConfigError(
                "model family 'sd3': positions = 'canvas' is not supported: SD3's transformer adds a learned "
                "positional embedding centre-cropped to each window, not ids that can be offset; use positions = 'window'"
            )
        super().__init__(pipeline, checked)

    # -- facts ---------------------------------------------------------------------------

    @property
    def latent_format(self) -> LatentFormat:
        """Read from the checkpoint: channels, patch, native window (``sample_size``) and the
        largest window the positional embedding covers (``pos_embed_max_size`` patches)."""
        config = self.pipeline.transformer.config
        patch = int(config.patch_size)
        max_patches = config.get("pos_embed_max_size") or self.latent.max_window // patch
        return LatentFormat(
            channels=int(config.in_channels),
            scale_factor=int(self.pipeline.vae_scale_factor),
            patch=patch,
            native_window=int(config.sample_size),
            min_window=max(self.latent.min_window, patch),
            max_window=int(max_patches) * patch,
        )

    # -- prompts -------------------------------------------------------------------------

    def _warn_truncated(self, texts: Sequence[str]) -> None:
        """``warnings.warn`` naming the words each tokenizer cuts off (CLIP keeps 77 tokens,
        T5 ``max_sequence_length``); the stock pipeline cuts them the same way."""
        pipe = self.pipeline
        limits = [(pipe.tokenizer, pipe.tokenizer_max_length, "CLIP")]
        if pipe.text_encoder_3 is not None:
            limits.append((pipe.tokenizer_3, self.options.max_sequence_length, "T5 (max_sequence_length)"))
        for tokenizer, limit, what in limits:
            for text, ids in zip(texts, tokenizer(list(texts)).input_ids):
                if len(ids) > limit:
                    cut = tokenizer.decode(ids[limit - 1 : -1])
                    warnings.warn(
                        f"model family 'sd3': prompt {text!r} is longer than {what}'s {limit} tokens; cut off: {cut!r}",
                        stacklevel=3,
                    )

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None):
        """All three encoders through the pipeline's own ``encode_prompt`` (rows equal the stock
        pipeline's exactly): ``prompt_embeds (P, 77 + max_sequence_length, joint_attention_dim)``
        and ``pooled_prompt_embeds (P, pooled_projection_dim)``. ``clip_skip`` applies to the
        prompts only (the stock pipeline encodes negatives without it); "" is encoded as is."""
        import torch

        prompts = list(prompts)
        negatives = None if negative_prompts is None else list(negative_prompts)
        if negatives is not None and len(negatives) != len(prompts):
            raise ConfigError(
                f"model family 'sd3': negative_prompts = {negatives!r} has {len(negatives)} entries for {len(prompts)} prompts"
            )
        self._warn_truncated(prompts + (negatives or []))
        with torch.no_grad():
            embeds, neg_embeds, pooled, neg_pooled = self.pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=negatives is not None, negative_prompt=negatives,
                clip_skip=self.options.clip_skip, max_sequence_length=self.options.max_sequence_length,
            )  # fmt: skip
        positive = Embeddings({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})
        if negatives is None:
            return positive, None
        return positive, Embeddings({"prompt_embeds": neg_embeds, "pooled_prompt_embeds": neg_pooled})

    # -- the model call ------------------------------------------------------------------

    def _check_call(self, latents: torch.Tensor, embeds: Embeddings, guidance_scale, offsets) -> None:
        """Shape checks on Python ints only (no device sync)."""
        if offsets is not None:
            raise ConfigError("model family 'sd3': offsets (positions = 'canvas') are not supported, see supports_offsets")
        if guidance_scale is not None:
            raise ValueError("model family 'sd3': guidance_scale is a model input of distilled families; SD3 uses cfg")
        patch = self.latent_format.patch
        if latents.shape[-2] % patch or latents.shape[-1] % patch:
            raise ConfigError(
                f"model family 'sd3': window {tuple(latents.shape[-2:])} latent cells is not whole {patch}×{patch} patches"
            )
        if len(embeds) != latents.shape[0]:
            raise ValueError(f"model family 'sd3': {len(embeds)} embedding rows for {latents.shape[0]} windows")

    def forward(self, latents, timestep, embeds, *, guidance_scale=None, offsets=None, extra=None):
        """The MMDiT on ``N`` windows ``(N, 16, h, w)``; returns the velocity ``(N, 16, h, w)``
        float32. ``extra`` holds ControlNet residuals (``block_controlnet_hidden_states``)."""
        self._check_call(latents, embeds, guidance_scale, offsets)
        transformer = self.pipeline.transformer
        device, dtype = self.device, self.dtype
        rows = embeds.to(device=device, dtype=dtype)
        out = transformer(
            hidden_states=latents.to(device=device, dtype=dtype),
            timestep=timestep.to(device).expand(latents.shape[0]),
            encoder_hidden_states=rows["prompt_embeds"],
            pooled_projections=rows["pooled_prompt_embeds"],
            return_dict=False,
            **dict(extra or {}),
        )[0]
        return out.float()

    # -- schedule ------------------------------------------------------------------------

    def default_sigmas(self, num_steps):
        """None: the stock pipeline lets the scheduler space its own (shifted) sigmas."""
        return None

    def timestep_mu(self, seq_len, num_steps, scheduler):
        """The stock pipeline's ``calculate_shift`` (its fallback ``max_shift`` is 1.16)."""
        return linear_shift_mu(seq_len, {"max_shift": 1.16, **dict(scheduler.config)})

    # -- VAE -----------------------------------------------------------------------------

    def to_vae_latents(self, latents):
        """``latents / scaling_factor + shift_factor``."""
        config = self.pipeline.vae.config
        return latents / config.scaling_factor + (config.get("shift_factor") or 0.0)

    def from_vae_latents(self, latents):
        """``(latents − shift_factor) · scaling_factor``."""
        config = self.pipeline.vae.config
        return (latents - (config.get("shift_factor") or 0.0)) * config.scaling_factor

    # -- ControlNet ----------------------------------------------------------------------

    def control_condition(self, controlnet, pixels):
        """The condition image ``(1, 3, H, W)`` in [0, 1] → VAE latents ``(1, 16, H/8, W/8)``:
        a posterior sample, scaled, as ``StableDiffusion3ControlNetPipeline`` prepares it
        (InstantX ControlNets, those with ``force_zeros_for_pooled_projection``, skip the shift
        factor). The stock pipeline draws from the global RNG; here a fixed seed keeps jobs
        reproducible."""
        import torch

        vae = self.pipeline.vae
        shift = 0.0 if controlnet.config.force_zeros_for_pooled_projection else vae.config.shift_factor
        with torch.no_grad():
            posterior = vae.encode((pixels * 2 - 1).to(vae.device, vae.dtype)).latent_dist
            sample = posterior.sample(generator=torch.Generator(vae.device).manual_seed(0))
        return ((sample - shift) * vae.config.scaling_factor).float()

    def tiny_controlnet(self, seed: int = 0) -> Any:
        """A random-weight ``SD3ControlNetModel`` fitting this transformer (:func:`build_tiny_controlnet`)."""
        return build_tiny_controlnet(self.pipeline, seed)

    def controlnet_kwargs(self, controlnet, latents, timestep, embeds, condition, conditioning_scale, guidance_scale=None, offsets=None):
        """Run an ``SD3ControlNetModel`` on ``N`` windows; returns
        ``{"block_controlnet_hidden_states": [N × tokens × dim per block]}``. Pooled inputs are
        zeros for InstantX ControlNets; SD3.5's (no context embedder) get no text tokens and
        borrow the transformer's patch embedding, as the stock pipeline arranges."""
        import torch

        transformer = self.pipeline.transformer
        config = controlnet.config
        if not config.get("use_pos_embed", True) and controlnet.pos_embed is None:
            controlnet.pos_embed = controlnet._get_pos_embed_from_transformer(transformer).to(controlnet.device, controlnet.dtype)
        rows = embeds.to(device=controlnet.device, dtype=controlnet.dtype)
        pooled = rows["pooled_prompt_embeds"]
        samples = controlnet(
            hidden_states=latents.to(controlnet.device, controlnet.dtype),
            timestep=timestep.to(controlnet.device).expand(latents.shape[0]),
            encoder_hidden_states=rows["prompt_embeds"] if config.joint_attention_dim is not None else None,
            pooled_projections=torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled,
            controlnet_cond=condition.to(controlnet.device, controlnet.dtype),
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )[0]
        return {"block_controlnet_hidden_states": list(samples)}


# -- the tiny models ---------------------------------------------------------------------

T5_WORDS = "a an the of and in on with photo painting city cat dog house tree sky sea mountain street night"


def tiny_t5_tokenizer():
    """A T5 tokenizer built in code (the ``tokenizers`` library): a Unigram model over
    single characters, word-initial characters (``▁x``) and a few whole words, with T5's
    special ids (pad 0, ``</s>`` 1, unk 2), Metaspace pre-tokenisation and ``</s>`` appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        vocab += [(char, -6.0), ("▁" + char, -5.0)]
    vocab += [("▁" + word, -2.0) for word in T5_WORDS.split()]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=512)


def tiny_clip_tokenizer(pad_token: str | None = None):
    """The real CLIP BPE tokenizer (SD 1.5's; CLIP-G's pads with ``"!"``)."""
    from transformers import CLIPTokenizer

    extra = {"pad_token": pad_token} if pad_token else {}
    with resources.as_file(resources.files("jointdiff.models") / TOKENIZER_DIR) as folder:
        return CLIPTokenizer.from_pretrained(str(folder), **extra)


def tiny_clip(seed: int, hidden: int, heads: int):
    """A 2-layer ``CLIPTextModelWithProjection`` (the real 49408-token vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, projection_dim=hidden, intermediate_size=37,
        num_attention_heads=heads, num_hidden_layers=2, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    return _seeded(seed, lambda: CLIPTextModelWithProjection(config)).eval()


def tiny_t5(seed: int, vocab_size: int, width: int):
    """A 2-layer T5 v1.1 encoder (gated GELU) of model width ``width``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )  # fmt: skip
    return _seeded(seed, lambda: T5EncoderModel(config)).eval()


def tiny_sd3_vae(seed: int):
    """SD3's VAE layout at toy size: 16 latent channels, factor 8, no quant convs."""
    from diffusers import AutoencoderKL

    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, sample_size=1024,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
        ),  # fmt: skip
    )


TINY_WIDTHS = {"clip_l": 16, "clip_g": 32, "t5": 64, "heads": 2, "head_dim": 8}


def tiny_transformer(seed: int, sd35: bool = False):
    """An ``SD3Transformer2DModel`` keeping SD3's facts (``sample_size`` 128, patch 2, 16
    channels, ``pos_embed_max_size`` 192) at toy width; SD3.5 adds dual attention and RMS
    q/k norms."""
    from diffusers import SD3Transformer2DModel

    widths = TINY_WIDTHS
    inner = widths["heads"] * widths["head_dim"]
    return _seeded(
        seed,
        lambda: SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=3 if sd35 else 2,
            attention_head_dim=widths["head_dim"], num_attention_heads=widths["heads"],
            joint_attention_dim=widths["t5"], caption_projection_dim=inner,
            pooled_projection_dim=widths["clip_l"] + widths["clip_g"], pos_embed_max_size=192,
            dual_attention_layers=(0,) if sd35 else (), qk_norm="rms_norm" if sd35 else None,
        ),  # fmt: skip
    ).eval()


def build_tiny_pipeline(seed: int = 0, sd35: bool = False):
    """A stock ``StableDiffusion3Pipeline`` of tiny random components (fixed seeds, offline):
    CLIP-L (width 16), CLIP-G (width 32), T5 (width 64), a 2-layer MMDiT, a 4-block VAE and
    the flow-matching scheduler with SD3's ``shift`` 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    t5_tokenizer = tiny_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=tiny_transformer(seed, sd35),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_sd3_vae(seed + 1),
        text_encoder=tiny_clip(seed + 2, TINY_WIDTHS["clip_l"], 2),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip(seed + 3, TINY_WIDTHS["clip_g"], 4),
        tokenizer_2=tiny_clip_tokenizer(pad_token="!"),
        text_encoder_3=tiny_t5(seed + 4, len(t5_tokenizer), TINY_WIDTHS["t5"]),
        tokenizer_3=t5_tokenizer,
    )


def build_tiny_sd35_pipeline(seed: int = 0):
    """The tiny pipeline with SD3.5's transformer (dual attention, RMS q/k norms)."""
    return build_tiny_pipeline(seed, sd35=True)


def build_tiny_controlnet(pipeline: Any, seed: int = 0, num_layers: int = 2):
    """An ``SD3ControlNetModel`` matching ``pipeline``'s transformer, random weights. Its
    zero-initialised layers (input patch embedding, per-block output projections) are
    re-drawn (normal, std 0.1) so that tests can see the residuals."""
    import torch
    from diffusers import SD3ControlNetModel

    def build():
        config = {k: v for k, v in pipeline.transformer.config.items() if not k.startswith("_")}
        controlnet = SD3ControlNetModel(**{**config, "num_layers": num_layers})
        zero_layers = [controlnet.pos_embed_input.proj, *controlnet.controlnet_blocks]
        with torch.no_grad():
            for layer in zero_layers:
                torch.nn.init.normal_(layer.weight, std=0.1)
                torch.nn.init.normal_(layer.bias, std=0.1)
        controlnet = controlnet.to(pipeline.transformer.device)
        if controlnet.dtype != pipeline.transformer.dtype:  # diffusers warns on every dtype cast, even a no-op
            controlnet = controlnet.to(dtype=pipeline.transformer.dtype)
        return controlnet.eval()

    return _seeded(seed, build)

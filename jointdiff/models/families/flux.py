"""FLUX.1 [dev] and [schnell] (Black Forest Labs 2024): a rectified-flow MMDiT on 2×2-packed
tokens of a 16-channel VAE, with CLIP-L (pooled) and T5-XXL (sequence) text encoders.

[dev] is guidance-distilled: the guidance scale is an input of the transformer
(``guidance_embeds``) and there is no unconditional branch. [schnell] is timestep-distilled:
no guidance at all. Both positions tokens with 3-axis RoPE ids ``(0, row, column)`` of the
2×2 patch grid (text ids are zeros), and sample with ``FlowMatchEulerDiscreteScheduler``
(dev: resolution-dependent shift ``mu`` from the image token count, Esser et al. 2024, Sec. 5.3.2).

Tensor conventions: window latents ``(N, 16, h, w)`` unpacked, in the scaled and shifted
space of diffusers' ``FluxPipeline`` denoising loop (``(z − shift) · scale`` of the VAE's
``z``); ``h`` and ``w`` are even; tokens are ``(N, (h/2)(w/2), 64)``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence
from weakref import WeakKeyDictionary

import pydantic

from jointdiff.core.family import (
    Embeddings,
    GuidanceMode,
    LatentFormat,
    binary_mask,
    check_inpaint_inputs,
    first_parameter,
)
from jointdiff.models import tiny
from jointdiff.models.families.flow import FlowMatchFamily, pack_patches, unpack_patches
from jointdiff.models.tiny import _seeded
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch

PATCH = 2


class Flux(FlowMatchFamily):
    """FLUX.1 [dev] / [schnell]. The guidance mode is read from the checkpoint: ``distilled``
    when the transformer has ``guidance_embeds`` (dev), ``none`` otherwise (schnell)."""

    name = "flux"
    pipeline_classes = (
        "FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxFillPipeline", "FluxControlPipeline",
    )
    latent = LatentFormat(channels=16, scale_factor=8, patch=PATCH, native_window=128, min_window=8, max_window=512)
    guidance = "distilled"
    guidance_modes = frozenset({"distilled", "none"})
    default_guidance_scale = 3.5
    tiny_autoencoder = "madebyollin/taef1"
    cuda_dtype = "bfloat16"
    controlnet_classes = ("FluxControlNetModel",)
    tiny_models = {
        "tiny-flux": "jointdiff.models.families.flux:build_tiny_pipeline",
        "tiny-flux-schnell": "jointdiff.models.families.flux:build_tiny_schnell_pipeline",
    }

    class Options(FlowMatchFamily.Options):
        max_sequence_length: int | None = pydantic.Field(default=None, ge=1, le=512)
        """T5 tokens per prompt (longer prompts are cut). None: 512 for dev, 256 for schnell,
        the lengths each was trained with."""

    def __init__(self, pipeline: Any, options: Any = None, **kwargs: Any) -> None:
        super().__init__(pipeline, options, **kwargs)
        self._ids: dict[tuple, torch.Tensor] = {}
        self._attention: WeakKeyDictionary = WeakKeyDictionary()

    # -- facts ---------------------------------------------------------------------------

    @property
    def latent_format(self) -> LatentFormat:
        """Channels from the transformer's output (FluxFill's input also holds the condition),
        VAE factor from its depth; the native window is the pipeline's ``default_sample_size``."""
        config, vae = self.pipeline.transformer.config, self.pipeline.vae
        features = config.out_channels or config.in_channels
        native = int(getattr(self.pipeline, "default_sample_size", self.latent.native_window))
        return LatentFormat(
            channels=features // PATCH**2, scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
            patch=PATCH, native_window=native, min_window=self.latent.min_window, max_window=self.latent.max_window,
        )

    @property
    def guidance_mode(self) -> GuidanceMode:
        """``distilled`` with the transformer's ``guidance_embeds`` (dev), else ``none`` (schnell)."""
        return "distilled" if self.pipeline.transformer.config.guidance_embeds else "none"

    @property
    def max_sequence_length(self) -> int:
        """The T5 length: the option, else 512 (dev) / 256 (schnell)."""
        if self.options.max_sequence_length is not None:
            return self.options.max_sequence_length
        return 512 if self.guidance_mode == "distilled" else 256

    # -- prompts -------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None):
        """CLIP-L pooled ``pooled_prompt_embeds`` ``(P, 768)`` and T5 ``prompt_embeds``
        ``(P, max_sequence_length, 4096)`` through the pipeline's own ``encode_prompt`` (so
        they equal diffusers' exactly). FLUX.1 has no unconditional branch: a non-empty
        negative prompt is a ConfigError."""
        import torch

        if negative_prompts is not None and any(negative_prompts):
            raise ConfigError(
                f"model family 'flux': negative_prompts = {list(negative_prompts)!r} cannot be used: FLUX.1 is "
                f"guidance-distilled ({self.guidance_mode} guidance, no unconditional branch); remove them"
            )
        prompts = list(prompts)
        pipe, length = self.pipeline, self.max_sequence_length
        _warn_cut(prompts, pipe.tokenizer, pipe.tokenizer_max_length, "CLIP")
        _warn_cut(prompts, pipe.tokenizer_2, length, "T5 (max_sequence_length)")
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1, max_sequence_length=length
            )
        return Embeddings({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}), None

    # -- the model call ------------------------------------------------------------------

    def forward(self, latents, timestep, embeds, *, guidance_scale=None, offsets=None, extra=None):
        """The transformer on ``N`` windows ``(N, 16, h, w)``: packed to tokens, with the
        window's image ids (shifted by ``offsets`` / 2 when given), ``timestep / 1000`` and,
        for dev, the embedded guidance. ``extra``: ControlNet residuals (see
        :meth:`controlnet_kwargs`) and, for FluxFill, ``concat_condition`` ``(N, C', h, w)``
        (masked-image latents and mask) joined to the latents along channels before packing."""
        transformer = self.pipeline.transformer
        n, _, h, w = latents.shape
        self._check_window(h, w)
        latents, extra = self.join_inpaint_condition(latents, extra)
        inputs = self._model_inputs(transformer, latents, timestep, embeds, guidance_scale)
        with self._canvas_positions(transformer, offsets, n, (h // PATCH) * (w // PATCH)):
            tokens = transformer(**inputs, return_dict=False, **extra)[0]
        return unpack_patches(tokens.float(), (h, w), PATCH)

    def _model_inputs(self, model, latents, timestep, embeds, guidance_scale) -> dict[str, Any]:
        """The keyword arguments FluxPipeline gives its transformer (and FluxControlNetPipeline
        its ControlNet): tokens, ``t / 1000`` in the model dtype, guidance, prompt rows, ids."""
        n, _, h, w = latents.shape
        dtype, device = first_parameter(model).dtype, latents.device
        prompt = embeds["prompt_embeds"]
        return {
            "hidden_states": pack_patches(latents, PATCH).to(dtype),
            "timestep": timestep.to(device=device, dtype=dtype).expand(n) / 1000,
            "guidance": self._guidance(model, guidance_scale, n, device),
            "pooled_projections": embeds["pooled_prompt_embeds"].to(device=device, dtype=dtype),
            "encoder_hidden_states": prompt.to(device=device, dtype=dtype),
            "txt_ids": self._cached_ids("text", prompt.shape[1], 1, device, dtype),
            "img_ids": self._cached_ids("image", h // PATCH, w // PATCH, device, dtype),
        }

    def _guidance(self, model, guidance_scale, n: int, device) -> torch.Tensor | None:
        """The ``(N,)`` float32 guidance of a model with ``guidance_embeds`` (None otherwise)."""
        import torch

        if not model.config.guidance_embeds:
            return None
        if guidance_scale is None:
            return torch.full((n,), self.default_guidance_scale, device=device)
        return torch.as_tensor(guidance_scale, dtype=torch.float32).to(device).expand(n)

    def _cached_ids(self, kind: str, rows: int, columns: int, device, dtype) -> torch.Tensor:
        """Positional ids, cached: text ids are ``(L·1, 3)`` zeros; image ids ``(rows·columns, 3)``
        are ``(0, row, column)`` row-major over the patch grid, as FluxPipeline builds them."""
        import torch

        key = (kind, rows, columns, device, dtype)
        if key not in self._ids:
            ids = torch.zeros(rows * columns, 3)
            if kind == "image":
                grid = torch.cartesian_prod(torch.arange(rows), torch.arange(columns))
                ids[:, 1:] = grid.float()
            self._ids[key] = ids.to(device=device, dtype=dtype)
        return self._ids[key]

    def _check_window(self, h: int, w: int) -> None:
        if h % PATCH or w % PATCH:
            raise ConfigError(f"model family 'flux': window (h, w) = {(h, w)} latent cells is not whole 2×2 patches")

    # -- inpainting (FLUX.1 Fill) --------------------------------------------------------

    @property
    def is_inpainting(self) -> bool:
        """FLUX.1 Fill: the transformer takes ``4·(2·C + f²)`` = 384 features per token
        (latents 64, masked-image latents 64, the 8×8-per-cell mask 256)."""
        fmt = self.latent_format
        fill = PATCH**2 * (2 * fmt.channels + fmt.scale_factor**2)
        return int(self.pipeline.transformer.config.in_channels) == fill

    def inpaint_condition(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(S, C + f², H, W)`` = 16 + 64 = 80 channels: [the VAE latents of
        ``pixels · (1 − mask)`` (scaled and shifted like the canvas), the binarised mask with
        each ``f×f`` pixel block of a latent cell folded into channels ``8·dy + dx``], the
        unpacked form of FluxFillPipeline's ``prepare_mask_latents``: packing
        ``[latents, condition]`` into 2×2 tokens gives its token layout
        ``[latents 64 | masked image 64 | mask 256]``. Latents at the posterior mean (the
        pipeline samples the posterior with its generator)."""
        import torch

        if not self.is_inpainting:
            raise ConfigError(
                f"model family 'flux': the transformer takes {self.pipeline.transformer.config.in_channels} features "
                "per token, not FLUX.1 Fill's 384; load an inpainting checkpoint (FLUX.1-Fill-dev)"
            )
        check_inpaint_inputs(pixels, mask, self.name)
        mask = binary_mask(mask).to(pixels.device)
        latents = torch.cat([self.encode_mean(sheet[None] * (1 - sheet_mask)) for sheet, sheet_mask in zip(pixels, mask)])
        folded = torch.nn.functional.pixel_unshuffle(mask, self.latent_format.scale_factor)
        return torch.cat([latents, folded.to(latents)], dim=1)

    # -- channel-concatenated control (FLUX.1 Depth/Canny-dev) ------------------------------

    @property
    def takes_control_image(self) -> bool:
        """FLUX.1 Depth/Canny-dev: the transformer takes ``2 · 4C`` = 128 features per token
        (latents 64, control-image latents 64) and puts out 64."""
        fmt = self.latent_format
        return int(self.pipeline.transformer.config.in_channels) == 2 * PATCH**2 * fmt.channels

    def control_image_condition(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 16, H, W)``: the VAE latents of the control image ``pixels`` ``(B, 3, 8H, 8W)``
        in [-1, 1], scaled and shifted like the canvas, at the posterior mean; the unpacked
        form of FluxControlPipeline's control latents: packing ``[latents, condition]`` into
        2×2 tokens gives its ``cat([latents, control_image], dim=2)`` (features 64 + 64)."""
        import torch

        if not self.takes_control_image:
            raise ConfigError(
                f"model family 'flux': the transformer takes {self.pipeline.transformer.config.in_channels} features "
                "per token, not FLUX.1 Depth/Canny's 128; load a control checkpoint (FLUX.1-Depth-dev, FLUX.1-Canny-dev)"
            )
        return torch.cat([self.encode_mean(image[None]) for image in pixels])

    # -- positions on the canvas ---------------------------------------------------------

    def _attention_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The attention layers of ``model`` that apply RoPE after their q/k RMSNorms."""
        if model not in self._attention:
            self._attention[model] = [m for m in model.modules() if hasattr(m, "norm_q") and hasattr(m, "norm_k")]
        return self._attention[model]

    @contextmanager
    def _canvas_positions(self, model, offsets: torch.Tensor | None, n: int, image_tokens: int) -> Iterator[None]:
        """Image ids shifted per window by ``offsets`` ``(N, 2)`` (latent cells) / 2, batched.

        diffusers' FLUX models take one set of ids for the whole batch, so the shift is applied
        as a rotation: RoPE rotations compose, ``R(p + o) = R(p) R(o)``, so rotating each
        window's image queries and keys by its offset ``o`` right after the q/k RMSNorm (the
        stock RoPE ``R(p)`` follows) equals ids ``p + o`` exactly. Image tokens are the last
        ``image_tokens`` of every query/key sequence (text comes first)."""
        import torch

        if offsets is None:
            yield
            return
        if tuple(offsets.shape) != (n, 2):
            raise ValueError(f"offsets must have shape ({n}, 2) (top, left per window), got {tuple(offsets.shape)}")
        device = next(model.parameters()).device
        ids = torch.zeros(n, 3, device=device)
        ids[:, 1:] = offsets.to(device=device, dtype=torch.float32) / PATCH
        cos, sin = (f[:, None, None, :] for f in model.pos_embed(ids))

        def rotate(module, args, output):
            head, tail = output[:, :-image_tokens], output[:, -image_tokens:]
            return torch.cat([head, _rotate_pairs(tail, cos, sin)], dim=1)

        handles = []
        try:
            for attention in self._attention_modules(model):
                handles += [norm.register_forward_hook(rotate) for norm in (attention.norm_q, attention.norm_k)]
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- VAE -----------------------------------------------------------------------------

    def to_vae_latents(self, latents):
        """``z = x / scaling_factor + shift_factor`` (FluxPipeline before ``vae.decode``)."""
        config = self.pipeline.vae.config
        return latents / config.scaling_factor + config.shift_factor

    def from_vae_latents(self, latents):
        """``x = (z − shift_factor) · scaling_factor``."""
        config = self.pipeline.vae.config
        return (latents - config.shift_factor) * config.scaling_factor

    # -- ControlNet ----------------------------------------------------------------------

    def control_condition(self, controlnet: Any, pixels: torch.Tensor) -> torch.Tensor:
        """The condition of a ``FluxControlNetModel``: for InstantX-style nets, the VAE latents
        of the image in [-1, 1] (posterior mean), scaled and shifted like the canvas,
        ``(1, 16, H_px/8, W_px/8)`` unpacked; for XLabs-style nets (``input_hint_block``), the
        pixels in [-1, 1] (FluxControlNetPipeline's preprocessing)."""
        import torch

        if getattr(controlnet, "union", False):
            raise ConfigError("model family 'flux': union ControlNets (num_mode) need a control mode; not supported")
        image = pixels * 2 - 1
        if controlnet.input_hint_block is not None:
            return image
        vae = self.pipeline.vae
        with torch.no_grad():
            latent = vae.encode(image.to(vae.device, vae.dtype)).latent_dist.mode()
        return self.from_vae_latents(latent.float())

    def tiny_controlnet(self, seed: int = 0) -> Any:
        """A random-weight FLUX ControlNet that fits this transformer (``model = "tiny"``)."""
        guidance = bool(self.pipeline.transformer.config.guidance_embeds)
        return build_tiny_controlnet(seed, guidance_embeds=guidance)

    def controlnet_kwargs(
        self, controlnet, latents, timestep, embeds, condition, conditioning_scale, guidance_scale=None, offsets=None
    ):
        """Run ``controlnet`` as FluxControlNetPipeline does (condition latents packed per
        window) and return the transformer's residual keywords. The residuals are expanded to
        one per transformer block (XLabs nets repeat theirs, InstantX nets spread them), so
        several ControlNets add up with :meth:`sum_control`."""
        n, _, h, w = latents.shape
        inputs = self._model_inputs(controlnet, latents, timestep, embeds, guidance_scale)
        hint = controlnet.input_hint_block is not None
        cond = condition if hint else pack_patches(condition, PATCH)
        with self._canvas_positions(controlnet, offsets, n, (h // PATCH) * (w // PATCH)):
            blocks, singles = controlnet(
                **inputs, controlnet_cond=cond.to(latents.device, controlnet.dtype),
                conditioning_scale=conditioning_scale, return_dict=False,
            )
        transformer = self.pipeline.transformer
        return {
            "controlnet_block_samples": _per_block(blocks, len(transformer.transformer_blocks), repeat=hint),
            "controlnet_single_block_samples": _per_block(singles, len(transformer.single_transformer_blocks), False),
        }


def _per_block(samples: Sequence[torch.Tensor] | None, blocks: int, repeat: bool) -> list[torch.Tensor] | None:
    """ControlNet residuals as one per transformer block, with FluxTransformer2DModel's rule:
    block ``i`` takes sample ``i mod K`` (``controlnet_blocks_repeat``) or ``i // ceil(B / K)``."""
    if not samples:
        return None
    k = len(samples)
    interval = -(-blocks // k)
    return [samples[i % k] if repeat else samples[i // interval] for i in range(blocks)]


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE rotation of ``x`` ``(..., D)`` in FLUX's layout: interleaved pairs
    ``(x₂ᵢ, x₂ᵢ₊₁)`` turned by the angles whose cos/sin (repeated per pair) are given."""
    import torch

    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack((-odd, even), dim=-1).flatten(-2)
    return (x.float() * cos + turned * sin).to(x.dtype)


def _warn_cut(prompts: list[str], tokenizer: Any, limit: int, what: str) -> None:
    """``warnings.warn`` naming the words of each prompt beyond ``limit`` tokens (the
    tokenizer's special tokens included, as the pipeline truncates)."""
    for index, ids in enumerate(tokenizer(prompts, truncation=False).input_ids):
        if len(ids) > limit:
            cut = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True)
            warnings.warn(f"prompts[{index}] is longer than {what}'s {limit} tokens; cut: {cut!r}", stacklevel=3)


# -- the tiny models ---------------------------------------------------------------------


def tiny_t5_tokenizer():
    """A T5-style tokenizer built in code: a Unigram model over characters and a few words,
    Metaspace pre-tokenization, ``<pad>`` 0, ``</s>`` 1 (appended), ``<unk>`` 2."""
    import string

    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [(f"▁{word}", -2.0) for word in ("a", "the", "of", "and", "in", "with", "on")]
    backend = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(tokenizer_object=backend, vocab=pieces, extra_ids=0)


def tiny_t5_encoder(vocab_size: int, seed: int = 0):
    """A two-layer T5 v1.1 encoder (gated GELU) of width 32."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return _seeded(seed, lambda: T5EncoderModel(config)).eval()


def tiny_transformer(seed: int = 0, guidance_embeds: bool = True):
    """FLUX's transformer at toy size: 64 input features (16 channels × 2×2), one double and
    one single block, 2 heads of 16 (RoPE axes 4+4+8), text width 32."""
    from diffusers import FluxTransformer2DModel

    return _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    ))


def tiny_vae(seed: int = 0):
    """FLUX's VAE layout (16 channels, no quant convs, its scaling and shift factors) with
    four 8-channel blocks (factor 8) and no mid-block attention: cheap on CPU."""
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=1024, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=False, scaling_factor=0.3611, shift_factor=0.1159,
    ))


def tiny_scheduler(dynamic_shift: bool = True):
    """FLUX.1's scheduler configs: dev shifts with the image token count, schnell does not."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0 if dynamic_shift else 1.0, use_dynamic_shifting=dynamic_shift,
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
    )


def build_tiny_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A stock ``FluxPipeline`` of tiny random components (dev-like; ``guidance_embeds=False``
    gives schnell-like), built offline in about a second."""
    from diffusers import FluxPipeline

    tokenizer_2 = tiny_t5_tokenizer()
    return FluxPipeline(
        scheduler=tiny_scheduler(dynamic_shift=guidance_embeds), vae=tiny_vae(seed),
        text_encoder=tiny.tiny_text_encoder(seed), tokenizer=tiny.tokenizer(),
        text_encoder_2=tiny_t5_encoder(len(tokenizer_2), seed), tokenizer_2=tokenizer_2,
        transformer=tiny_transformer(seed, guidance_embeds),
    )


def build_tiny_schnell_pipeline(seed: int = 0):
    """The schnell-like tiny model: no guidance embedding, no dynamic shift."""
    return build_tiny_pipeline(seed, guidance_embeds=False)


def build_tiny_control_pipeline(seed: int = 0):
    """A stock ``FluxControlPipeline`` of tiny random components, FLUX.1 Depth/Canny-dev's
    layout: the tiny dev-like model with a transformer taking 128 features per token (latents
    and control-image latents, 2 × 16 channels × 2×2) and putting out 64."""
    from diffusers import FluxControlPipeline, FluxTransformer2DModel

    parts = build_tiny_pipeline(seed).components
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=128, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ))
    keep = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    return FluxControlPipeline(**{k: parts[k] for k in keep}, transformer=transformer)


def build_tiny_controlnet(seed: int = 0, guidance_embeds: bool = True):
    """An InstantX-style ``FluxControlNetModel`` matching the tiny transformer. Its zero-
    initialised layers (Zhang et al. 2023) are re-drawn (normal, std 0.1) so tests see them."""
    import torch
    from diffusers import FluxControlNetModel

    def build():
        net = FluxControlNetModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
        )
        zeroed = [net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks]
        with torch.no_grad():
            for layer in zeroed:
                torch.nn.init.normal_(layer.weight, std=0.1)
                torch.nn.init.normal_(layer.bias, std=0.1)
        return net.eval()

    return _seeded(seed, build)

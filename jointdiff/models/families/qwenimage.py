"""Qwen-Image (Qwen team 2025, "Qwen-Image Technical Report", arXiv:2508.02324): a 20B MMDiT
over 2×2 patches of the 16-channel latents of a Wan-2.1-style video VAE, conditioned on the
last hidden states of Qwen2.5-VL, with true classifier-free guidance.

What the stock ``QwenImagePipeline`` (diffusers) does and this family reproduces:

* prompts: each prompt is put in the pipeline's chat template (a system message asking for a
  detailed image description, the prompt as the user turn, an open assistant turn), encoded
  by Qwen2.5-VL; the first ``prompt_template_encode_start_idx`` (34) tokens, the system turn,
  are dropped. Rows have variable lengths: they are zero-padded to one length with an
  attention mask ``prompt_embeds_mask (P, L)`` (1 = token, 0 = padding) and cut to
  ``max_sequence_length``. Padding + mask gives the unpadded result (masked keys).
* guidance: *true* CFG, only with a negative prompt and ``true_cfg_scale > 1``; the combined
  velocity is rescaled per token to the norm of the conditional one (norm-preserving CFG).
* the transformer takes packed tokens ``(B, h/2 · w/2, 64)``, the timestep as ``σ`` (the
  scheduler's ``t / 1000``) and ``img_shapes = [(1, h/2, w/2)]`` per row, from which it builds
  its 3-axis RoPE itself, *centred* on the image (rows and columns ``−n/2 … n/2 − 1``); text
  positions follow the image's largest index. These ids cannot be offset per window, so
  ``positions = "canvas"`` is refused (``supports_offsets = False``).
* schedule: sigmas ``linspace(1, 1/n, n)``, dynamic shift ``mu`` linear in the window's token
  count (``base/max_image_seq_len``, ``base/max_shift`` of the scheduler config).
* VAE: ``AutoencoderKLQwenImage`` works on videos ``(B, C, T, H, W)``; an image is one frame.
  Canvas latents are normalised per channel: ``(z − latents_mean) / latents_std``.

Tensor conventions: the canvas is ``(B, 16, H_px/8, W_px/8)`` float32 (4-D, unpacked); the
VAE side of :meth:`QwenImage.to_vae_latents` is 5-D ``(B, 16, 1, H, W)``.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import TYPE_CHECKING, Any, Sequence

from pydantic import Field

from jointdiff.core.family import Embeddings, LatentFormat, first_parameter
from jointdiff.models.families.flow import FlowMatchFamily, pack_patches, unpack_patches
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""The stock pipeline's ``prompt_template_encode`` (used when a pipeline lacks the attribute)."""
TEMPLATE_DROP = 34
"""Template tokens before the prompt, dropped from the embeddings (``prompt_template_encode_start_idx``)."""


class QwenImage(FlowMatchFamily):
    """Qwen-Image (and its Img2Img / Inpaint / ControlNet pipelines) bound to one pipeline."""

    name = "qwenimage"
    pipeline_classes = (
        "QwenImagePipeline",
        "QwenImageImg2ImgPipeline",
        "QwenImageInpaintPipeline",
        "QwenImageControlNetPipeline",
    )
    latent = LatentFormat(channels=16, scale_factor=8, patch=2, native_window=128, min_window=8, max_window=512)
    guidance = "cfg"
    default_guidance_scale = 4.0
    """The stock ``true_cfg_scale`` default."""
    # madebyollin's TAEW2.1 (github.com/madebyollin/taehv) decodes this latent space, but it is a
    # TAEHV model, not a diffusers AutoencoderTiny; no "taeqwenimage" hub id exists.
    tiny_autoencoder = None
    cuda_dtype = "bfloat16"
    supports_offsets = False
    """The transformer builds its centred RoPE ids itself from ``img_shapes`` (one size for the
    whole batch, no per-row offsets), so ``positions = "canvas"`` is refused."""
    controlnet_classes = ("QwenImageControlNetModel",)
    controlnet_positive_only = True
    tiny_models = {"tiny-qwenimage": "jointdiff.models.families.qwenimage:build_tiny_pipeline"}

    class Options(FlowMatchFamily.Options):
        max_sequence_length: int = Field(512, ge=1, le=1024)
        """Prompt tokens kept after the dropped system turn (the stock default 512, at most 1024)."""

    def __init__(self, pipeline: Any, options: Any = None, **kwargs: Any) -> None:
        super().__init__(pipeline, options, **kwargs)
        self._stats: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- facts ---------------------------------------------------------------------------

    @property
    def latent_format(self) -> LatentFormat:
        """Read from the checkpoint: channels (transformer input / patch²), the VAE factor, the
        patch and the native window (the pipeline's ``default_sample_size``, in cells)."""
        config = self.pipeline.transformer.config
        patch = int(config.patch_size)
        return LatentFormat(
            channels=int(config.in_channels) // (patch * patch), scale_factor=int(self.pipeline.vae_scale_factor),
            patch=patch, native_window=int(self.pipeline.default_sample_size),
            min_window=self.latent.min_window, max_window=self.latent.max_window,
        )  # fmt: skip

    def uses_cfg(self, guidance_scale: float, negative_prompt: str | None) -> bool:
        """The stock ``do_true_cfg``: a negative prompt is given (``""`` counts) and the scale > 1."""
        return guidance_scale > 1.0 and negative_prompt is not None

    # -- prompts -------------------------------------------------------------------------

    def _template(self) -> tuple[str, int, int]:
        """The pipeline's chat template, dropped token count and tokenizer limit (prompt tokens)."""
        pipe = self.pipeline
        return (
            getattr(pipe, "prompt_template_encode", PROMPT_TEMPLATE),
            int(getattr(pipe, "prompt_template_encode_start_idx", TEMPLATE_DROP)),
            int(getattr(pipe, "tokenizer_max_length", 1024)),
        )

    def _warn_cut(self, texts: Sequence[str], offsets: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor) -> None:
        """``warnings.warn`` naming the words of each prompt beyond the kept tokens (stock cuts
        them the same way). ``offsets (T, S, 2)``: character spans in the templated text;
        ``valid (T, S)``: real tokens; ``keep (T,)``: tokens kept including the dropped ones."""
        template, _, _ = self._template()
        start = template.index("{}")
        for text, spans, real, kept in zip(texts, offsets, valid, keep.tolist()):
            kept_end = int(spans[real][kept - 1, 1])
            if kept_end < start + len(text):
                cut = (template.format(text)[max(kept_end, start) : start + len(text)]).strip()
                warnings.warn(
                    f"model family 'qwenimage': prompt {text!r} is longer than max_sequence_length = "
                    f"{self.options.max_sequence_length} tokens; cut off: {cut!r}",
                    stacklevel=4,
                )

    @staticmethod
    def _left_align(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Rows of ``hidden (T, S, D)`` with their ``valid (T, S)`` tokens moved to the front, in
        order (whatever side the tokenizer pads on)."""
        import torch

        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        return hidden.gather(1, order[..., None].expand_as(hidden))

    def _encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2.5-VL's last hidden states of the templated ``texts``, system turn dropped:
        ``(T, L, D)`` zero-padded to the longest row (at most ``max_sequence_length``) and the
        mask ``(T, L)`` (int64, 1 = token)."""
        import torch

        pipe = self.pipeline
        template, drop, limit = self._template()
        tokens = pipe.tokenizer(
            [template.format(text) for text in texts], max_length=limit + drop, padding=True, truncation=True,
            return_tensors="pt", return_offsets_mapping=True,
        )  # fmt: skip
        valid = tokens.attention_mask.bool()
        lengths = (valid.sum(1) - drop).clamp(0, self.options.max_sequence_length)
        self._warn_cut(texts, tokens.offset_mapping, valid, lengths + drop)
        encoder = pipe.text_encoder
        with torch.no_grad():
            hidden = encoder(
                input_ids=tokens.input_ids.to(encoder.device), attention_mask=tokens.attention_mask.to(encoder.device),
                output_hidden_states=True,
            ).hidden_states[-1]  # fmt: skip
        rows = self._left_align(hidden, valid.to(hidden.device))[:, drop : drop + int(lengths.max())]
        mask = torch.arange(rows.shape[1])[None] < lengths[:, None]
        mask = mask.to(device=rows.device, dtype=torch.long)
        return rows * mask[..., None].to(rows.dtype), mask

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None):
        """``prompt_embeds (P, L, D)`` + ``prompt_embeds_mask (P, L)`` for the prompts and, when
        given, the negative prompts, all encoded in one batch so both share one length ``L``
        and can be concatenated for the guided model call."""
        prompts = list(prompts)
        negatives = None if negative_prompts is None else list(negative_prompts)
        if negatives is not None and len(negatives) != len(prompts):
            raise ConfigError(
                f"model family 'qwenimage': negative_prompts = {negatives!r} has {len(negatives)} entries for {len(prompts)} prompts"
            )
        rows, mask = self._encode(prompts + (negatives or []))
        count = len(prompts)
        positive = Embeddings({"prompt_embeds": rows[:count], "prompt_embeds_mask": mask[:count]})
        if negatives is None:
            return positive, None
        return positive, Embeddings({"prompt_embeds": rows[count:], "prompt_embeds_mask": mask[count:]})

    # -- the model call ------------------------------------------------------------------

    def _inputs(self, module: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, embeds: Embeddings) -> dict[str, Any]:
        """The keyword arguments the transformer (and ControlNet) share: packed tokens, ``σ``,
        text rows with their mask and ``img_shapes`` of the window (Python ints: no sync)."""
        patch = self.latent_format.patch
        n, _, h, w = latents.shape
        parameter = first_parameter(module)
        device, dtype = parameter.device, parameter.dtype
        mask = embeds["prompt_embeds_mask"] if "prompt_embeds_mask" in embeds else None
        return {
            "hidden_states": pack_patches(latents.to(device=device, dtype=dtype), patch),
            # as stock: t cast to the latents' dtype, then divided by 1000
            "timestep": timestep.to(device=device, dtype=dtype).expand(n) / 1000,
            "encoder_hidden_states": embeds["prompt_embeds"].to(device=device, dtype=dtype),
            "encoder_hidden_states_mask": None if mask is None else mask.to(device),
            "img_shapes": [[(1, h // patch, w // patch)]] * n,
        }

    def forward(self, latents, timestep, embeds, *, guidance_scale=None, offsets=None, extra=None):
        """The MMDiT on ``N`` windows ``(N, 16, h, w)``; returns the velocity ``(N, 16, h, w)``
        float32. ``extra``: ControlNet residuals (``controlnet_block_samples``)."""
        if offsets is not None:
            raise ConfigError("model family 'qwenimage': offsets (positions = 'canvas') are not supported, see supports_offsets")
        if guidance_scale is not None:
            raise ValueError("model family 'qwenimage': guidance_scale is a model input of distilled families; Qwen-Image uses cfg")
        patch = self.latent_format.patch
        if latents.shape[-2] % patch or latents.shape[-1] % patch:
            raise ConfigError(
                f"model family 'qwenimage': window {tuple(latents.shape[-2:])} latent cells is not whole {patch}×{patch} patches"
            )
        if len(embeds) != latents.shape[0]:
            raise ValueError(f"model family 'qwenimage': {len(embeds)} embedding rows for {latents.shape[0]} windows")
        transformer = self.pipeline.transformer
        kwargs = self._inputs(transformer, latents, timestep, embeds)
        out = transformer(**kwargs, return_dict=False, **dict(extra or {}))[0]
        return unpack_patches(out.float(), tuple(latents.shape[-2:]), patch)

    def combine_guidance(self, uncond, cond, scale):
        """True CFG ``u + g (c − u)``, then rescaled per token so its norm (over a token's
        ``16·2·2`` values) equals the conditional output's, as the stock pipeline does.
        ``scale``: a float or per-window ``(N, 1, 1, 1)``."""
        import torch

        patch = self.latent_format.patch
        u, c = pack_patches(uncond, patch), pack_patches(cond, patch)
        if isinstance(scale, torch.Tensor):
            scale = scale.to(u.device, u.dtype).reshape(-1, 1, 1) if scale.ndim else scale.to(u.device, u.dtype)
        combined = u + scale * (c - u)
        combined = combined * (c.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        return unpack_patches(combined, tuple(uncond.shape[-2:]), patch)

    # -- VAE -----------------------------------------------------------------------------

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel ``latents_mean``, ``latents_std`` as ``(1, C, 1, 1, 1)`` (cached)."""
        import torch

        key = (like.device, like.dtype)
        if key not in self._stats:
            config = self.pipeline.vae.config
            shape = (1, int(config.z_dim), 1, 1, 1)
            mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(shape)
            std = torch.tensor(config.latents_std, dtype=torch.float32).view(shape)
            self._stats[key] = (mean.to(like.device, like.dtype), std.to(like.device, like.dtype))
        return self._stats[key]

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Canvas ``(B, C, H, W)`` → the VAE decoder's input, one video frame ``(B, C, 1, H, W)``:
        ``z = x · latents_std + latents_mean``."""
        mean, std = self._latent_stats(latents)
        return latents.unsqueeze(2) * std + mean

    def from_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents ``(B, C, 1, H, W)`` (or ``(B, C, H, W)``) → canvas ``(B, C, H, W)``:
        ``(z − latents_mean) / latents_std`` (the img2img pipeline's ``_encode_vae_image``)."""
        frames = latents if latents.ndim == 5 else latents.unsqueeze(2)
        mean, std = self._latent_stats(frames)
        return ((frames - mean) / std)[:, :, 0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Canvas latents ``(B, 16, h, w)`` → pixels ``(B, 3, 8h, 8w)`` in [-1, 1] (float32)."""
        vae = self.pipeline.vae
        frames = vae.decode(self.to_vae_latents(latents.float()).to(vae.dtype), return_dict=False)[0]
        return frames[:, :, 0].float()

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → canvas latents, a posterior sample."""
        vae = self.pipeline.vae
        posterior = vae.encode(pixels.unsqueeze(2).to(vae.device, vae.dtype)).latent_dist
        return self.from_vae_latents(posterior.sample(generator=generator).float())

    # -- ControlNet ----------------------------------------------------------------------

    def control_condition(self, controlnet, pixels):
        """The condition image ``(1, 3, H, W)`` in [0, 1] → normalised VAE latents
        ``(1, 16, H/8, W/8)`` (a posterior sample, as the stock ControlNet pipeline draws it)."""
        import torch

        with torch.no_grad():
            return self.encode(pixels * 2 - 1)

    def controlnet_kwargs(self, controlnet, latents, timestep, embeds, condition, conditioning_scale, guidance_scale=None, offsets=None):
        """Run a ``QwenImageControlNetModel`` on ``N`` windows with their condition latents
        ``(N, 16, h, w)``; returns ``{"controlnet_block_samples": [N × tokens × dim per block]}``."""
        inputs = self._inputs(controlnet, latents, timestep, embeds)
        cond = pack_patches(condition.to(controlnet.device, controlnet.dtype), self.latent_format.patch)
        samples = controlnet(**inputs, controlnet_cond=cond, conditioning_scale=conditioning_scale, return_dict=False)
        return {"controlnet_block_samples": list(samples)}

    def tiny_controlnet(self, seed: int = 0) -> Any:
        """A random-weight ``QwenImageControlNetModel`` fitting this transformer."""
        return build_tiny_controlnet(self.pipeline, seed)


# -- the tiny models ---------------------------------------------------------------------

TINY = {"text_width": 32, "heads": 2, "head_dim": 16, "rope": (8, 4, 4)}
TINY_WORDS = "a photo of the red fox cat dog in snow city at night mountain lake painting"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
    shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential",
)  # fmt: skip
"""Qwen/Qwen-Image's ``scheduler_config.json`` (exponential dynamic shift, terminal σ 0.02)."""


def _seeded(seed: int, build):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_tokenizer():
    """A ``Qwen2Tokenizer`` built in code: byte-level BPE (Qwen2's pre-tokenizer regex) trained
    with the ``tokenizers`` library on the chat template and a few words, so that every word of
    the template is one token and the system turn is 34 tokens, as with the real vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    # the template's text between special tokens (as the tokenizer splits it), and the words
    # with and without a leading space
    segments = re.split("|".join(map(re.escape, SPECIALS)), PROMPT_TEMPLATE.replace("{}", ""))
    trainer = trainers.BpeTrainer(
        vocab_size=2000, show_progress=False, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([*segments, " " + TINY_WORDS, "\n".join(TINY_WORDS.split())], trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return tokenizer


def tiny_text_encoder(seed: int, tokenizer):
    """A 2-layer ``Qwen2_5_VLForConditionalGeneration`` (multimodal RoPE, 1-block vision tower)
    of width 32 over ``tokenizer``'s vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in zip(
        ("bos", "eos", "vision_start", "vision_end", "image", "video"), ("<|endoftext|>", "<|im_end|>", *SPECIALS[3:]))}  # fmt: skip
    width = TINY["text_width"]
    text = dict(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, rope_theta=1e6,
        rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [2, 3, 3]},
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["bos"],
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=width)
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], image_token_id=ids["image"], video_token_id=ids["video"],
        bos_token_id=ids["bos"], eos_token_id=ids["eos"],
    )  # fmt: skip
    return _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config)).eval()


def _transformer_config() -> dict[str, Any]:
    """Qwen-Image's facts (patch 2, 16 latent channels → 64 per token) at toy width."""
    return dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=TINY["head_dim"],
        num_attention_heads=TINY["heads"], joint_attention_dim=TINY["text_width"], axes_dims_rope=TINY["rope"],
    )  # fmt: skip


def tiny_vae(seed: int):
    """``AutoencoderKLQwenImage`` with the real layout (factor 8: three downsamplings, 16
    channels, Qwen-Image's ``latents_mean`` / ``latents_std``) at toy width."""
    from diffusers import AutoencoderKLQwenImage

    return _seeded(
        seed,
        lambda: AutoencoderKLQwenImage(
            base_dim=8, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
    ).eval()


def build_tiny_pipeline(seed: int = 0):
    """A stock ``QwenImagePipeline`` of tiny random components (fixed seeds, offline): a 2-layer
    MMDiT, the Qwen2.5-VL text encoder above, the video VAE and Qwen-Image's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    tokenizer = tiny_tokenizer()
    return QwenImagePipeline(
        transformer=_seeded(seed, lambda: QwenImageTransformer2DModel(**_transformer_config())).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_text_encoder(seed + 2, tokenizer),
        tokenizer=tokenizer,
    )


def build_tiny_controlnet(pipeline: Any, seed: int = 0, num_layers: int = 1):
    """A ``QwenImageControlNetModel`` matching ``pipeline``'s transformer, random weights; its
    zero-initialised layers (condition embedder, per-block projections) are re-drawn (normal,
    std 0.1) so that tests can see the residuals."""
    import torch
    from diffusers import QwenImageControlNetModel

    def build():
        config = {k: v for k, v in pipeline.transformer.config.items() if k in _transformer_config()}
        controlnet = QwenImageControlNetModel(**{**config, "num_layers": num_layers})
        with torch.no_grad():
            for layer in [controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks]:
                torch.nn.init.normal_(layer.weight, std=0.1)
                torch.nn.init.normal_(layer.bias, std=0.1)
        return controlnet.to(pipeline.transformer.device, pipeline.transformer.dtype).eval()

    return _seeded(seed, build)

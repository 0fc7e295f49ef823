"""FLUX.2 [dev] and FLUX.2 [klein] (Black Forest Labs 2025, https://bfl.ai/blog/flux-2): a
rectified-flow MMDiT on the latents of a 32-channel VAE, driven by diffusers'
``Flux2Pipeline`` (Mistral-Small-3 text encoder, embedded guidance) and
``Flux2KleinPipeline`` (Qwen3 text encoder; *base* checkpoints use true classifier-free
guidance with an empty negative prompt, step-distilled ones no guidance).

Canvas latent space (the space of the stock denoising loop, before token packing): the VAE's
latents patchified 2×2 into channels and batch-normalised with the VAE's running statistics,
``(B, 128, H_px/16, W_px/16)``. Channel ``4c + 2i + j`` holds VAE channel ``c`` at sub-pixel
``(i, j)``. One canvas cell is one transformer token (no further patching: ``patch = 1``) and
16 pixels; the native window is 64 cells (1024 px, the pipeline's ``default_sample_size``).
Token ids are 4-D ``(t, h, w, l)``: image tokens ``(0, row, col, 0)``, text ``(0, 0, 0, k)``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

from einops import rearrange
from pydantic import Field

from jointdiff.core.family import Embeddings, GuidanceMode, LatentFormat
from jointdiff.models.families.flow import FlowMatchFamily, pack_patches, unpack_patches
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

KLEIN_PIPELINES = ("Flux2KleinPipeline",)


def empirical_mu(seq_len: int, num_steps: int) -> float:
    """FLUX.2's timestep shift (BFL ``flux2/sampling.py``, ``compute_empirical_mu``): two lines
    in the token count, fitted for 10 and 200 steps, interpolated linearly in the step count;
    above 4300 tokens the 200-step line alone."""
    m_200 = 0.00016927 * seq_len + 0.45666666
    if seq_len > 4300:
        return float(m_200)
    m_10 = 8.73809524e-05 * seq_len + 1.89833333
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + (m_200 - 200.0 * slope))


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents ``(B, c, 2h, 2w)`` → ``(B, 4c, h, w)`` (2×2 sub-pixels into channels)."""
    return rearrange(latents, "b c (h i) (w j) -> b (c i j) h w", i=2, j=2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    return rearrange(latents, "b (c i j) h w -> b c (h i) (w j)", i=2, j=2)


class Flux2(FlowMatchFamily):
    """FLUX.2 [dev] (guidance-distilled: the scale is a transformer input, no negative prompt)
    and FLUX.2 [klein] (base: true CFG; distilled: no guidance), chosen by the pipeline class,
    ``transformer.config.guidance_embeds`` and the klein pipeline's ``is_distilled``."""

    name = "flux2"
    pipeline_classes = ("Flux2Pipeline", *KLEIN_PIPELINES)
    latent = LatentFormat(channels=128, scale_factor=16, patch=1, native_window=64, min_window=8, max_window=256)
    guidance = "distilled"
    default_guidance_scale = 4.0
    # madebyollin/taef2 exists but is not loadable as diffusers' AutoencoderTiny (needs a wrapper).
    tiny_autoencoder = None
    cuda_dtype = "bfloat16"
    controlnet_classes = ()
    tiny_models = {
        "tiny-flux2": "jointdiff.models.families.flux2:build_tiny_pipeline",
        "tiny-flux2-klein": "jointdiff.models.families.flux2:build_tiny_klein_pipeline",
        "tiny-flux2-klein-base": "jointdiff.models.families.flux2:build_tiny_klein_base_pipeline",
    }

    class Options(FlowMatchFamily.Options):
        max_sequence_length: int = Field(512, ge=1, le=8192)
        """Text tokens per prompt, chat template included (padded to it, longer prompts cut)."""
        text_encoder_out_layers: tuple[int, ...] | None = None
        """Text-encoder hidden states stacked into the prompt embedding (None: the pipeline's)."""

    def __init__(self, pipeline: Any, options: Any = None, **kwargs: Any) -> None:
        super().__init__(pipeline, options, **kwargs)
        self._ids: dict[tuple, torch.Tensor] = {}

    # -- facts ---------------------------------------------------------------------------

    @property
    def is_klein(self) -> bool:
        return type(self.pipeline).__name__ in KLEIN_PIPELINES

    @property
    def guidance_mode(self) -> GuidanceMode:
        if self.is_klein:
            return "none" if self.pipeline.config.get("is_distilled", False) else "cfg"
        return "distilled" if self.pipeline.transformer.config.guidance_embeds else "none"

    @property
    def latent_format(self) -> LatentFormat:
        """Channels from the transformer, 16 px (VAE factor × the 2×2 patchify) per cell, native
        window from the pipeline's ``default_sample_size`` (in VAE cells)."""
        vae_factor = int(self.pipeline.vae_scale_factor)
        native = int(self.pipeline.default_sample_size) // 2
        return LatentFormat(
            channels=int(self.pipeline.transformer.config.in_channels), scale_factor=2 * vae_factor, patch=1,
            native_window=native, min_window=self.latent.min_window, max_window=self.latent.max_window,
        )

    # -- prompts -------------------------------------------------------------------------

    def _out_layers(self) -> tuple[int, ...]:
        if self.options.text_encoder_out_layers is not None:
            return tuple(self.options.text_encoder_out_layers)
        import inspect

        return tuple(inspect.signature(self.pipeline.encode_prompt).parameters["text_encoder_out_layers"].default)

    def _token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` in the pipeline's chat template, before padding and cutting."""
        tokenizer = self.pipeline.tokenizer
        if self.is_klein:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            return len(tokenizer(text)["input_ids"])
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        messages = format_input(prompts=[prompt], system_message=self.pipeline.system_message)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)
        return len(ids["input_ids"][0])

    def _warn_cut(self, prompt: str) -> None:
        """Warn naming the words of ``prompt`` beyond ``max_sequence_length`` tokens."""
        limit = self.options.max_sequence_length
        if self._token_count(prompt) <= limit:
            return
        words = prompt.split()
        low, high = 0, len(words)  # the most words that fit: binary search on whole words
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self._token_count(" ".join(words[:mid])) <= limit else (low, mid - 1)
        warnings.warn(
            f"flux2: prompt longer than max_sequence_length = {limit} tokens; cut: {' '.join(words[low:])!r}",
            stacklevel=4,
        )

    def _encode(self, prompts: Sequence[str]) -> Embeddings:
        import torch

        for prompt in prompts:
            self._warn_cut(prompt)
        with torch.no_grad():
            embeds, _ = self.pipeline.encode_prompt(
                prompt=list(prompts), device=self.device, num_images_per_prompt=1,
                max_sequence_length=self.options.max_sequence_length, text_encoder_out_layers=self._out_layers(),
            )
        return Embeddings({"prompt_embeds": embeds})

    def encode_prompts(self, prompts, negative_prompts=None):
        """Stacked hidden states of the text encoder ``(P, max_sequence_length, 3·D)`` through
        the pipeline's own ``encode_prompt`` (Mistral chat template with FLUX.2's system message,
        or Qwen3's). Negative prompts exist only for klein base (true CFG; stock uses "")."""
        if negative_prompts is not None and self.guidance_mode != "cfg":
            raise ConfigError(
                f"negative_prompt = {list(negative_prompts)!r}: {type(self.pipeline).__name__} has "
                f"{self.guidance_mode!r} guidance and no negative branch; remove the negative prompt"
            )
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ConfigError(
                f"model family 'flux2': negative_prompts = {list(negative_prompts)!r} has "
                f"{len(negative_prompts)} entries for {len(prompts)} prompts"
            )
        negative = self._encode(negative_prompts) if negative_prompts is not None else None
        return self._encode(prompts), negative

    # -- the model call ------------------------------------------------------------------

    def image_ids(self, size: tuple[int, int], top: int = 0, left: int = 0, device: Any = None) -> torch.Tensor:
        """Token ids ``(h·w, 4)`` of an image of ``size`` cells, row-major, ``(0, top + r,
        left + c, 0)`` (the pipeline's ``_prepare_latent_ids`` shifted by an offset); cached."""
        import torch

        key = ("img", *size, top, left, str(device))
        if key not in self._ids:
            rows = torch.arange(size[0]) + top
            cols = torch.arange(size[1]) + left
            zero = torch.zeros(1, dtype=torch.long)
            self._ids[key] = torch.cartesian_prod(zero, rows, cols, zero).to(device)
        return self._ids[key]

    def text_ids(self, length: int, device: Any = None) -> torch.Tensor:
        """Token ids ``(L, 4)`` of a prompt: ``(0, 0, 0, k)``; cached."""
        import torch

        key = ("txt", length, str(device))
        if key not in self._ids:
            zero = torch.zeros(1, dtype=torch.long)
            self._ids[key] = torch.cartesian_prod(zero, zero, zero, torch.arange(length)).to(device)
        return self._ids[key]

    def _call(self, tokens, timestep, prompt, guidance, img_ids, extra) -> torch.Tensor:
        """One transformer call on packed tokens ``(N, S, C)``; returns the image tokens."""
        transformer = self.pipeline.transformer
        n, dtype = tokens.shape[0], self.dtype
        t = timestep.to(tokens.device).reshape(-1).expand(n).to(dtype)
        out = transformer(
            hidden_states=tokens.to(dtype), timestep=t / 1000, guidance=guidance,
            encoder_hidden_states=prompt.to(dtype), txt_ids=self.text_ids(prompt.shape[1], tokens.device),
            img_ids=img_ids, return_dict=False, **dict(extra or {}),
        )[0]
        return out[:, : tokens.shape[1]]

    def forward(self, latents, timestep, embeds, *, guidance_scale=None, offsets=None, extra=None):
        """The transformer on ``N`` windows ``(N, 128, h, w)`` packed to ``h·w`` tokens.

        Embedded guidance (dev) is ``guidance_scale`` ``(N,)`` (default 4.0); klein gets none.
        diffusers' FLUX.2 transformer takes *one* set of position ids for the whole batch, so
        windows with different ``offsets`` run as one call per distinct offset (reading
        ``offsets`` on the host); without offsets the whole batch is one call."""
        import torch

        n, _, h, w = latents.shape
        tokens = pack_patches(latents, patch=1)
        prompt = embeds["prompt_embeds"]
        guidance = None
        if self.guidance_mode == "distilled":
            guidance = guidance_scale if guidance_scale is not None else torch.full((n,), self.default_guidance_scale)
            guidance = guidance.to(latents.device, torch.float32).expand(n)
        if offsets is None:
            out = self._call(tokens, timestep, prompt, guidance, self.image_ids((h, w), device=latents.device), extra)
            return unpack_patches(out, (h, w), patch=1).float()
        distinct, group = torch.unique(offsets.cpu().long(), dim=0, return_inverse=True)
        out = tokens.new_empty(tokens.shape, dtype=torch.float32)
        for k, (top, left) in enumerate(distinct.tolist()):
            rows = (group == k).nonzero().flatten().to(latents.device)
            part = self._call(
                tokens[rows], timestep, prompt[rows], None if guidance is None else guidance[rows],
                self.image_ids((h, w), top, left, latents.device), self._select(extra, rows, n),
            )
            out[rows] = part.float()
        return unpack_patches(out, (h, w), patch=1)

    @staticmethod
    def _select(extra: Any, rows: torch.Tensor, n: int) -> dict[str, Any]:
        """Rows of every batched tensor in ``extra`` (leading dimension ``n``)."""
        import torch

        return {
            key: value[rows] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n else value
            for key, value in dict(extra or {}).items()
        }

    # -- schedule ------------------------------------------------------------------------

    def timestep_mu(self, seq_len: int, num_steps: int, scheduler: Any) -> float:
        """FLUX.2's empirical shift of the *window's* token count (the pipeline always passes it)."""
        return empirical_mu(seq_len, num_steps)

    def default_sigmas(self, num_steps: int) -> np.ndarray | None:
        """``linspace(1, 1/N, N)`` as the pipeline passes, none for ``use_flow_sigmas`` schedulers."""
        import numpy as np

        if self.scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / num_steps, num_steps)

    # -- VAE -----------------------------------------------------------------------------

    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's batch-norm mean and std ``(1, 128, 1, 1)`` (``√(var + eps)``)."""
        import torch

        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Canvas ``(B, 128, h, w)`` → VAE latents ``(B, 32, 2h, 2w)``: undo the batch norm, then
        unpatchify (what the pipeline does before ``vae.decode``)."""
        mean, std = self._bn_stats(latents)
        return unpatchify(latents * std + mean)

    def from_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents → canvas: patchify, then normalise (the pipeline's ``_encode_vae_image``)."""
        latents = patchify(latents)
        mean, std = self._bn_stats(latents)
        return (latents - mean) / std


# -- tiny offline pipelines ----------------------------------------------------------------

_MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                     "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _seeded(seed: int, build):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    """Special tokens, then the 256 byte-level symbols: a byte-level BPE without merges."""
    from tokenizers import pre_tokenizers

    return {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}


def tiny_mistral_processor():
    """A ``PixtralProcessor`` (as FLUX.2 [dev] uses) over a byte-level tokenizer built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=_byte_vocab(_MISTRAL_SPECIALS), merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=_MISTRAL_SPECIALS[4:],
    )
    return PixtralProcessor(PixtralImageProcessor(), tokenizer, patch_size=6, chat_template=_MISTRAL_TEMPLATE)


def tiny_qwen_tokenizer():
    """A ``Qwen2TokenizerFast`` (as FLUX.2 [klein] uses), byte-level, no merges."""
    from transformers import Qwen2TokenizerFast

    tokenizer = Qwen2TokenizerFast(vocab=_byte_vocab(_QWEN_SPECIALS), merges=[], pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIALS[1:]})
    tokenizer.chat_template = _QWEN_TEMPLATE
    return tokenizer


def tiny_mistral3(seed: int, vocab_size: int, image_token: int, hidden: int = 16):
    """Mistral3ForConditionalGeneration with 30 text layers (the pipeline reads layers 10, 20, 30)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(model_type="mistral", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32,
                num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=2048, rope_theta=1e9, sliding_window=None,
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, image_size=30, patch_size=6, num_channels=3)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=image_token,
                            image_seq_length=4, vision_feature_layer=-1, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return _seeded(seed, lambda: Mistral3ForConditionalGeneration(config)).eval()


def tiny_qwen3(seed: int, vocab_size: int, hidden: int = 16):
    """Qwen3ForCausalLM with 27 layers (the klein pipeline reads layers 9, 18, 27)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_hidden_layers=27,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048)
    return _seeded(seed, lambda: Qwen3ForCausalLM(config)).eval()


def tiny_flux2_vae(seed: int):
    """AutoencoderKLFlux2 with FLUX.2's facts (factor 8, 32 channels, 2×2 patch batch norm) at
    toy width, and non-trivial running statistics so the normalisation is exercised."""
    import torch
    from diffusers import AutoencoderKLFlux2

    def build():
        vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=32,
                                 norm_num_groups=8, sample_size=1024)
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.num_features))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features))
        return vae.eval()

    return _seeded(seed, build)


def build_tiny_pipeline(seed: int = 0, variant: str = "dev"):
    """The stock FLUX.2 pipeline at toy size, random weights from ``seed``, fully offline.
    ``variant``: ``dev`` (Flux2Pipeline, embedded guidance), ``klein`` (Flux2KleinPipeline,
    step-distilled) or ``klein-base`` (Flux2KleinPipeline, true CFG)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

    if variant not in ("dev", "klein", "klein-base"):
        raise ConfigError(f"tiny flux2: variant = {variant!r} is not 'dev', 'klein' or 'klein-base'")
    hidden = 16
    if variant == "dev":
        tokenizer = tiny_mistral_processor()
        vocab = len(tokenizer.tokenizer)
        text_encoder = tiny_mistral3(seed, vocab, tokenizer.image_token_id, hidden)
    else:
        tokenizer = tiny_qwen_tokenizer()
        text_encoder = tiny_qwen3(seed, len(tokenizer), hidden)
    transformer = _seeded(seed, lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * hidden, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=variant == "dev"))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    parts = dict(scheduler=scheduler, vae=tiny_flux2_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer,
                 transformer=transformer)
    if variant == "dev":
        return Flux2Pipeline(**parts)
    return Flux2KleinPipeline(**parts, is_distilled=variant == "klein")


def build_tiny_klein_pipeline(seed: int = 0):
    """Tiny FLUX.2 [klein] (step-distilled, no guidance)."""
    return build_tiny_pipeline(seed, variant="klein")


def build_tiny_klein_base_pipeline(seed: int = 0):
    """Tiny FLUX.2 [klein] base (true classifier-free guidance)."""
    return build_tiny_pipeline(seed, variant="klein-base")

"""The ``syncdiffusion`` synchronizer: SyncDiffusion's gradient step toward an anchor window.

SyncDiffusion (Lee, Kim, Kim & Sung, "SyncDiffusion: Coherent Montage via Synchronized Joint
Diffusions", NeurIPS 2023; ControlSync Eq. 3–4 for the conditional form). Before the denoising
step ``t`` (step index ``i``), every window ``k`` other than the anchor ``a`` is moved by one
gradient-descent step on a perceptual loss between the *foreseen* clean images::

    x̂0(x) = φθ(x, t)                                   DDIM's predicted x0, guided (CFG)
    L_k   = LPIPS( D(x̂0(x_t^k)),  sg[D(x̂0(x_t^a))] )    sg: no gradient into the anchor
    x_t^k ← x_t^k − w · decay^i · ∇_{x_t^k} L_k          raw gradient, through D and the UNet

``D`` is the VAE decoder (or TAESD in the fast mode); images are clamped to [-1, 1] as the
reference implementation does (it decodes to [0, 1] and rescales). The anchor is not moved.
A step is synchronized when ``(i + 1) % every == 0`` and ``i < until_step``.

Tensors are ``(B, C, h, w)`` window latents (float32, the UNet's latent space, i.e. already
multiplied by the VAE's ``scaling_factor``); images ``(B, 3, f·h, f·w)`` in [-1, 1].

Schedulers. The method is defined with DDIM, for which ``x̂0`` here equals DDIM's
``pred_original_sample`` (ε- or v-prediction, ``clip_sample`` honoured; dynamic thresholding
is refused). Other diffusers schedulers work as an extension: ``x̂0`` is
:meth:`~jointdiff.engine.denoiser.Denoiser.predicted_x0`, Tweedie's estimate from the scheduler's
``ᾱ_t`` applied to the variance-preserving sample ``scale_model_input(x_t)``; the gradient is
taken with respect to the scheduler's own latent (for σ-parameterised schedulers such as
Euler it is ``√(1+σ²)`` times larger), so the same ``w`` is a different step size there.

Cost per synchronized step, for ``N`` windows: the anchor's guided UNet forward and decode
(no gradient, once), then for the ``N − 1`` other windows one guided UNet forward and backward,
one decoder forward and backward and one LPIPS forward and backward, batched in micro-batches;
the denoising step afterwards is the engine's usual guided forward for the ``N − 1`` others:
the anchor is not moved, so its denoising step reuses the output of its anchor forward
(:meth:`~jointdiff.core.context.StepState.remember_output`; not under ``autocast``). A step whose
weight ``w · decay^i`` is zero, or that is not synchronized, costs nothing extra.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import pydantic

from jointdiff.plugin import ConfigError, ModelLoadError, NonFiniteLatentsError, PluginOptions, Synchronizer, hookimpl
from jointdiff_plugins.lpips_loader import AnchorDistance, load_lpips

if TYPE_CHECKING:
    import torch

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's sampling function: every one of the 50 DDIM steps, middle anchor.
    "syncdiffusion": {"w": 20.0, "decay": 0.95, "every": 1, "until_step": None, "anchor": None},
    # ControlSync §3: w 20, decay 0.95, the first 10 of 50 DDIM steps, anchor j = 0 (Eq. 4).
    "controlsync": {"w": 20.0, "decay": 0.95, "every": 1, "until_step": 10, "anchor": 0},
}
DEFAULT_TAESD = "madebyollin/taesd"
HALF_LOSS_SCALE = 1024.0
"""Static loss scale in float16, so that LPIPS gradients (≈ 1/(H·W) per pixel) stay normal."""

_LPIPS_CACHE: dict[tuple[str, bool, str], torch.nn.Module] = {}
_TAESD_CACHE: dict[tuple[str, str, torch.dtype], torch.nn.Module] = {}


class SyncDiffusion(Synchronizer):
    """Moves every non-anchor window along ``−∇ LPIPS`` to the anchor before each step.

    Results equal the one-window-at-a-time algorithm (to float rounding); what is batched or
    reused: the windows of a batch share the gradient pass (micro-batches of ``micro_batch``
    windows, sized from ``memory_budget_gb`` on CUDA when unset), the anchor gets no gradient
    pass, and the anchor's image and LPIPS features are computed once per step, its model
    output serving its own denoising step too; steps of weight zero run no pass at all.
    """

    name = "syncdiffusion"
    reuse_anchor_output = True
    """Offer the anchor's model output to its own denoising step (exact; False only to measure)."""
    reuse_region_moves = True
    """Move a window once per step for all region branches that see it at equal latents (exact)."""
    cpu_micro_batch: int | None = 1
    """Windows per gradient pass on a CPU when ``micro_batch`` is unset (None: the batch's rest)."""
    lpips_channels_last = True
    """Run the LPIPS backbone in channels-last (same distances to float rounding)."""

    class Options(PluginOptions):
        preset: Literal["syncdiffusion", "controlsync"] | None = pydantic.Field(
            None, description="fill unspecified fields from the paper's or ControlSync's settings"
        )
        w: float = pydantic.Field(20.0, ge=0.0, description="gradient step weight at step 0")
        decay: float = pydantic.Field(0.95, ge=0.0, le=1.0, description="w_t = w * decay ** step_index")
        every: int = pydantic.Field(1, ge=1, description="synchronize steps with (step_index + 1) % every == 0")
        until_step: int | None = pydantic.Field(
            None, ge=0, description="synchronize only steps with step_index < until_step (None: all)"
        )
        anchor: int | None = pydantic.Field(None, ge=0, description="anchor window id (None: num_windows // 2)")
        net: Literal["vgg", "alex", "squeeze"] = pydantic.Field("vgg", description="LPIPS backbone")
        lpips_module: Any = pydantic.Field(None, description="a ready LPIPS module (replaces net)")
        lpips_random_backbone: bool = pydantic.Field(False, description="random LPIPS backbone (tests only)")
        decoder: Literal["vae", "taesd"] = pydantic.Field(
            "vae", description="decoder D of the loss: the model's VAE, or the family's tiny autoencoder"
        )
        taesd_path: str | None = pydantic.Field(
            None, description="AutoencoderTiny folder or hub id (None: the model family's, e.g. madebyollin/taesd)"
        )
        micro_batch: int | None = pydantic.Field(
            None, ge=1, description="windows per gradient pass (None: 1 on a CPU, sized from free memory on CUDA)"
        )
        memory_budget_gb: float | None = pydantic.Field(None, gt=0.0, description="CUDA budget for the pass")
        checkpoint_decoder: bool = pydantic.Field(False, description="gradient checkpointing of D")
        checkpoint_unet: bool = pydantic.Field(False, description="gradient checkpointing of the UNet")
        autocast: Literal["none", "float16", "bfloat16"] = pydantic.Field("none", description="autocast the pass")
        loss_scale: float | None = pydantic.Field(None, gt=0.0, description="None: 1, or 1024 in float16")

        @pydantic.model_validator(mode="before")
        @classmethod
        def _fill_from_preset(cls, data: Any) -> Any:
            if isinstance(data, dict) and data.get("preset") in PRESETS:
                data = {**PRESETS[data["preset"]], **data}
            return data

        @pydantic.field_validator("lpips_module")
        @classmethod
        def _callable_module(cls, value: Any) -> Any:
            if value is not None and not callable(value):
                raise ValueError("must be a callable module(images, anchor) -> per-sample distances")
            return value

    @classmethod
    def example_options(cls) -> dict:
        """Offline options for conformance tests: a random LPIPS backbone (no download)."""
        return {"lpips_random_backbone": True, "net": "alex"}

    @classmethod
    def zero_strength_options(cls) -> dict:
        return {**cls.example_options(), "w": 0.0}

    def __repr__(self) -> str:
        fields = self.options.model_dump()
        module = fields.pop("lpips_module")
        shown = [f"{k}={v!r}" for k, v in fields.items()]
        shown.append(f"lpips_module=<{type(module).__name__}>" if module is not None else "lpips_module=None")
        return f"{type(self).__name__}({', '.join(shown)})"

    # -- setup ---------------------------------------------------------------------------

    def setup(self, context) -> None:
        """Check the anchor against the geometry, load LPIPS and the loss decoder."""
        import torch

        o = self.options
        count = context.geometry.num_windows
        self.anchor_id = count // 2 if o.anchor is None else o.anchor
        if self.anchor_id >= count:
            raise ConfigError(f"syncdiffusion: anchor = {o.anchor} is out of range for {count} windows (0..{count - 1})")
        self._device = torch.device(context.device)
        if o.autocast == "float16" and self._device.type != "cuda":
            raise ConfigError(f"syncdiffusion: autocast = 'float16' needs a CUDA device, the job runs on {self._device}")
        if context.model.scheduler.config.get("thresholding", False):
            raise ConfigError("syncdiffusion: schedulers with thresholding=True are not supported")
        self._context = context
        self._distance = AnchorDistance(self._lpips(context))
        self._decoder, self._decoder_scale = self._loss_decoder(context)
        self._check_checkpointing(context)
        self._auto_micro: int | None = None
        self._anchor_step: int | None = None
        self._num_windows = count
        self._moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._moved_step: int | None = None
        self._comm = context.distributed if context.distributed is not None else context.extras.get("distributed")

    def _lpips(self, context) -> Any:
        import torch

        o = self.options
        if o.lpips_module is not None:
            module = o.lpips_module
            return module.to(self._device) if isinstance(module, torch.nn.Module) else module
        key = (o.net, o.lpips_random_backbone, str(self._device))
        if key not in _LPIPS_CACHE:
            _LPIPS_CACHE[key] = load_lpips(o.net, random_backbone=o.lpips_random_backbone).to(self._device)
        return self._channels_last(_LPIPS_CACHE[key])  # the plugin's own module (a given one is left as it is)

    def _channels_last(self, module: Any) -> Any:
        """``module`` (LPIPS) with its convolutions in channels-last when
        :attr:`lpips_channels_last`, else contiguous: its forward and backward, most of a
        synchronized step on a CPU, ran about 10 % faster so (VGG at 512 px, 1 thread), with
        the same distances to float rounding."""
        import torch

        if isinstance(module, torch.nn.Module) and any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
            module.to(memory_format=torch.channels_last if self.lpips_channels_last else torch.contiguous_format)
        return module

    def _loss_decoder(self, context) -> tuple[Any, Any]:
        """The decoder ``D`` of the loss (None: the model's own VAE through the family) and
        the tiny autoencoder's config."""
        model = context.model
        if self.options.decoder == "vae":
            return None, None
        path = self.options.taesd_path or model.tiny_autoencoder
        if path is None:
            raise ConfigError(
                f"syncdiffusion: decoder = 'taesd' but model family {model.name!r} has no tiny autoencoder; "
                "give taesd_path (a diffusers AutoencoderTiny folder for this family's latents) or use decoder = 'vae'"
            )
        dtype = model.pipeline.vae.dtype
        key = (path, str(self._device), dtype)
        if key not in _TAESD_CACHE:
            _TAESD_CACHE[key] = _load_taesd(path, dtype).to(self._device)
        taesd = _TAESD_CACHE[key]
        return taesd, taesd.config

    def _check_checkpointing(self, context) -> None:
        for flag, label, module in (
            (self.options.checkpoint_decoder, "checkpoint_decoder", self._decoder_module()),
            (self.options.checkpoint_unet, "checkpoint_unet", context.model.denoiser_module),
        ):
            if flag and not any(hasattr(m, "gradient_checkpointing") for m in module.modules()):
                raise ConfigError(f"syncdiffusion: {label} = True but {type(module).__name__} has no checkpointable blocks")

    # -- the loop ------------------------------------------------------------------------

    def synchronizes(self, step_index: int) -> bool:
        """Whether step ``step_index`` (0-based) is synchronized: ``(i + 1) % every == 0``,
        ``i < until_step`` and a non-zero step weight ``w · decay^i`` (a zero weight would
        move nothing, so no anchor, forward or backward pass runs then)."""
        o = self.options
        scheduled = (step_index + 1) % o.every == 0 and (o.until_step is None or step_index < o.until_step)
        return scheduled and self.weight(step_index) != 0.0

    def weight(self, step_index: int) -> float:
        """The gradient step weight ``w · decay^i`` of step ``step_index`` (``decay^0 = 1``)."""
        return self.options.w * self.options.decay**step_index

    def anchor_windows(self) -> tuple[int, ...]:
        """The anchor (after :meth:`setup`): it gets no gradient pass."""
        return (self.anchor_id,)

    def evaluations_per_step(self, windows: int, branches: int, rows: int) -> dict[str, int]:
        """Rows of one synchronized step (:func:`jointdiff_plugins.syncdiffusion_cost.rows_per_step`)."""
        # lazy: the cost module needs torch
        from jointdiff_plugins.syncdiffusion_cost import rows_per_step

        return rows_per_step(windows, branches, rows, bool(self.reuse_region_moves))

    def price_per_row(self, model: Any, window: tuple[int, int]) -> tuple[dict[str, float], list[str]]:
        """The loss decoder's and LPIPS's FLOPs per row (:mod:`jointdiff_plugins.syncdiffusion_cost`)."""
        # lazy: the cost module needs torch
        from jointdiff_plugins.syncdiffusion_cost import price_per_row

        taesd = None
        if self.options.decoder != "vae":
            taesd = getattr(self, "_decoder", None)
            path = self.options.taesd_path or model.tiny_autoencoder
            if taesd is None and path:
                # lazy: plugin registration stays free of torch
                import torch

                try:
                    taesd = _load_taesd(path, torch.float32).to(model.device)
                except Exception:  # priced as "not loadable here"
                    taesd = None
        return price_per_row(model, window, self.options, taesd)

    def reuses_anchor_output(self) -> bool:
        """The anchor's denoising step takes its output from the anchor pass (not under autocast)."""
        return bool(self.reuse_anchor_output) and self.options.autocast == "none"

    def begin_step(self, state) -> None:
        # The anchor is prepared by the first batch of the step, with the step's scheduler
        # (``state.scheduler``, positioned at this step: schedulers such as Euler keep a step
        # index that scale_model_input reads). With window parallelism the rank that owns
        # the anchor prepares it now and broadcasts the image.
        self._anchor_step = None
        self._moved, self._moved_step = {}, state.step_index
        if self._comm is not None and self.synchronizes(state.step_index):
            self._share_anchor(state)

    def _share_anchor(self, state) -> None:
        """Decode the anchor on the rank that owns it; every rank fixes the broadcast image."""
        import torch

        comm = self._comm
        owner = comm.owner_of(self.anchor_id)
        image, failure = None, None
        if comm.rank == owner:
            try:
                scheduler = state.scheduler if state.scheduler is not None else comm.batch_of(self.anchor_id).scheduler
                image = self._anchor_image(scheduler, state)
            except Exception as error:
                failure = error
        comm.check(failure, f"the syncdiffusion anchor of step {state.step_index}")
        image = comm.broadcast(image, owner, self._device)
        with torch.no_grad(), self._autocast():
            self._distance.set_anchor(image)
        self._anchor_step = state.step_index

    def update(self, latents: torch.Tensor, batch, state) -> torch.Tensor:
        """Return the batch's latents ``(B, C, h, w)`` after one synchronization step."""
        import torch

        if not self.synchronizes(state.step_index):
            return latents
        if torch.is_inference_mode_enabled():
            raise ConfigError("syncdiffusion needs autograd; do not run the job under torch.inference_mode()")
        rows = [b for b, window_id in enumerate(batch.window_ids) if window_id != self.anchor_id]
        if not rows and self._num_windows < 2:
            return latents
        self._prepare_anchor(batch, state)  # also for a batch of the anchor alone: it reuses the output
        if not rows:
            return latents
        weight = self.weight(state.step_index)
        updated = latents.clone()
        rows = self._moved_before(latents, updated, rows, batch, state)
        start = 0
        while start < len(rows):
            chunk = rows[start : start + self._chunk_size(len(rows) - start)]
            ids = [batch.window_ids[b] for b in chunk]
            grad = self._measured(lambda: self.gradient(latents[chunk], ids, batch.scheduler, state))
            updated[chunk] = latents[chunk] - weight * grad
            start += len(chunk)
        if batch.prompt_index is not None:  # region branches: the next branch reuses these
            for b in rows:
                self._moved[batch.window_ids[b]] = (latents[b].clone(), updated[b].clone())
        return updated

    def _moved_before(self, latents: torch.Tensor, updated: torch.Tensor, rows: list[int], batch, state) -> list[int]:
        """With region prompts every window comes once per branch, at this step mostly with
        the same latents (latent fusion) and the same loss (the window's own prompt): rows
        moved already this step at equal latents (compared exactly) are copied into
        ``updated``; returns the rows still to move."""
        import torch

        if self._moved_step != state.step_index:
            self._moved, self._moved_step = {}, state.step_index
        if batch.prompt_index is None or not self._moved or not self.reuse_region_moves:
            return rows
        left = []
        for b in rows:
            kept = self._moved.get(batch.window_ids[b])
            if kept is not None and torch.equal(kept[0], latents[b]):
                updated[b] = kept[1]
            else:
                left.append(b)
        return left

    def _prepare_anchor(self, batch, state) -> None:
        """Decode the anchor's foreseen image once per step and fix it in the loss."""
        import torch

        if self._anchor_step == state.step_index:
            return
        image = self._anchor_image(state.scheduler if state.scheduler is not None else batch.scheduler, state)
        with torch.no_grad(), self._autocast():
            self._distance.set_anchor(image)
        self._anchor_step = state.step_index

    def _anchor_image(self, scheduler: Any, state) -> torch.Tensor:
        """``sg[D(x̂0(x_t^a))]`` ``(1, 3, f·h, f·w)`` from the anchor's current noisy latents
        (cut from the canvas, or its own view with ``x0`` fusion)."""
        import torch

        latents = state.window_latents([self.anchor_id])
        with torch.no_grad(), self._autocast():
            output = state.model_output(latents, [self.anchor_id], scheduler)
            if self.reuse_anchor_output and self.options.autocast == "none" and hasattr(state, "remember_output"):
                state.remember_output([self.anchor_id], latents, output)  # its denoising step reuses it
            return self.decode(self.predicted_x0(latents, output, scheduler, state))

    def gradient(self, latents: torch.Tensor, window_ids: Sequence[int], scheduler: Any, state) -> torch.Tensor:
        """``∇_x Σ_k LPIPS(D(x̂0(x_k)), anchor)`` for window latents ``(B, C, h, w)``: each
        window's own gradient, since the windows of a batch do not interact. The graph is
        freed before returning."""
        import torch

        scale = self._loss_scale()
        with torch.enable_grad(), self._autocast(), self._checkpointing():
            x = latents.detach().requires_grad_(True)
            output = state.model_output(x, window_ids, scheduler)
            loss = self._distance(self.decode(self.predicted_x0(x, output, scheduler, state))).sum()
            (grad,) = torch.autograd.grad(loss * scale if scale != 1.0 else loss, x)
        grad = grad.float() / scale if scale != 1.0 else grad.float()
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteLatentsError(
                f"syncdiffusion: NaN or inf in the synchronization gradient at step {state.step_index} "
                f"(loss_scale {scale}); in float16 try a smaller loss_scale or autocast='bfloat16'"
            )
        return grad

    def predicted_x0(self, latents: torch.Tensor, output: torch.Tensor, scheduler: Any, state) -> torch.Tensor:
        """DDIM's x̂0 (Song et al. 2021, Eq. 12), clipped as DDIM does when ``clip_sample``."""
        x0 = state.predicted_x0(latents, output, scheduler)
        if scheduler.config.get("clip_sample", False):
            limit = float(scheduler.config.get("clip_sample_range", 1.0))
            x0 = x0.clamp(-limit, limit)
        return x0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``D``: canvas latents ``(B, C, h, w)`` → images ``(B, 3, f·h, f·w)`` clamped to
        [-1, 1] (float32, or float64 for a float64 decoder): the family's VAE decode, or the
        tiny autoencoder on ``latents / scaling_factor + shift_factor`` of its config."""
        import torch

        module = self._decoder
        if module is None:
            model = self._context.model
            vae = model.pipeline.vae
            images = vae.decode(model.to_vae_latents(latents).to(vae.dtype), return_dict=False)[0]
        else:
            shift = self._decoder_scale.get("shift_factor", None) or 0.0
            scaled = latents.to(module.dtype) / self._decoder_scale.scaling_factor + shift
            images = module.decode(scaled, return_dict=False)[0]
        return images.to(torch.promote_types(images.dtype, torch.float32)).clamp(-1.0, 1.0)

    def _decoder_module(self) -> torch.nn.Module:
        return self._decoder if self._decoder is not None else self._context.model.pipeline.vae

    # -- speed and memory ----------------------------------------------------------------

    def _autocast(self):
        import torch

        if self.options.autocast == "none":
            return nullcontext()
        return torch.autocast(self._device.type, dtype=getattr(torch, self.options.autocast))

    def _loss_scale(self) -> float:
        import torch

        if self.options.loss_scale is not None:
            return float(self.options.loss_scale)
        half = self.options.autocast == "float16" or self._context.dtype == torch.float16
        return HALF_LOSS_SCALE if half else 1.0

    @contextmanager
    def _checkpointing(self) -> Iterator[None]:
        modules = []
        if self.options.checkpoint_decoder:
            decoder = self._decoder_module()
            modules.append(getattr(decoder, "decoder", decoder))
        if self.options.checkpoint_unet:
            modules.append(self._context.model.denoiser_module)
        with _gradient_checkpointing(modules):
            yield

    def _chunk_size(self, remaining: int) -> int:
        """Windows in the next gradient pass: ``micro_batch``; on CUDA sized by the first
        (one-window) pass; on a CPU one window (exact either way: batching does not speed up
        CPU convolutions, and a larger pass allocates larger buffers, which the allocator
        hands back to the system and faults in again each pass); else the batch's rest."""
        if self.options.micro_batch is not None:
            return self.options.micro_batch
        if self._auto_micro is not None:
            return self._auto_micro
        if self._device.type == "cpu" and self.cpu_micro_batch is not None:
            return self.cpu_micro_batch
        return 1 if self._device.type == "cuda" else remaining

    def _measured(self, compute):
        """Run ``compute``; on CUDA with no micro-batch size yet, size it from this (one-window)
        pass: budget // (peak bytes above the memory in use before it), an upper bound."""
        import torch

        if self._device.type != "cuda" or self.options.micro_batch is not None or self._auto_micro is not None:
            return compute()
        budget = self._memory_budget()
        before = torch.cuda.memory_allocated(self._device)
        result = compute()
        peak = max(1, torch.cuda.max_memory_allocated(self._device) - before)
        self._auto_micro = max(1, int(budget // peak))
        return result

    def _memory_budget(self) -> float:
        import torch

        if self.options.memory_budget_gb is not None:
            return self.options.memory_budget_gb * 2**30
        free, _ = torch.cuda.mem_get_info(self._device)
        cached = torch.cuda.memory_reserved(self._device) - torch.cuda.memory_allocated(self._device)
        return 0.9 * (free + cached)


@contextmanager
def _gradient_checkpointing(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Turn on diffusers' per-block gradient checkpointing inside ``modules``, then restore."""
    saved = []
    for module in modules:
        for block in module.modules():
            if hasattr(block, "gradient_checkpointing"):
                saved.append((block, block.gradient_checkpointing, getattr(block, "_gradient_checkpointing_func", None)))
                block.gradient_checkpointing = True
                block._gradient_checkpointing_func = _checkpoint
    try:
        yield
    finally:
        for block, flag, func in saved:
            block.gradient_checkpointing = flag
            block._gradient_checkpointing_func = func


def _checkpoint(block: torch.nn.Module, *args: Any) -> Any:
    import torch

    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def _load_taesd(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers ``AutoencoderTiny`` from a local folder or hub id (frozen, eval). A local
    folder without ``config.json`` or weights, a missing local path and a hub id that is not
    cached while the hub is offline are each named as such, before diffusers is asked."""
    import os
    from pathlib import Path

    where = Path(path).expanduser()
    expected = "a local diffusers AutoencoderTiny folder (config.json + diffusion_pytorch_model.safetensors)"
    problem = None
    if where.is_dir():
        files = {p.name for p in where.iterdir()}
        missing = [name for name in ("config.json",) if name not in files]
        if not any(name.endswith((".safetensors", ".bin")) for name in files):
            missing.append("diffusion_pytorch_model.safetensors")
        if missing:
            problem = f"the folder has no {' and no '.join(missing)}"
    elif where.exists() or path.startswith((".", "/", "~")):
        problem = "no such folder" if not where.exists() else "it is a file, not a folder"
    if problem is not None:
        raise ModelLoadError(f"syncdiffusion: taesd_path = {path!r}: {problem}; pass {expected}")
    from diffusers import AutoencoderTiny

    try:
        module = AutoencoderTiny.from_pretrained(path, torch_dtype=dtype)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        if offline and not where.exists():
            raise ModelLoadError(
                f"syncdiffusion: taesd_path = {path!r} is a hub id, and it is not in the local Hugging Face cache "
                f"while the hub is offline (HF_HUB_OFFLINE=1); download it on a connected machine or pass {expected}"
            ) from error
        raise ModelLoadError(
            f"syncdiffusion: could not load TAESD from taesd_path = {path!r} ({reason}); pass {expected} "
            f"or, online, the hub id {DEFAULT_TAESD!r}"
        ) from error
    return module.eval().requires_grad_(False)


@hookimpl
def register_synchronizers(register):
    register(SyncDiffusion)

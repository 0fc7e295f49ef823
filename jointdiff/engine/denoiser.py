"""One batched model evaluation for a group of windows: guidance, conditioners, x̂0.

The canvas is kept in float32 (fusion sums many windows); the model runs in the job's dtype.
Everything model-specific is asked of the job's :class:`~jointdiff.core.family.ModelFamily`.

Exact speed-ups kept here (each gives the result of the path it replaces, to float rounding):

- a per-step cache of model outputs (:meth:`Denoiser.remember`, filled by a synchronizer
  through :meth:`~jointdiff.core.context.StepState.remember_output`): SyncDiffusion evaluates the
  anchor without gradient at the latents and timestep of its denoising step, so that step
  reuses the output instead of a second forward (:meth:`Denoiser.step_output`);
- embedding rows, guidance weights and offsets of a window batch are laid out once per job;
- :func:`accelerated`: optional ``torch.compile`` of the denoiser module, channels-last and
  SDPA attention on CUDA, for the duration of a job;
- :func:`auto_view_batch_size`: ``view_batch_size = "auto"`` sized from the free device memory.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from jointdiff.core.family import Embeddings, first_parameter
from jointdiff.cost import budget

if TYPE_CHECKING:
    from jointdiff.core.conditioner import Conditioner, Prompt
    from jointdiff.core.context import JobContext


class Denoiser:
    """Evaluates the model on a window batch with guidance batched in.

    With classifier-free guidance the batch is ``[uncond_1..uncond_B, cond_1..cond_B]``
    (diffusers' order for a single prompt), so one model call serves all windows of the batch
    and both branches. Guidance-distilled families get the scale as a model input instead.
    """

    def __init__(self, context: JobContext, prompt: Prompt, conditioners: Sequence[Conditioner], offsets=None) -> None:
        self.context = context
        self.model = context.model
        self.prompt = prompt
        self.conditioners = list(conditioners)
        self.offsets = offsets
        self._embeds = prompt.embeds.to(device=context.device, dtype=context.dtype)
        negative = prompt.negative_embeds
        self._negative = negative.to(device=context.device, dtype=context.dtype) if negative is not None else None
        self._distilled = self.model.guidance_mode == "distilled"
        self._rows_cache: dict[tuple, Any] = {}  # per window batch: rows, scale, offsets; guidance weights
        self._outputs: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reused_rows = 0
        """How many window rows :meth:`step_output` took from the cache (this job)."""

    def _prompt_indices(self, window_ids: Sequence[int], prompt_index: int | None) -> list[int]:
        if prompt_index is not None:
            return [prompt_index] * len(window_ids)
        return self.prompt.indices(window_ids)

    def _rows(self, window_ids: Sequence[int], prompt_index: int | None = None):
        """Embedding rows (guidance branches first-uncond), embedded guidance ``(B,)`` and
        window offsets for the batch (cached: batches are fixed for the whole job)."""
        key = (tuple(window_ids), prompt_index)
        if key not in self._rows_cache:
            index = self._prompt_indices(window_ids, prompt_index)
            rows = self._embeds.select(index)
            if self.prompt.uses_guidance:
                rows = Embeddings.cat([self._negative.select(index), rows])
            scale = None
            if self._distilled:
                scale = torch.as_tensor(self.prompt.guidance_scale, dtype=torch.float32)
                scale = scale[torch.tensor(index)] if scale.ndim else scale.expand(len(index))
                scale = scale.to(self.context.device)
            offsets = None
            if self.offsets is not None:
                offsets = self.offsets[list(window_ids)]  # on the CPU: families read them without a sync
                if self.prompt.uses_guidance:
                    offsets = torch.cat([offsets, offsets])
            self._rows_cache[key] = (rows, scale, offsets)
        return self._rows_cache[key]

    def model_output(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        window_ids: Sequence[int],
        scheduler,
        prompt_index: int | None = None,
    ) -> torch.Tensor:
        """Guided model output (ε, v or flow velocity) for window latents ``(B, C, h, w)``;
        returns float32 ``(B, C, h, w)``. ``prompt_index`` forces one prompt for all windows
        (a region branch)."""
        guided = self.prompt.uses_guidance
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = self.model.scale_model_input(model_input, timestep, scheduler)
        rows, scale, offsets = self._rows(window_ids, prompt_index)
        extra = {}
        for conditioner in self.conditioners:
            call = {"guidance_scale": scale, "offsets": offsets} if _takes_call_inputs(conditioner) else {}
            extra.update(conditioner.model_kwargs(model_input, timestep, rows, window_ids, self.context, **call))
        output = self.model.forward(model_input, timestep, rows, guidance_scale=scale, offsets=offsets, extra=extra)
        if guided:
            uncond, cond = output.chunk(2)
            weights = self._guidance_weights(window_ids, prompt_index, output.device)
            output = self.model.combine_guidance(uncond, cond, weights)
        return output

    def _guidance_weights(self, window_ids: Sequence[int], prompt_index: int | None, device: torch.device):
        """The guidance scale of each row ``(B, 1, 1, 1)`` on ``device``, or one float
        (cached: batches are fixed for the whole job, so no copy to the device per call)."""
        key = ("guidance", tuple(window_ids), prompt_index, str(device))  # cleared with the rows
        if key not in self._rows_cache:
            weights = self.prompt.scales(self._prompt_indices(window_ids, prompt_index))
            self._rows_cache[key] = weights.to(device) if isinstance(weights, torch.Tensor) else weights
        return self._rows_cache[key]

    # -- outputs computed once per step ----------------------------------------------------

    def _output_keys(self, step_index: int, window_ids: Sequence[int], prompt_index: int | None) -> list[tuple]:
        """``(step, window, prompt)`` of each row: the prompt a row is evaluated with (the
        branch's, or the window's own), so a row evaluated without a branch matches the
        branch that uses the same prompt."""
        return [(step_index, int(w), p) for w, p in zip(window_ids, self._prompt_indices(window_ids, prompt_index))]

    def remember(self, step_index: int, window_ids: Sequence[int], latents: torch.Tensor, output: torch.Tensor,
                 prompt_index: int | None = None) -> None:
        """Keep the guided ``output`` ``(B, C, h, w)`` that :meth:`model_output` gave for
        ``latents`` ``(B, C, h, w)`` of ``window_ids`` at step ``step_index`` (without
        autocast), for :meth:`step_output` of the same step. Entries of other steps are dropped."""
        self._outputs = {k: v for k, v in self._outputs.items() if k[0] == step_index}
        for row, key in enumerate(self._output_keys(step_index, window_ids, prompt_index)):
            self._outputs[key] = (latents[row : row + 1].detach().clone(), output[row : row + 1].detach().float())

    def step_output(self, latents: torch.Tensor, timestep: torch.Tensor, window_ids: Sequence[int], scheduler,
                    prompt_index: int | None = None, step_index: int | None = None) -> torch.Tensor:
        """:meth:`model_output` for a batch's denoising step ``step_index``: rows remembered
        for this step at equal latents (compared exactly) are reused, the others computed in
        one call. Equal to :meth:`model_output` of the whole batch to float rounding."""
        hits = self._remembered(latents, window_ids, prompt_index, step_index)
        if not hits:
            return self.model_output(latents, timestep, window_ids, scheduler, prompt_index)
        rest = [row for row in range(len(window_ids)) if row not in hits]
        parts = dict(hits)
        if rest:
            computed = self.model_output(latents[rest], timestep, [window_ids[r] for r in rest], scheduler, prompt_index)
            parts.update(zip(rest, computed.split(1)))
        self.reused_rows += len(hits)
        return torch.cat([parts[row].to(latents.device) for row in range(len(window_ids))])

    def _remembered(self, latents: torch.Tensor, window_ids: Sequence[int], prompt_index: int | None,
                    step_index: int | None) -> dict[int, torch.Tensor]:
        """Row → remembered output ``(1, C, h, w)`` for the rows of ``latents`` that equal
        what was remembered for them at this step (the entries are used up)."""
        hits: dict[int, torch.Tensor] = {}
        if not self._outputs or step_index is None:
            return hits
        for row, key in enumerate(self._output_keys(step_index, window_ids, prompt_index)):
            kept = self._outputs.get(key)
            current = latents[row : row + 1]
            if kept is not None and kept[0].shape == current.shape and torch.equal(kept[0], current):
                hits[row] = self._outputs.pop(key)[1]
        return hits

    def predicted_x0(self, latents: torch.Tensor, model_output: torch.Tensor, timestep: torch.Tensor, scheduler) -> torch.Tensor:
        """The clean latent x̂0 predicted from ``latents`` (see the family's ``predicted_x0``)."""
        return self.model.predicted_x0(latents, model_output, timestep, scheduler)

    def output_from_x0(self, latents: torch.Tensor, x0: torch.Tensor, timestep: torch.Tensor, scheduler) -> torch.Tensor:
        """The model output that would have predicted ``x0`` from ``latents`` (the inverse of
        :meth:`predicted_x0`): lets any scheduler step with an x̂0 fused across windows."""
        return self.model.output_from_x0(latents, x0, timestep, scheduler)


@functools.lru_cache(maxsize=None)
def _takes_call_inputs_of(cls: type) -> bool:
    parameters = inspect.signature(cls.model_kwargs).parameters
    return {"guidance_scale", "offsets"} <= set(parameters) or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _takes_call_inputs(conditioner) -> bool:
    """Whether ``conditioner.model_kwargs`` takes ``guidance_scale`` and ``offsets`` (an
    override written before they existed may not)."""
    return _takes_call_inputs_of(type(conditioner))


# -- model-call speed-ups for a job ---------------------------------------------------------

AUTO_VIEW_BATCH_CPU = 4
"""``view_batch_size = "auto"`` off CUDA: the engine's default batch."""
AUTO_MEMORY_SHARE = 0.5
"""Share of the free CUDA memory ``"auto"`` spends on one window batch's activations; the rest
is left to the synchronizer's gradient pass, the decoder and the allocator's fragmentation."""
_COMPILED: dict[str, Any] = {}
"""``torch.compile``-d ``Module._call_impl`` per backend."""


def auto_view_batch_size(model, geometry, conditioners: Sequence[Any] = (), free_bytes: int | None = None) -> int:
    """Windows per model call for ``view_batch_size = "auto"``: on CUDA, as many as fit
    :data:`AUTO_MEMORY_SHARE` of the free memory (``torch.cuda.mem_get_info`` plus what the
    allocator holds unused, or ``free_bytes``) at :func:`jointdiff.cost.budget.activation_bytes` per
    window; elsewhere :data:`AUTO_VIEW_BATCH_CPU`. Between 1 and the number of windows.
    Results do not depend on it (noise is keyed per window)."""
    if getattr(geometry, "latent_format", None) != model.latent_format:
        geometry.setup(model.latent_format)
    device = torch.device(model.device)
    if free_bytes is None and device.type != "cuda":
        return max(1, min(AUTO_VIEW_BATCH_CPU, geometry.num_windows))
    _, rows = budget.prompt_shape(conditioners, model)
    per_window = budget.activation_bytes(model, geometry.window_size_latent, rows)
    if not per_window:
        return max(1, min(AUTO_VIEW_BATCH_CPU, geometry.num_windows))
    if free_bytes is None:
        free, _ = torch.cuda.mem_get_info(device)
        free_bytes = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, min(geometry.num_windows, int(AUTO_MEMORY_SHARE * free_bytes // per_window)))


@contextmanager
def accelerated(model, compile: bool | str = False) -> Iterator[None]:
    """The denoiser module of ``model`` (a model family) set up for speed during a job, then
    put back as it was: ``compile`` (True: ``torch.compile``'s default backend, a string: that
    backend) compiles the module's call for fixed shapes (``dynamic=False``: one graph per
    window-batch shape, with and without gradient); on CUDA only, conv-heavy modules (UNets)
    run channels-last and classic attention processors are swapped for SDPA
    (``AttnProcessor2_0``; diffusers' default already, this catches modules set otherwise).
    Modules under accelerate's CPU offload are left alone. Same results to float rounding."""
    module = model.denoiser_module
    with ExitStack() as stack:
        if compile:
            stack.enter_context(_compiled(module, "inductor" if compile is True else str(compile)))
        device = first_parameter(module).device
        if device.type == "cuda" and not hasattr(module, "_hf_hook"):
            if _conv_heavy(module):
                stack.enter_context(_channels_last(module))
            stack.enter_context(_sdpa(module))
        yield


@contextmanager
def _compiled(module: torch.nn.Module, backend: str) -> Iterator[None]:
    """``module``'s call through ``torch.compile`` for the job (as ``Module.compile`` does,
    then undone). One compiled function per backend serves every module and job, so a
    second job reuses the graphs (dynamo guards on the module and the input shapes)."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(torch.nn.Module._call_impl, backend=backend, dynamic=False)
    previous = module._compiled_call_impl
    module._compiled_call_impl = functools.partial(_COMPILED[backend], module)
    try:
        yield
    finally:
        module._compiled_call_impl = previous


def _conv_heavy(module: torch.nn.Module) -> bool:
    """Whether most of ``module``'s parameters are 2-d convolutions (a UNet, not a transformer)."""
    conv = sum(p.numel() for m in module.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters(recurse=False))
    return conv * 2 > sum(p.numel() for p in module.parameters())


@contextmanager
def _channels_last(module: torch.nn.Module) -> Iterator[None]:
    """``module`` channels-last, then contiguous again (unless it was channels-last before)."""
    kernels = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-2:] != (1, 1)]
    if not kernels or kernels[0].is_contiguous(memory_format=torch.channels_last):
        yield
        return
    module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


@contextmanager
def _sdpa(module: torch.nn.Module) -> Iterator[None]:
    """Classic ``AttnProcessor`` instances swapped for ``AttnProcessor2_0`` (SDPA)."""
    processors = getattr(module, "attn_processors", None)
    if not isinstance(processors, dict):
        yield
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if not any(type(p) is AttnProcessor for p in processors.values()):
        yield
        return
    module.set_attn_processor({k: AttnProcessor2_0() if type(p) is AttnProcessor else p for k, p in processors.items()})
    try:
        yield
    finally:
        module.set_attn_processor(dict(processors))

"""Objects the engine hands to plugins: the job context, window batches, the step state.

Randomness is keyed, not streamed: a plugin that needs noise asks
:meth:`JobContext.generator_for` (or :meth:`StepState.generator_for`) for a generator seeded
from the job's seed and keys naming what the noise belongs to (a purpose, a step, a window,
a region branch). The same keys give the same numbers whatever the batch size, the order in
which batches run, the number of ranks, or whether the job was interrupted and resumed.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from jointdiff.core.family import ModelFamily

if TYPE_CHECKING:
    from jointdiff.core.geometry import Geometry
    from jointdiff.engine.denoiser import Denoiser
    from jointdiff.engine.distributed import Distributed

SEED_MASK = 2**63 - 1


def derive_seed(seed: int, purpose: str, *keys: int | str | None) -> int:
    """A 63-bit seed from the job's ``seed``, a ``purpose`` and ``keys`` (ints, strings or
    None), the same in every process and on every platform (BLAKE2b of their text)."""
    if not isinstance(purpose, str) or not purpose:
        raise ValueError(f"purpose must be a non-empty string, got {purpose!r}")
    parts = [str(int(seed)), purpose]
    for index, key in enumerate(keys):
        if isinstance(key, bool) or not (key is None or isinstance(key, (str, numbers.Integral))):
            raise TypeError(f"generator key {index} ({key!r}) must be an int, a string or None")
        parts.append("~" if key is None else f"{type(key).__name__ if isinstance(key, str) else 'int'}:{key}")
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & SEED_MASK


def keyed_generator(seed: int, purpose: str, *keys: int | str | None) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with :func:`derive_seed` (draw on the CPU and
    move: the numbers do not depend on the device)."""
    return torch.Generator("cpu").manual_seed(derive_seed(seed, purpose, *keys))


@dataclass
class JobContext:
    """What plugins may use during :meth:`setup` and inside the loop.

    ``model`` is the job's :class:`~jointdiff.core.family.ModelFamily` (prompt encoding,
    x̂0 math, decode and encode, ControlNet calls); plugins ask it and never the diffusers
    pipeline's components. ``dtype`` is the denoiser's compute dtype. ``seed`` is the job's
    seed (by default ``generator``'s); draw noise from :meth:`generator_for`, never from
    ``generator`` (a stream: what it gives depends on who drew before). ``distributed`` is
    the job's :class:`~jointdiff.engine.distributed.Distributed` with window parallelism, else None.
    ``initial_noise`` is the job's initial canvas noise ``(S, C, H, W)``, float32, unit
    variance (before ``initial_noise_sigma``), set by the engine before the first step.
    ``init_image``: the job's init image (a :class:`~jointdiff.image.init_image.PreparedInit`:
    clean latents, keep mask on the latent grid, first step), set before plugins' ``setup``;
    None for text-to-image.
    ``extras``: free for plugins' own use (deprecated as a channel to the engine).
    """

    model: ModelFamily
    geometry: Geometry
    device: torch.device
    dtype: torch.dtype
    num_inference_steps: int
    generator: torch.Generator
    extras: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    distributed: Distributed | None = None
    initial_noise: torch.Tensor | None = None
    init_image: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelFamily):
            raise TypeError(
                f"JobContext(model=...) takes a ModelFamily, got {type(self.model).__name__}: "
                "bind a diffusers pipeline with jointdiff.models.as_model(pipeline)"
            )
        if self.seed is None:
            self.seed = self.generator.initial_seed() if self.generator is not None else 0

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline behind :attr:`model` (for plugins that need a component)."""
        return self.model.pipeline

    def generator_for(self, purpose: str, *keys: int | str | None) -> torch.Generator:
        """A fresh CPU generator keyed by the job's seed, ``purpose`` (e.g. the plugin's name
        and what the noise is for) and ``keys`` (e.g. step index, window id, region branch)."""
        return keyed_generator(self.seed, purpose, *keys)


@dataclass
class WindowBatch:
    """A fixed group of windows denoised together, with its own scheduler copy.

    Multistep schedulers (DPM-Solver++, UniPC) keep a history of model outputs; each batch
    owns a deep copy so no state leaks between windows (the history is per-row math, so the
    batch's composition does not change any window's result).
    """

    index: int
    window_ids: tuple[int, ...]
    scheduler: Any
    prompt_index: int | None = None
    """With region prompts: the prompt (branch) every window of this batch is denoised with."""
    generator: torch.Generator | None = None
    """Unused by the engine (noise is keyed per window: :meth:`JobContext.generator_for`);
    kept for plugins written against older versions."""

    def __len__(self) -> int:
        return len(self.window_ids)


@dataclass
class StepState:
    """The state of one denoising step, given to synchronizers and ``modify_latents``.

    Read ``step_index``, ``timestep`` (0-d, on the CPU), ``num_steps``, ``canvas`` (the canvas
    at the start of the step: noisy latents with ``latent`` fusion, the last fused x̂0 with
    ``x0`` fusion; never modify it in place) and ``context``; use the methods below for
    everything else. ``scheduler`` is a copy of the scheduler positioned at this step (for
    windows outside the current batch, e.g. an anchor; do not step it). ``denoiser`` and
    ``fusion`` are engine internals: use :meth:`model_output`, :meth:`predicted_x0` and
    :meth:`window_latents` instead.
    """

    step_index: int
    timestep: torch.Tensor
    num_steps: int
    canvas: torch.Tensor
    denoiser: Denoiser | None
    context: JobContext
    fusion: Any = None
    scheduler: Any = None

    def window_latents(self, window_ids: Sequence[int]) -> torch.Tensor:
        """Noisy latents ``(B, C, h, w)`` (float32) of the given windows at this step."""
        if self.fusion is None:  # a StepState built by hand: the canvas holds noisy latents
            return self.context.geometry.extract(self.canvas, list(window_ids))
        return self.fusion.latents_of(window_ids)

    def model_output(self, latents: torch.Tensor, window_ids: Sequence[int], scheduler: Any = None,
                     prompt_index: int | None = None) -> torch.Tensor:
        """The guided model output ``(B, C, h, w)`` (float32: ε, v or flow velocity) for window
        latents ``(B, C, h, w)`` at this step, with every conditioner's model inputs.
        ``scheduler``: the batch's copy (default :attr:`scheduler`); ``prompt_index``: one
        region branch for all windows. Differentiable."""
        return self.denoiser.model_output(latents, self.timestep, list(window_ids), self._scheduler(scheduler), prompt_index)

    def predicted_x0(self, latents: torch.Tensor, output: torch.Tensor, scheduler: Any = None) -> torch.Tensor:
        """The clean latents x̂0 ``(B, C, h, w)`` predicted from ``latents`` and a model
        ``output`` at this step (the family's Tweedie estimate)."""
        return self.context.model.predicted_x0(latents, output, self.timestep, self._scheduler(scheduler))

    def remember_output(self, window_ids: Sequence[int], latents: torch.Tensor, output: torch.Tensor,
                        prompt_index: int | None = None) -> None:
        """Offer the engine a :meth:`model_output` ``(B, C, h, w)`` computed at this step,
        without autocast, for ``latents`` ``(B, C, h, w)`` of ``window_ids``: a window whose
        denoising step this step sees exactly these latents (same prompt) reuses it instead
        of a second forward (e.g. SyncDiffusion's anchor). Kept for this step only."""
        if self.denoiser is not None and hasattr(self.denoiser, "remember"):
            self.denoiser.remember(self.step_index, list(window_ids), latents, output, prompt_index)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Canvas latents ``(B, C, h, w)`` → pixels ``(B, 3, f·h, f·w)`` in [-1, 1]
        (float32), through the model's VAE; differentiable."""
        return self.context.model.decode(latents)

    def generator_for(self, purpose: str, *keys: int | str | None) -> torch.Generator:
        """:meth:`JobContext.generator_for`; include :attr:`step_index` in ``keys`` for
        noise that changes every step."""
        return self.context.generator_for(purpose, *keys)

    @property
    def distributed(self) -> Distributed | None:
        """The job's window parallelism, or None in a single process."""
        return self.context.distributed

    @property
    def initial_noise(self) -> torch.Tensor | None:
        """The job's initial canvas noise ``(S, C, H, W)`` (unit variance), or None when
        this state was not made by the engine."""
        return self.context.initial_noise

    def _scheduler(self, scheduler: Any) -> Any:
        chosen = scheduler if scheduler is not None else self.scheduler
        if chosen is None:
            raise ValueError("this StepState has no scheduler; pass the batch's scheduler (batch.scheduler)")
        return chosen

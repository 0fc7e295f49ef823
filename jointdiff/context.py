"""Objects the engine hands to plugins: the job context, window batches, the step state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .denoiser import Denoiser
    from .families.base import ModelFamily
    from .geometry import Geometry


@dataclass
class JobContext:
    """What plugins may use during :meth:`setup` and inside the loop.

    ``model`` is the job's :class:`~jointdiff.families.base.ModelFamily` (prompt encoding,
    x̂0 math, decode and encode, ControlNet calls); plugins ask it and never the diffusers
    pipeline's components. ``dtype`` is the denoiser's compute dtype.
    """

    model: ModelFamily
    geometry: Geometry
    device: torch.device
    dtype: torch.dtype
    num_inference_steps: int
    generator: torch.Generator
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .families.base import ModelFamily

        if not isinstance(self.model, ModelFamily):  # a diffusers pipeline: bind its family
            from .models import as_model

            self.model = as_model(self.model)

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline behind :attr:`model` (for plugins that need a component)."""
        return self.model.pipeline


@dataclass
class WindowBatch:
    """A fixed group of windows denoised together, with its own scheduler copy.

    Multistep schedulers (DPM-Solver++, UniPC) keep a history of model outputs; each batch
    owns a deep copy so no state leaks between windows.
    """

    index: int
    window_ids: tuple[int, ...]
    scheduler: Any
    prompt_index: int | None = None
    """With region prompts: the prompt (branch) every window of this batch is denoised with."""
    generator: torch.Generator | None = None
    """Noise for stochastic schedulers, seeded per batch."""

    def __len__(self) -> int:
        return len(self.window_ids)


@dataclass
class StepState:
    """The state of one denoising step, given to synchronizers.

    ``canvas`` is the canvas at the start of the step (noisy latents with ``latent`` fusion,
    the last fused x̂0 with ``x0`` fusion); :meth:`window_latents` gives the current noisy
    latents of any windows in either mode.
    """

    step_index: int
    timestep: torch.Tensor
    num_steps: int
    canvas: torch.Tensor
    denoiser: Denoiser
    context: JobContext
    fusion: Any = None

    def window_latents(self, window_ids) -> torch.Tensor:
        """Noisy latents ``(B, C, h, w)`` of the given windows at this step."""
        return self.fusion.latents_of(window_ids)

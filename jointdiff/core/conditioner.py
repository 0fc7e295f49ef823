"""The Conditioner interface: per-window model conditioning.

A conditioner is set up once per job (encode prompts, load a ControlNet, ...). It contributes
either *prompts* (text embeddings with a guidance scale; the text conditioner) or extra
keyword arguments for the model call of a window batch (e.g. ControlNet residuals), or both.
The engine batches windows and classifier-free guidance together; a conditioner receives the
batch's window ids and must return tensors whose batch dimension matches.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from jointdiff.core.family import Embeddings
from jointdiff.core.options import Configurable
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from jointdiff.core.context import JobContext, StepState, WindowBatch


@dataclass
class Prompt:
    """Encoded text conditioning.

    ``embeds`` and ``negative_embeds`` are :class:`~jointdiff.core.family.Embeddings` of
    ``P`` rows, as the model family encoded them (a bare ``(P, L, D)`` tensor is taken as
    ``prompt_embeds``); ``negative_embeds`` is None without classifier-free guidance. By default every
    window uses prompt 0; ``window_prompt`` maps a window id to its prompt index (e.g. one
    prompt per texture tile). With ``region_masks`` ``(P, S, 1, H, W)`` (latent resolution,
    values in [0, 1]), every window is denoised once per prompt and each result enters the
    fusion weighted by its prompt's mask (MultiDiffusion, Bar-Tal et al. 2023, Sec. 4.2).
    ``guidance_scale`` as in classifier-free guidance (Ho & Salimans 2022):
    ``eps = eps_u + g (eps_c - eps_u)``; no unconditional batch when ``g <= 1`` (as
    diffusers). A tensor ``(P,)`` gives each prompt its own scale.
    """

    embeds: Embeddings | torch.Tensor
    negative_embeds: Embeddings | torch.Tensor | None
    guidance_scale: float | torch.Tensor
    window_prompt: Callable[[int], int] | None = None
    region_masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        import torch

        if isinstance(self.embeds, torch.Tensor):
            self.embeds = Embeddings({"prompt_embeds": self.embeds})
        if isinstance(self.negative_embeds, torch.Tensor):
            self.negative_embeds = Embeddings({"prompt_embeds": self.negative_embeds})
        if self.region_masks is not None:
            if self.window_prompt is not None:
                raise ValueError("a Prompt takes either window_prompt or region_masks, not both")
            if self.region_masks.ndim != 5 or self.region_masks.shape[0] != len(self.embeds):
                raise ValueError(
                    f"region_masks must be (P, S, 1, H, W) with P = {len(self.embeds)} prompts, "
                    f"got {tuple(self.region_masks.shape)}"
                )

    @property
    def branches(self) -> list[int | None]:
        """Prompt index of each branch: every window is denoised once per region prompt
        (MultiDiffusion's region-based generation), or once with its own prompt."""
        return list(range(len(self.embeds))) if self.region_masks is not None else [None]

    @property
    def uses_guidance(self) -> bool:
        """Whether an unconditional (negative) branch is batched with the windows."""
        import torch

        return self.negative_embeds is not None and bool(torch.as_tensor(self.guidance_scale).max() > 1.0)

    def scales(self, indices: Sequence[int]) -> float | torch.Tensor:
        """Guidance scale per window ``(B, 1, 1, 1)``, or one float for all."""
        import torch

        if not isinstance(self.guidance_scale, torch.Tensor):
            return self.guidance_scale
        return self.guidance_scale[torch.tensor(indices)].view(-1, 1, 1, 1).float()

    def indices(self, window_ids: Sequence[int]) -> list[int]:
        """Prompt index of each window."""
        if self.window_prompt is None:
            return [0] * len(window_ids)
        return [self.window_prompt(i) for i in window_ids]


class Conditioner(Configurable, ABC):
    """Base class of every conditioner plugin.

    Results must not depend on batching, batch order, ranks or resume: draw noise from
    :meth:`~jointdiff.core.context.StepState.generator_for` keyed by what it belongs to (step,
    window, region branch), and expose state that outlives a step with :meth:`state_dict`.
    """

    one_per_job: ClassVar[bool] = False
    """Whether a job takes at most one instance of this class (e.g. ``controlnet``, whose
    several ControlNets go in its own list); the engine refuses a second one."""

    def setup(self, context: JobContext) -> None:
        """Called once per job after the model is loaded (encode prompts, move models)."""

    def check_canvas(self, geometry: Any) -> None:
        """Called when a job is checked, before any model loads, with the job's geometry set
        up (for the model family's latent format where it is known, SD's otherwise): raise a
        one-line ConfigError for options that cannot fit this canvas (a region outside it, a
        mask of another size). Arithmetic and file headers only: no model, no torch. Default:
        nothing to check."""

    def geometry_maps(self) -> tuple[str, ...]:
        """Names of the geometry's per-window maps (:attr:`Geometry.window_maps
        <jointdiff.core.geometry.Geometry.window_maps>`, e.g. ``"depth"``) this conditioner
        will ask for; the job checks them against its geometry before any model loads
        (:func:`check_geometry_maps`). Default: none."""
        return ()

    def prompt(self) -> Prompt | None:
        """The prompt this conditioner provides, or None. Exactly one per job provides one."""
        return None

    def modify_latents(self, latents: torch.Tensor, batch: WindowBatch, state: StepState) -> torch.Tensor:
        """Change a batch's window latents before the UNet (e.g. MultiDiffusion's
        bootstrapping of region branches). Default: unchanged."""
        return latents

    def model_kwargs(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        embeds: Embeddings,
        window_ids: Sequence[int],
        context: JobContext,
        guidance_scale: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Extra keyword arguments of the model call for one window batch (``(B', C, h, w)``
        input and ``B'`` rows of ``embeds``, ``B'`` = windows × guidance branches), passed to
        :meth:`~jointdiff.core.family.ModelFamily.forward` as ``extra`` (e.g. ControlNet
        residuals). ``guidance_scale`` ``(B',)`` (guidance-distilled families) and ``offsets``
        ``(B', 2)`` (``positions = "canvas"``) are what the model call gets; an override may
        leave them out of its signature. Default: none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State that outlives a step, saved in checkpoints: tensors and plain containers
        (dicts, lists, numbers, strings, None) only. Default: none (stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, after :meth:`setup`, on resume."""


def check_geometry_maps(geometry: Any, conditioners: Sequence[Conditioner]) -> None:
    """ConfigError, one line, for the first map a conditioner asks for (:meth:`Conditioner.geometry_maps`)
    that ``geometry`` does not render (``geometry.window_maps``), naming what it renders.
    Needs only the classes' options, so a job runs it before any model loads."""
    renders = tuple(getattr(geometry, "window_maps", ()))
    for conditioner in conditioners:
        asks = getattr(conditioner, "geometry_maps", None)  # duck-typed conditioners ask for none
        for name in asks() if callable(asks) else ():
            if name not in renders:
                what = ", ".join(map(repr, renders)) if renders else "no per-window maps"
                raise ConfigError(
                    f"{getattr(conditioner, 'name', type(conditioner).__name__)}: image = {name!r} is a map the "
                    f"geometry renders per window, but geometry {geometry.name!r} renders {what}"
                )


def encode_text(
    context: JobContext,
    prompts: Sequence[str],
    negative_prompts: Sequence[str | None],
    guidance_scale: float | None,
    owner: str,
) -> tuple[Embeddings, Embeddings | None, float]:
    """Encode ``P`` prompts with the job's model family, the one way every prompt conditioner
    does it. Returns the embeddings, the negative embeddings (None when the family runs no
    unconditional branch for this scale and these negatives) and the guidance scale used
    (``guidance_scale``, or the family's default when None). Guidance the family does not
    have is a ConfigError naming ``owner``."""
    import torch

    model = context.model
    scale = model.default_guidance_scale if guidance_scale is None else float(guidance_scale)
    for negative in negative_prompts:
        model.check_guidance(guidance_scale, negative, owner)
    cfg = any(model.uses_cfg(scale, negative) for negative in negative_prompts)
    with torch.no_grad():
        negatives = [n if n is not None or model.absent_negative_differs else "" for n in negative_prompts]
        embeds, negative = model.encode_prompts(list(prompts), negatives if cfg else None)
    return embeds, negative, scale

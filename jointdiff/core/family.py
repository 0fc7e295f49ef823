"""The model layer: one interface for every model family (SD 1.x/2.x, SDXL, SD3, FLUX, ...).

A :class:`ModelFamily` is bound to one loaded diffusers pipeline and owns everything that
depends on the model: prompt encoding, guidance, the model call on a batch of windows, the
noise-schedule math, the latent format and the VAE. The engine, fusion, geometries,
conditioners and synchronizers ask it and never branch on which family it is (the design of
k-diffusion's denoiser wrappers and of ComfyUI's latent formats / model sampling).

Tensor conventions: window latents are ``(B, C, h, w)`` float32 in the family's *canvas
latent space* (already scaled/normalised the way the family's pipeline feeds its denoiser,
unpacked: transformer families pack and unpack tokens inside :meth:`ModelFamily.forward`);
pixels are ``(B, 3, H_px, W_px)`` in [-1, 1]; sizes are ``(h, w)``.

Families are plugins: a package registers its classes with the ``register_families`` hook
(see :mod:`jointdiff.core.hookspecs`), exactly as the built-in ones are registered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Sequence

from jointdiff.core.options import Configurable, PluginOptions
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch

GuidanceMode = Literal["cfg", "distilled", "none"]
"""How a family is guided: ``cfg`` (classifier-free guidance, Ho & Salimans 2022: an
unconditional/negative branch batched with the windows), ``distilled`` (the guidance scale is
an input of the model, FLUX.1-dev / FLUX.2; no negative prompt), ``none`` (few-step
distilled models: FLUX.1-schnell, turbo; the scale is ignored and must not be set)."""


@dataclass(frozen=True)
class LatentFormat:
    """Facts about a family's latent canvas, known before the model loads.

    ``channels``: latent channels of the canvas. ``scale_factor``: pixels per latent cell.
    ``patch``: windows, strides and canvas sides are whole multiples of this many cells
    (transformers with 2×2 patches). ``native_window``: the side, in cells, of the images the
    model was trained on (the default window). ``min_window`` / ``max_window``: the window
    sides (cells) the model accepts.
    """

    channels: int
    scale_factor: int = 8
    patch: int = 1
    native_window: int = 64
    min_window: int = 8
    max_window: int = 512

    def check_window(self, size: int, what: str, owner: str) -> None:
        """Raise ConfigError naming ``owner``'s option ``what`` when ``size`` (cells) does not fit."""
        if size % self.patch:
            raise ConfigError(
                f"{owner}: {what} = {size} latent cells is not a whole number of {self.patch}×{self.patch} patches"
            )
        if not self.min_window <= size <= self.max_window:
            raise ConfigError(
                f"{owner}: {what} = {size} latent cells is outside what the model takes "
                f"({self.min_window}..{self.max_window}; native {self.native_window})"
            )


SD_LATENT = LatentFormat(channels=4, scale_factor=8, patch=1, native_window=64)
"""SD 1.x/2.x: the default for geometries set up without a model."""


class Embeddings:
    """Encoded prompts: named tensors that share a leading batch dimension ``P``.

    Which names exist is the family's business (``prompt_embeds``, ``pooled_prompt_embeds``,
    attention masks, ...); the engine only selects, concatenates and moves rows. Sequences of
    different prompts are padded by the family to one length (with a mask where it matters).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        sizes = {name: t.shape[0] for name, t in tensors.items()}
        if not tensors or len(set(sizes.values())) != 1:
            raise ValueError(f"Embeddings need tensors with one shared batch size, got {sizes}")
        self.tensors = tensors

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def select(self, index: torch.Tensor | Sequence[int]) -> Embeddings:
        """Rows ``index`` of every tensor (a window batch's prompts)."""
        import torch

        out = {}
        for name, tensor in self.tensors.items():
            rows = torch.as_tensor(index, device=tensor.device, dtype=torch.long)
            out[name] = tensor.index_select(0, rows)
        return Embeddings(out)

    @staticmethod
    def cat(parts: Sequence[Embeddings]) -> Embeddings:
        import torch

        names = list(parts[0].tensors)
        return Embeddings({name: torch.cat([p.tensors[name] for p in parts]) for name in names})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Embeddings:
        """Move every tensor to ``device``; floating tensors also to ``dtype``."""
        return Embeddings(
            {
                name: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
                for name, t in self.tensors.items()
            }
        )

    def zeros_like(self) -> Embeddings:
        import torch

        return Embeddings({name: torch.zeros_like(t) for name, t in self.tensors.items()})

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())
        return f"Embeddings({shapes})"


def first_parameter(module: torch.nn.Module) -> torch.Tensor:
    """The first parameter of ``module``: its device and dtype in microseconds (diffusers'
    ``ModelMixin.device``/``.dtype`` walk every submodule, about a millisecond on a full-size
    UNet, which adds up when read on every step)."""
    return next(module.parameters())


class ModelFamily(Configurable, ABC):
    """Base class of every model family. One instance is bound to one loaded pipeline.

    Class attributes are facts known before loading (used to validate a job early);
    instance methods use the pipeline. Subclasses set ``name``, ``pipeline_classes`` (the
    diffusers pipeline class names this family accepts, the first one is used for loading),
    ``latent``, ``guidance``, ``default_guidance_scale``, and implement the abstract methods.
    """

    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    latent: ClassVar[LatentFormat]
    guidance: ClassVar[GuidanceMode] = "cfg"
    default_guidance_scale: ClassVar[float] = 7.5
    guidance_modes: ClassVar[frozenset[str] | None] = None
    """Every guidance mode this family's checkpoints can have, when known before loading
    (lets a job refuse a negative prompt for FLUX.1 before the model loads); None: unknown."""
    tiny_autoencoder: ClassVar[str | None] = None
    """Hub id of the family's tiny autoencoder (diffusers ``AutoencoderTiny``), or None."""
    tiny_models: ClassVar[dict[str, str]] = {}
    """Built-in tiny model names → ``"module:function"`` building the stock pipeline offline."""
    flow_matching: ClassVar[bool] = False
    cuda_dtype: ClassVar[str] = "float16"
    """The name of the default compute dtype on CUDA (``"bfloat16"`` for the transformer
    families), a name so that families are defined without importing torch."""
    absent_negative_differs: ClassVar[bool] = False
    """Whether no negative prompt (None) means something other than the empty one (``""``) in
    the stock pipeline (SDXL's ``force_zeros_for_empty_prompt``: None gives zero rows, ``""``
    is encoded). True: :meth:`encode_prompts` receives None for an absent negative prompt;
    False: it receives ``""``, as the stock pipelines that encode ``""`` for None."""
    load_kwargs: ClassVar[dict[str, Any]] = {}
    """Extra keyword arguments of ``from_pretrained`` (e.g. no safety checker for SD)."""
    supports_offsets: ClassVar[bool] = False
    """Whether :meth:`forward` can take window ``offsets`` (``positions = "canvas"``)."""
    controlnet_classes: ClassVar[tuple[str, ...]] = ()
    controlnet_positive_only: ClassVar[bool] = False
    """With classifier-free guidance, run the ControlNet on the conditional rows only and
    reuse its residuals for the unconditional ones (as Qwen-Image's ControlNet pipeline does)."""
    """diffusers ControlNet class names this family can use (empty: none)."""

    class Options(PluginOptions):
        positions: Literal["window", "canvas"] = "window"
        """Positional ids of a window: those of an ordinary image of its size (what the model
        was trained on), or offset to the window's place on the canvas (transformers)."""

    def __init__(self, pipeline: Any, options: PluginOptions | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        if self.options.positions == "canvas" and not self.supports_offsets:
            raise ConfigError(f"model family {self.name!r}: positions = 'canvas' needs a transformer family with positional ids")
        self.pipeline = pipeline

    # -- facts ---------------------------------------------------------------------------

    @property
    def denoiser_module(self) -> torch.nn.Module:
        """The network evaluated each step (``unet`` or ``transformer``)."""
        return getattr(self.pipeline, "transformer", None) or self.pipeline.unet

    execution_device: torch.device | None = None
    """Where the model runs when its weights are offloaded to the CPU between calls (set by
    :func:`jointdiff.models.loading.load_model`); None: the denoiser's own device."""

    @property
    def device(self) -> torch.device:
        if self.execution_device is not None:
            return self.execution_device
        return first_parameter(self.denoiser_module).device

    @property
    def dtype(self) -> torch.dtype:
        return first_parameter(self.denoiser_module).dtype

    @property
    def scheduler(self) -> Any:
        return self.pipeline.scheduler

    @property
    def latent_format(self) -> LatentFormat:
        """The latent format of *this* checkpoint (e.g. SD 2-768's native window is 96)."""
        return self.latent

    @property
    def guidance_mode(self) -> GuidanceMode:
        """The guidance of this checkpoint (FLUX.1-dev is ``distilled``, schnell ``none``)."""
        return self.guidance

    def uses_cfg(self, guidance_scale: float, negative_prompt: str | None) -> bool:
        """Whether a prompt with this scale and negative prompt runs an unconditional branch
        (diffusers: ``guidance_scale > 1``; Qwen-Image only with a negative prompt)."""
        return self.guidance_mode == "cfg" and guidance_scale > 1.0

    def check_guidance(self, guidance_scale: float | None, negative_prompt: str | None, owner: str) -> None:
        """ConfigError, naming ``owner``'s option, for guidance this checkpoint does not have."""
        mode = self.guidance_mode
        if negative_prompt and mode != "cfg":
            raise ConfigError(
                f"{owner}: negative_prompt = {negative_prompt!r} cannot be used with model family {self.name!r} "
                f"({mode} guidance: the model has no unconditional branch); remove it"
            )
        if mode == "none" and guidance_scale is not None and guidance_scale != self.default_guidance_scale:
            raise ConfigError(
                f"{owner}: guidance_scale = {guidance_scale!r} has no effect on this {self.name!r} checkpoint "
                "(no guidance: a few-step distilled model); remove it"
            )

    @classmethod
    def accepts(cls, pipeline: Any) -> bool:
        """Whether ``pipeline`` (a diffusers pipeline object) is of this family."""
        return type(pipeline).__name__ in cls.pipeline_classes

    # -- prompts -------------------------------------------------------------------------

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> tuple[Embeddings, Embeddings | None]:
        """Encode ``P`` prompts (and, with ``cfg`` guidance, ``P`` negative prompts) with every
        text encoder of the family. Both results have ``P`` rows, padded to one shared length;
        the second is None when no negatives are given."""

    # -- the model call ------------------------------------------------------------------

    @abstractmethod
    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        embeds: Embeddings,
        *,
        guidance_scale: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """One evaluation of the denoiser on ``N`` windows ``(N, C, h, w)`` (float32, canvas
        latent space, already ``scale_model_input``-ed by the caller) at ``timestep`` (a 0-d
        tensor from the scheduler's timesteps) with ``N`` rows of ``embeds``. Returns the raw
        model output ``(N, C, h, w)`` as float32 (ε, v, or flow velocity).

        ``guidance_scale`` ``(N,)``: the embedded guidance of ``distilled`` families.
        ``offsets`` ``(N, 2)``: each window's ``(top, left)`` on the canvas in latent cells,
        for positional ids offset to the canvas (None: ids of an ordinary image of the
        window's size). ``extra``: conditioner keyword arguments (e.g. ControlNet residuals)."""

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """Classifier-free guidance ``u + g (c − u)`` (Ho & Salimans 2022)."""
        return uncond + scale * (cond - uncond)

    # -- schedule ------------------------------------------------------------------------

    def set_timesteps(self, scheduler: Any, num_steps: int, window_size_latent: tuple[int, int]) -> None:
        """Set ``scheduler``'s timesteps (on the CPU) for windows of ``window_size_latent``."""
        scheduler.set_timesteps(num_steps, device="cpu")

    def scale_model_input(self, latents: torch.Tensor, timestep: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """The scheduler's input scaling (σ-parameterised schedulers such as Euler divide by
        ``√(σ²+1)``); the identity for schedulers without one (flow matching)."""
        scale = getattr(scheduler, "scale_model_input", None)
        return scale(latents, timestep) if scale is not None else latents

    def start_step(self, num_steps: int, strength: float) -> int:
        """The first of ``num_steps`` steps an image-to-image job with ``strength`` runs, as
        diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``: ``n − min(int(n·s), n)``."""
        return num_steps - min(int(num_steps * strength), num_steps)

    def initial_noise_sigma(self, scheduler: Any) -> float:
        """Factor applied to unit Gaussian noise to make the first step's latents."""
        return float(scheduler.init_noise_sigma)

    @abstractmethod
    def predicted_x0(self, latents: torch.Tensor, output: torch.Tensor, timestep: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """The clean latent x̂0 predicted from ``latents`` and the model ``output``."""

    @abstractmethod
    def output_from_x0(self, latents: torch.Tensor, x0: torch.Tensor, timestep: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """The model output that would have predicted ``x0`` from ``latents`` (the inverse of
        :meth:`predicted_x0`), so any scheduler can step with a fused x̂0."""

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """Clean latents ``x0`` noised to the level of ``timestep`` with unit ``noise``."""

    # -- VAE -----------------------------------------------------------------------------

    @abstractmethod
    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Canvas latents → the VAE decoder's input space (undo scaling, shift, patching)."""

    @abstractmethod
    def from_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_vae_latents`."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Canvas latents ``(B, C, h, w)`` → pixels ``(B, 3, f·h, f·w)`` in [-1, 1] (float32).
        Differentiable (SyncDiffusion takes gradients through it)."""
        vae = self.pipeline.vae
        images = vae.decode(self.to_vae_latents(latents).to(vae.dtype), return_dict=False)[0]
        return images.float()

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → canvas latents, sampling the posterior with
        ``generator``."""
        vae = self.pipeline.vae
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return self.from_vae_latents(posterior.sample(generator=generator).float())

    def encode_mean(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → canvas latents at the posterior mean, float32:
        deterministic, for conditions (an inpainting model's masked image)."""
        import torch

        vae = self.pipeline.vae
        with torch.no_grad():
            return self.from_vae_latents(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float())

    # -- inpainting models ---------------------------------------------------------------

    def join_inpaint_condition(self, latents: torch.Tensor, extra: Mapping[str, Any] | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """For :meth:`forward`: ``latents`` with ``extra["concat_condition"]`` (an inpainting
        model's mask and masked-image latents, :meth:`inpaint_condition`) joined along the
        channels, and the rest of ``extra``. An inpainting checkpoint without one is a
        ConfigError: it cannot run on the latents alone."""
        import torch

        extra = dict(extra or {})
        condition = extra.pop("concat_condition", None)
        if condition is not None:
            return torch.cat([latents, condition.to(latents)], dim=1), extra
        if self.is_inpainting:
            raise ConfigError(
                f"model family {self.name!r}: this inpainting checkpoint needs an image and a mask; "
                "add the 'inpaint_model' conditioner"
            )
        if self.takes_control_image:
            raise ConfigError(
                f"model family {self.name!r}: this control checkpoint (e.g. FLUX.1 Depth/Canny) needs a control "
                "image; add the 'flux_control' conditioner"
            )
        return latents, extra

    @property
    def takes_control_image(self) -> bool:
        """Whether this checkpoint takes a control image joined to its latents along channels
        (FLUX.1 Depth-dev / Canny-dev, diffusers' ``FluxControlPipeline``): ``extra["concat_condition"]``
        of :meth:`forward`, built by :meth:`control_image_condition`. Default: False."""
        return False

    def control_image_condition(self, pixels: torch.Tensor) -> torch.Tensor:
        """What a channel-concatenated control model joins to its latents: ``pixels``
        ``(B, 3, f·H, f·W)`` in [-1, 1] (a canvas sheet, or a window's map) → ``(B, C', H, W)``
        at latent resolution. ConfigError when the checkpoint takes no control image."""
        raise ConfigError(f"model family {self.name!r} has no channel-concatenated control model support")

    @property
    def is_inpainting(self) -> bool:
        """Whether this checkpoint is an inpainting model, whose denoiser takes the noisy
        latents joined along channels with :meth:`inpaint_condition` (``extra["concat_condition"]``
        of :meth:`forward`). Default: False."""
        return False

    def inpaint_condition(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What an inpainting model joins to its latents, for the whole canvas: ``pixels``
        ``(S, 3, f·H, f·W)`` in [-1, 1] and ``mask`` ``(S, 1, f·H, f·W)``, 1 = repaint (binarised
        at 0.5, diffusers' convention) → ``(S, C', H, W)`` at latent resolution, cut into
        windows by the geometry. ConfigError when the checkpoint is no inpainting model."""
        raise ConfigError(f"model family {self.name!r} has no inpainting model support")

    # -- ControlNet ----------------------------------------------------------------------

    def control_condition(self, controlnet: Any, pixels: torch.Tensor) -> torch.Tensor:
        """A condition image ``(1, 3, H_px, W_px)`` in [0, 1] covering the whole canvas →
        the tensor the ControlNet takes, at canvas scale: pixels (UNet ControlNets, returned
        as they are) or VAE latents (transformer ControlNets). Windows are cut from it by
        the geometry (at ``k``× the latent resolution for pixels)."""
        raise ConfigError(f"model family {self.name!r} has no ControlNet support")

    def controlnet_kwargs(
        self,
        controlnet: Any,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        embeds: Embeddings,
        condition: torch.Tensor,
        conditioning_scale: float,
        guidance_scale: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Run ``controlnet`` on ``N`` window latents (model input rows, as in
        :meth:`forward`) with their ``condition`` windows ``(N, ...)``, the same embedded
        ``guidance_scale`` ``(N,)`` and window ``offsets`` ``(N, 2)`` as the model call; returns
        the keyword arguments for :meth:`forward`'s ``extra`` (residuals). Several ControlNets
        are summed by the caller with :meth:`sum_control`."""
        raise ConfigError(f"model family {self.name!r} has no ControlNet support")

    def tiny_controlnet(self, seed: int = 0) -> Any:
        """A random-weight ControlNet that fits this model (``model = "tiny"``), for tests."""
        raise ConfigError(f"model family {self.name!r} has no tiny ControlNet")

    @staticmethod
    def sum_control(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
        """Residuals of two ControlNets added (diffusers' MultiControlNet)."""
        import torch

        out = dict(first)
        for key, value in second.items():
            if value is None:
                continue
            if out.get(key) is None:
                out[key] = value
            elif isinstance(value, torch.Tensor):
                out[key] = out[key] + value
            else:
                out[key] = [a + b for a, b in zip(out[key], value)]
        return out


def binary_mask(mask: torch.Tensor) -> torch.Tensor:
    """An inpainting mask as 0/1 float: 1 (repaint) where ``mask >= 0.5`` (diffusers'
    ``VaeImageProcessor.binarize``, used by its inpainting pipelines)."""
    return (mask >= 0.5).float()


def check_inpaint_inputs(pixels: torch.Tensor, mask: torch.Tensor, family: str) -> None:
    """ConfigError unless ``pixels`` is ``(S, 3, H, W)`` and ``mask`` ``(S, 1, H, W)``."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ConfigError(f"model family {family!r}: inpainting pixels must be (S, 3, H, W), got {tuple(pixels.shape)}")
    if mask.ndim != 4 or mask.shape[1] != 1 or (mask.shape[0], *mask.shape[2:]) != (pixels.shape[0], *pixels.shape[2:]):
        raise ConfigError(
            f"model family {family!r}: inpainting mask of shape {tuple(mask.shape)} does not fit pixels "
            f"{tuple(pixels.shape)}; expected {(pixels.shape[0], 1, *pixels.shape[2:])}"
        )

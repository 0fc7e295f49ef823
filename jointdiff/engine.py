"""The joint-diffusion engine: one denoising loop over a canvas of overlapping windows.

Each step (MultiDiffusion, Bar-Tal et al. 2023, Eq. 5; SyncDiffusion, Lee et al. 2023, Alg. 1):

1. the synchronizer looks at the canvas (e.g. computes the anchor's prediction);
2. for every window batch: take the windows out of the canvas (geometry), let the
   synchronizer move them, run the UNet once for all windows and guidance branches,
   step the batch's own scheduler copy;
3. add the weighted results back onto the canvas and divide by the summed weights.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .conditioner import Conditioner
from .context import JobContext, StepState, WindowBatch
from .denoiser import Denoiser
from .distributed import (
    Checkpoint,
    Distributed,
    batch_states,
    load_checkpoint,
    restore_batches,
    save_checkpoint,
    window_costs,
)
from .distributed import resolve as resolve_distributed
from .errors import ConfigError, NonFiniteLatentsError
from .fusion import FusionMode, make_fusion
from .geometry import Geometry
from .synchronizer import Synchronizer

StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class JointResult:
    """What a job returns: the output images, the final canvas latents ``(S, C, H, W)``
    (float32, unscaled; with ``x0`` fusion, the fused clean latents of the last step) and the
    decoded pixels ``(S, 3, H_px, W_px)`` in [-1, 1]."""

    images: list[Image.Image]
    latents: torch.Tensor
    pixels: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class JointDiffusion:
    """Composes a model with a geometry, conditioners and a synchronizer.

    ``model`` is a :class:`~jointdiff.families.base.ModelFamily` (see
    :func:`jointdiff.models.load_model`) or a diffusers pipeline of a supported family (its
    family is detected). ``view_batch_size`` windows share one model call (times two with
    classifier-free guidance). ``fusion`` is ``"latent"`` (MultiDiffusion:
    average noisy latents) or ``"x0"`` (SyncTweedies: average predicted clean latents; for
    geometries that resample), see :mod:`jointdiff.fusion`; by default the geometry's
    ``preferred_fusion``. ``distributed`` spreads the window batches over the ranks of a
    torch.distributed process group (see :mod:`jointdiff.distributed`): ``None`` does so
    when a group of several ranks is initialized, ``False`` never.
    """

    def __init__(
        self,
        model: Any,
        geometry: Geometry,
        conditioners: Sequence[Conditioner],
        synchronizer: Synchronizer | None = None,
        *,
        view_batch_size: int = 4,
        eta: float = 0.0,
        fusion: FusionMode | None = None,
        check_finite: bool = True,
        distributed: Distributed | bool | None = None,
    ) -> None:
        if not isinstance(view_batch_size, int) or view_batch_size < 1:
            raise ConfigError(f"view_batch_size must be a positive integer, got {view_batch_size!r}")
        if fusion not in (None, "latent", "x0"):
            raise ConfigError(f"fusion must be 'latent' (MultiDiffusion) or 'x0' (SyncTweedies), got {fusion!r}")
        if not isinstance(geometry, Geometry):
            raise ConfigError(f"geometry must be a Geometry, got {geometry!r}")
        from .models import as_model

        self.model = as_model(model)
        self.geometry = geometry
        self.conditioners = list(conditioners)
        self.synchronizer = synchronizer
        self.view_batch_size = view_batch_size
        self.eta = eta
        self.fusion = fusion
        self.check_finite = check_finite
        self.distributed = distributed

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline behind the model."""
        return self.model.pipeline

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _prompt(self):
        prompts = [c.prompt() for c in self.conditioners]
        prompts = [p for p in prompts if p is not None]
        if len(prompts) != 1:
            names = [c.name for c in self.conditioners]
            raise ConfigError(f"a job needs exactly one prompt conditioner (e.g. 'text'); got {names}")
        return prompts[0]

    def _initial_latents(self, latents: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        sheets, height, width = self.geometry.canvas_shape_latent
        shape = (sheets, self.model.latent_format.channels, height, width)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ConfigError(f"latents must have shape {shape} for this geometry, got {tuple(latents.shape)}")
        return latents.to(self.device, torch.float32) * self.model.initial_noise_sigma(self.model.scheduler)

    def _window_offsets(self) -> torch.Tensor | None:
        """Window origins for positional ids offset to the canvas (``positions = "canvas"``)."""
        if self.model.options.positions != "canvas":
            return None
        origins = self.geometry.window_origins_latent()
        if origins is None:
            raise ConfigError(
                f"positions = 'canvas' needs windows that are crops of one plane; geometry {self.geometry.name!r} resamples them"
            )
        return origins

    def _window_batches(self, scheduler: Any, prompt, seed: int) -> list[WindowBatch]:
        """Fixed groups of ``view_batch_size`` windows, once per prompt branch. Each batch has
        its own scheduler copy and its own noise generator (stochastic schedulers), so a
        result does not depend on the order or the process in which batches run."""
        ids = list(range(self.geometry.num_windows))
        size = self.view_batch_size
        groups = [tuple(ids[i : i + size]) for i in range(0, len(ids), size)]
        pairs = [(branch, group) for branch in prompt.branches for group in groups]
        return [
            WindowBatch(j, group, copy.deepcopy(scheduler), branch, torch.Generator().manual_seed(batch_seed(seed, j)))
            for j, (branch, group) in enumerate(pairs)
        ]

    def _weights_fn(self, prompt, device: torch.device):
        """Fusion weights of a batch ``(B, 1, h, w)``: the geometry's, times the branch's
        region mask cut out by the geometry."""
        masks = prompt.region_masks.to(device, torch.float32) if prompt.region_masks is not None else None

        def weights_of(batch: WindowBatch) -> torch.Tensor:
            weights = self.geometry.window_weights(batch.window_ids, device)
            if batch.prompt_index is not None:
                weights = weights * self.geometry.extract(masks[batch.prompt_index], batch.window_ids)
            return weights

        return weights_of

    def _step_kwargs(self, scheduler: Any) -> dict[str, Any]:
        """``eta`` and a ``generator`` slot (filled per batch) where the scheduler takes them."""
        accepted = set(inspect.signature(scheduler.step).parameters)
        kwargs = {"eta": self.eta, "generator": None}
        return {k: v for k, v in kwargs.items() if k in accepted}

    @torch.no_grad()
    def __call__(
        self,
        num_inference_steps: int = 50,
        seed: int = 0,
        latents: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        progress: bool = True,
        output_type: str = "pil",
        checkpoint: Checkpoint | None = None,
    ) -> JointResult:
        """Run the job. ``latents`` (optional) is the initial canvas noise ``(S, C, H, W)``,
        scaled by the scheduler's ``init_noise_sigma`` as in diffusers. ``output_type`` is
        ``"pil"`` (decode and make images) or ``"latent"`` (skip decoding). ``checkpoint``
        saves the state every few steps and, with ``resume``, continues from a saved one.

        On several ranks every rank returns the same ``latents``; only rank 0 decodes
        (other ranks get no images or pixels)."""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if output_type not in ("pil", "latent"):
            raise ConfigError(f"output_type must be 'pil' or 'latent', got {output_type!r}")

        # 1. Geometry, conditioners and synchronizer see the model.
        self.geometry.setup(self.model.latent_format)
        generator = torch.Generator("cpu").manual_seed(seed)
        context = JobContext(self.model, self.geometry, self.device, self.dtype, num_inference_steps, generator)
        comm = resolve_distributed(self.distributed)
        if comm is not None:
            context.extras["distributed"] = comm
        for conditioner in self.conditioners:
            conditioner.setup(context)
        prompt = self._prompt()
        denoiser = Denoiser(context, prompt, self.conditioners, self._window_offsets())
        if self.synchronizer is not None:
            self.synchronizer.setup(context)

        # 2. Timesteps (kept on the CPU: indexing them never waits for the GPU) and latents.
        scheduler = self.model.scheduler
        self.model.set_timesteps(scheduler, num_inference_steps, self.geometry.window_size_latent)
        timesteps = scheduler.timesteps
        canvas = self._initial_latents(latents, generator)

        # 3. Window batches, each with its own scheduler state (this rank's share of them
        #    with window parallelism), and the fusion.
        batches = self._window_batches(scheduler, prompt, seed)
        fusion_mode = self.fusion or getattr(self.geometry, "preferred_fusion", "latent")
        if comm is not None:
            batches = comm.assign(batches, self._batch_costs(batches, num_inference_steps, comm))
        fusion = make_fusion(
            fusion_mode, self.geometry, canvas, batches, self._weights_fn(prompt, canvas.device),
            self._step_kwargs(scheduler), reduce=comm.all_reduce_ if comm is not None else None,
            noise_sigma=self.model.initial_noise_sigma(scheduler),
        )
        if not bool((fusion.weight_sum > 0).all()):
            raise ConfigError(f"geometry {self.geometry.name!r} (with its region masks) leaves canvas cells without weight")
        fingerprint = {"seed": seed, "steps": num_inference_steps, "fusion": fusion_mode, "canvas": tuple(canvas.shape),
                       "windows": self.geometry.num_windows, "batches": self.view_batch_size}
        start = 0
        if checkpoint is not None and checkpoint.resume:
            canvas, start = self._resume(checkpoint, comm, fingerprint, batches, fusion, canvas)

        # 4. Denoising loop.
        show = progress and (comm is None or comm.rank == 0)
        for i in tqdm(range(start, len(timesteps)), disable=not show, desc="jointdiff", initial=start, total=len(timesteps)):
            t = timesteps[i]
            state = StepState(i, t, len(timesteps), canvas, denoiser, context, fusion)
            failure = self._local_step(state, batches, fusion, denoiser, comm)
            if comm is not None:
                comm.check(failure, f"step {i}")
            canvas = fusion.end_step(t, denoiser)
            if self.check_finite and not bool(torch.isfinite(canvas).all()):
                raise NonFiniteLatentsError(f"NaN or inf in the canvas latents at step {i} (timestep {int(t)})")
            if checkpoint is not None and checkpoint.due(i, len(timesteps)):
                save_checkpoint(checkpoint, comm, fingerprint, i + 1, canvas, batch_states(batches, fusion))
            if callback is not None:
                self._guarded(comm, f"the step callback of step {i}", lambda: callback(i, int(t), canvas))

        # 5. Decode (on rank 0 only with window parallelism: every rank holds the same canvas).
        metadata = {"seed": seed, "num_inference_steps": num_inference_steps, "windows": self.geometry.num_windows}
        if comm is not None:
            metadata.update(rank=comm.rank, world_size=comm.world_size)
        if output_type == "latent" or (comm is not None and comm.rank != 0):
            return JointResult([], canvas, None, metadata)
        pixels = self.geometry.decode(canvas, self._vae_decode)
        return JointResult(self.geometry.to_images(pixels), canvas, pixels, metadata)

    def _local_step(self, state: StepState, batches, fusion, denoiser: Denoiser, comm) -> BaseException | None:
        """Steps 1–2 for this rank's batches; the numerator is left in the fusion. With window
        parallelism an exception is returned (for the error check every rank joins), not raised."""
        try:
            if self.synchronizer is not None:
                self.synchronizer.begin_step(state)
            fusion.begin_step()
            t = state.timestep
            for batch in batches:
                window_latents = fusion.window_latents(batch)
                if self.synchronizer is not None:
                    window_latents = self.synchronizer.update(window_latents, batch, state)
                for conditioner in self.conditioners:
                    window_latents = conditioner.modify_latents(window_latents, batch, state)
                output = denoiser.model_output(window_latents, t, batch.window_ids, batch.scheduler, batch.prompt_index)
                fusion.add(batch, window_latents, output, t, denoiser)
        except Exception as error:
            if comm is None:
                raise
            return error
        return None

    @staticmethod
    def _guarded(comm, where: str, action: Callable[[], Any]) -> None:
        """Run ``action``; with window parallelism a failure on any rank stops every rank."""
        if comm is None:
            action()
            return
        failure = None
        try:
            action()
        except Exception as error:
            failure = error
        comm.check(failure, where)

    def _batch_costs(self, batches: Sequence[WindowBatch], num_steps: int, comm: Distributed) -> list[float]:
        """Relative cost of each batch over the job, for balancing the ranks."""
        costs = window_costs(self.geometry.num_windows, num_steps, self.synchronizer, comm.sync_cost, comm.anchor_cost)
        return [sum(costs[w] for w in batch.window_ids) for batch in batches]

    def _resume(self, checkpoint: Checkpoint, comm, fingerprint: dict, batches, fusion, canvas: torch.Tensor):
        """Canvas and first step from a saved checkpoint (or as they are, without one)."""
        payload = load_checkpoint(checkpoint, comm, fingerprint)
        if payload is None:
            return canvas, 0
        restore_batches(batches, fusion, payload["batches"])
        fusion.canvas = payload["canvas"].to(canvas.device)
        return fusion.canvas, int(payload["next_step"])

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents)


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of a window batch's noise generator, derived from the job's seed."""
    return (seed * 1_000_003 + batch_index + 1) % (2**63)

"""The joint-diffusion engine: one denoising loop over a canvas of overlapping windows.

Each step (MultiDiffusion, Bar-Tal et al. 2023, Eq. 5; SyncDiffusion, Lee et al. 2023, Alg. 1):

1. the synchronizer looks at the canvas (e.g. computes the anchor's prediction);
2. for every window batch: take the windows out of the canvas (geometry), let the
   synchronizer move them, run the UNet once for all windows and guidance branches,
   step the batch's own scheduler copy;
3. add the weighted results back onto the canvas and divide by the summed weights.

Invariance: a job's result does not depend on ``view_batch_size``, on the order in which
batches run, on the number of ranks, or on an interruption and resume (to float rounding).
All noise is keyed by what it belongs to (the job's seed, a purpose, a step, a window, a
region branch; :meth:`~jointdiff.core.context.JobContext.generator_for`), never drawn from a
stream shared by batches; scheduler state is per batch copy and per-row math; checkpoints
hold every window's state and every plugin's ``state_dict()``.
"""

from __future__ import annotations

import copy
import inspect
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from jointdiff.core.conditioner import Conditioner, Prompt, check_geometry_maps
from jointdiff.core.context import JobContext, StepState, WindowBatch
from jointdiff.core.geometry import Geometry, check_canvas_megapixels, check_fusion_option
from jointdiff.core.synchronizer import Synchronizer
from jointdiff.cost import budget, profiling
from jointdiff.engine import job_state
from jointdiff.engine.denoiser import Denoiser, accelerated, auto_view_batch_size
from jointdiff.engine.distributed import Checkpoint, Distributed, remove_checkpoint, window_costs
from jointdiff.engine.distributed import resolve as resolve_distributed
from jointdiff.engine.fewstep import check_fewstep
from jointdiff.engine.fusion import FusionMode, LatentFusion
from jointdiff.engine.fusion_modes import make_fusion
from jointdiff.engine.plan import loop_plan
from jointdiff.engine.record import job_of_engine
from jointdiff.engine.result import JointResult, StopJob
from jointdiff.engine.shifted import WindowsMode, check_windows_option, make_shifted_fusion
from jointdiff.image import init_image
from jointdiff.image.init_image import InitImage
from jointdiff.models import tiled_decode
from jointdiff.models.loading import as_model
from jointdiff.utils.errors import ConfigError, NonFiniteLatentsError

StepCallback = Callable[[int, int, torch.Tensor], None]
"""``callback(step_index, timestep, canvas)``: observes the canvas after a step (and after
that step's checkpoint is written)."""
StepEndCallback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
"""``callback_on_step_end(step_index, timestep, latents) -> latents | None`` (diffusers'
style): may return new canvas latents ``(S, C, H, W)`` for the next step, or raise
:class:`StopJob` to end the job after this step."""


@dataclass
class _Run:
    """One job's working state inside :meth:`JointDiffusion.__call__` (engine internals):
    ``scheduler`` is the configured template every batch copies; ``batches`` are this rank's."""

    seed: int
    context: JobContext
    comm: Distributed | None
    prompt: Prompt
    denoiser: Denoiser
    scheduler: Any
    timesteps: torch.Tensor
    canvas: torch.Tensor
    batches: list[WindowBatch] = field(default_factory=list)
    fusion: LatentFusion | None = None
    fusion_mode: str = "latent"
    fingerprint: dict[str, Any] | None = None
    progress: Any = None
    bad_step: torch.Tensor | None = None
    """The first step whose canvas was not finite, kept on the device (``len(timesteps)``: none)."""
    estimate: budget.Estimate | None = None
    timer: profiling.PhaseTimer = field(default_factory=profiling.PhaseTimer)


class JointDiffusion:
    """Composes a model with a geometry, conditioners and a synchronizer.

    ``model`` is a :class:`~jointdiff.core.family.ModelFamily` (see
    :func:`jointdiff.models.loading.load_model`) or a diffusers pipeline of a supported family (its
    family is detected). ``view_batch_size`` windows share one model call (times two with
    classifier-free guidance). ``fusion`` is ``"latent"`` (MultiDiffusion:
    average noisy latents) or ``"x0"`` (SyncTweedies: average predicted clean latents; for
    geometries that resample), see :mod:`jointdiff.engine.fusion`; by default the geometry's
    ``preferred_fusion``. ``distributed`` spreads the window batches over the ranks of a
    torch.distributed process group (see :mod:`jointdiff.engine.distributed`): ``None`` does so
    when a group of several ranks is initialized, ``False`` never.

    Large canvases: a job above ``max_megapixels`` (default 64; None: no limit) or whose
    estimated working memory exceeds ``memory_limit_gb`` (None: no limit) is refused before
    anything is allocated (:meth:`estimate`, :mod:`jointdiff.cost.budget`). The final decode is
    tiled (:mod:`jointdiff.models.tiled_decode`): ``decode_tile_latent`` None tiles with the model's
    native window above 4 megapixels, 0 never tiles, a number is the tile side in latent cells.

    ``init`` starts from an image (img2img, and inpainting / outpainting with its keep mask):
    see :class:`~jointdiff.image.init_image.InitImage` and :mod:`jointdiff.image.init_image`.

    Fast modes (docs/fast-modes.md): ``windows = "shifted"`` denoises non-overlapping windows
    offset by a random shift every step (SpotDiffusion, :mod:`jointdiff.engine.shifted`);
    ``fusion = "x0_renoise"`` fuses x̂0 and re-noises it, for few-step models
    (StreamMultiDiffusion, :mod:`jointdiff.engine.fewstep`).

    Speed (docs/benchmarks.md, each exact to float rounding): ``view_batch_size = "auto"``
    sizes window batches from the free CUDA memory (4 elsewhere); ``compile`` (True or a
    ``torch.compile`` backend name) compiles the denoiser for the job's fixed batch shapes; on
    CUDA UNets run channels-last with SDPA attention (:func:`jointdiff.engine.denoiser.accelerated`).
    ``check_finite``: NaN or inf in the canvas raise :class:`NonFiniteLatentsError` naming the
    first bad step; the test runs on the device every step and is read back (one host sync)
    every :attr:`finite_check_every` steps, at checkpoints, around callbacks and at the end.
    """

    finite_check_every: int = 8
    """Steps between host reads of the on-device finite flag (see ``check_finite``)."""

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
        max_megapixels: float | None = budget.DEFAULT_MAX_MEGAPIXELS,
        memory_limit_gb: float | None = None,
        decode_tile_latent: int | None = None,
        init: InitImage | None = None,
        windows: WindowsMode = "overlap",
        compile: bool | str = False,
    ) -> None:
        budget.check_limit_options(max_megapixels, memory_limit_gb)
        if init is not None and not isinstance(init, InitImage):
            raise ConfigError(f"init must be an InitImage (jointdiff.image.init_image) or None, got {type(init).__name__}")
        tiled_decode.check_tile_option(decode_tile_latent)
        if view_batch_size != "auto" and (not isinstance(view_batch_size, int) or view_batch_size < 1):
            raise ConfigError(
                f"view_batch_size must be a positive integer, got {view_batch_size!r} (or 'auto': sized from free memory)"
            )
        if not isinstance(compile, (bool, str)) or compile == "":
            raise ConfigError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")
        if fusion not in (None, "latent", "x0", "x0_renoise"):
            raise ConfigError(
                f"fusion must be 'latent' (MultiDiffusion), 'x0' (SyncTweedies) or 'x0_renoise' (few-step), got {fusion!r}"
            )
        if not isinstance(geometry, Geometry):
            raise ConfigError(f"geometry must be a Geometry, got {geometry!r}")
        check_windows_option(windows, geometry, fusion)
        check_fusion_option(geometry, fusion)
        if fusion == "x0_renoise":
            check_fewstep(geometry, eta)

        self.model = as_model(model)
        self.geometry = geometry
        self.conditioners = list(conditioners)
        self.synchronizer = synchronizer
        self.view_batch_size = view_batch_size
        self.eta = eta
        self.fusion = fusion
        self.check_finite = check_finite
        self.distributed = distributed
        self.max_megapixels = max_megapixels
        self.memory_limit_gb = memory_limit_gb
        self.decode_tile_latent = decode_tile_latent
        self.init = init
        self.windows = windows
        self.compile = compile

    @property
    def view_batch_size(self) -> int:
        """Windows per model call: the ``view_batch_size`` given, or ``"auto"`` resolved for
        the model, geometry and device (:func:`~jointdiff.engine.denoiser.auto_view_batch_size`),
        once per job; :attr:`view_batch_option` is what was given."""
        if self.view_batch_option != "auto":
            return self.view_batch_option
        if self._auto_view_batch is None:
            self._auto_view_batch = auto_view_batch_size(self.model, self.geometry, self.conditioners)
        return self._auto_view_batch

    @view_batch_size.setter
    def view_batch_size(self, value: int | str) -> None:
        self.view_batch_option = value
        self._auto_view_batch: int | None = None

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

    def _initial_latents(self, latents: torch.Tensor | None, context: JobContext) -> torch.Tensor:
        """The first canvas ``(S, C, H, W)``: unit noise (``latents``, or drawn from the job's
        seed on the CPU) times the scheduler's ``init_noise_sigma``; the unit noise is kept
        as ``context.initial_noise``."""
        sheets, height, width = self.geometry.canvas_shape_latent
        shape = (sheets, self.model.latent_format.channels, height, width)
        if latents is None:
            latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(context.seed), dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ConfigError(f"latents must have shape {shape} for this geometry, got {tuple(latents.shape)}")
        context.initial_noise = latents.to(self.device, torch.float32)
        return context.initial_noise * self.model.initial_noise_sigma(self.model.scheduler)

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
        """Fixed groups of ``view_batch_size`` windows, once per prompt branch, each with its
        own scheduler copy. Noise is keyed per window (see :mod:`jointdiff.engine.fusion`), so a
        result depends neither on the grouping nor on the order or process batches run in."""
        ids = list(range(self.geometry.num_windows))
        size = self.view_batch_size
        groups = [tuple(ids[i : i + size]) for i in range(0, len(ids), size)]
        pairs = [(branch, group) for branch in prompt.branches for group in groups]
        return [WindowBatch(j, group, copy.deepcopy(scheduler), branch) for j, (branch, group) in enumerate(pairs)]

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
        callback_on_step_end: StepEndCallback | None = None,
        profile: bool | None = None,
    ) -> JointResult:
        """Run the job. ``latents`` (optional) is the initial canvas noise ``(S, C, H, W)``,
        scaled by the scheduler's ``init_noise_sigma`` as in diffusers. ``output_type`` is
        ``"pil"`` (decode and make images) or ``"latent"`` (skip decoding). ``checkpoint``
        saves the state every few steps and, with ``resume``, continues from a saved one
        (see :class:`~jointdiff.engine.distributed.Checkpoint`). ``callback_on_step_end`` may
        replace the canvas latents or stop the job (:data:`StepEndCallback`, :class:`StopJob`);
        ``callback`` observes every step.

        On several ranks every rank returns the same ``latents``; only rank 0 decodes
        (other ranks get no images or pixels). Callbacks run on every rank, and latents they
        return must be the same on every rank.

        ``result.metadata["profile"]`` says where the time went (:mod:`jointdiff.cost.profiling`);
        ``profile`` True (None: inside :func:`jointdiff.cost.profiling.session`) also waits for the
        device at phase boundaries and adds the estimate with its FLOPs."""
        self._check_call(num_inference_steps, seed, output_type, callback_on_step_end)
        profile = profiling.enabled(profile)
        timer = profiling.PhaseTimer(self.device, synchronize=profile)
        # 1. Set up the plugins with the job's context; timesteps (on the CPU: indexing them
        #    never waits for the GPU).
        with timer.phase("setup"):
            run = self._setup(num_inference_steps, int(seed), profile)
        run.timer = timer
        # 2. The initial canvas (its unit noise is kept for plugins: context.initial_noise).
        run.canvas = self._initial_latents(latents, run.context)
        prepared = run.context.init_image
        if prepared is not None:  # img2img: the image noised to the first step run
            run.canvas, run.scheduler = init_image.start_canvas(prepared, run.context.initial_noise, self.model, run.scheduler)
        # 3. Window batches (this rank's share with window parallelism) and the fusion.
        self._prepare_windows(run)
        if prepared is not None:
            init_image.attach(prepared, run.fusion, run.context.initial_noise, self.model, run.fusion_mode == "x0")
        # 4. Resume from a checkpoint of this very job, if there is one.
        run.fingerprint = self._fingerprint(run, latents) if checkpoint is not None else None
        start = max(self._resume(run, checkpoint), prepared.first_step if prepared is not None else 0)
        # 5. Denoising loop.
        stopped = None
        with accelerated(self.model, self.compile):  # torch.compile, channels-last and SDPA on CUDA
            for i in self._progress(run, start, progress):
                run.canvas = self._denoise_step(run, i)
                if self._end_step(run, i, checkpoint, callback_on_step_end, callback):
                    stopped = i
                    break
        # 6. Decode; a finished job removes its checkpoint.
        result = self._finish(run, output_type, checkpoint, stopped)
        result.metadata["profile"] = timer.report()
        if profile:
            result.metadata["profile"]["estimate"] = run.estimate.to_dict()
            profiling.finished(result.metadata["profile"])
        return result

    @staticmethod
    def _check_call(num_inference_steps: Any, seed: Any, output_type: Any, callback_on_step_end: Any) -> None:
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        if output_type not in ("pil", "latent"):
            raise ConfigError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ConfigError(f"callback_on_step_end must be callable, got {callback_on_step_end!r}")

    def _setup(self, num_inference_steps: int, seed: int, profile: bool = False) -> _Run:
        """Geometry, conditioners and synchronizer see the model; the denoiser and the
        scheduler's timesteps are set. Profiling: the estimate has FLOPs and is announced."""
        self.geometry.setup(self.model.latent_format)
        self._auto_view_batch = None  # "auto" is sized anew for every job
        check_canvas_megapixels(self.geometry, self.max_megapixels)  # arithmetic first: the estimate walks windows
        estimate = self.estimate(num_inference_steps, flops=profile, seed=seed)
        if profile:
            profiling.announce(estimate, self)
        budget.check(estimate, self.max_megapixels, self.memory_limit_gb, self.geometry.name)
        self._check_one_per_job()
        check_geometry_maps(self.geometry, self.conditioners)
        comm = resolve_distributed(self.distributed)
        generator = torch.Generator("cpu").manual_seed(seed)
        context = JobContext(self.model, self.geometry, self.device, self.dtype, num_inference_steps, generator,
                             seed=seed, distributed=comm)
        if comm is not None:
            context.extras["distributed"] = comm  # for plugins of older versions
        if self.init is not None:  # checked against the canvas and encoded before plugins set up
            context.init_image = init_image.prepare(self.init, self.model, self.geometry, seed, num_inference_steps,
                                                    self.decode_tile_latent)
        for conditioner in self.conditioners:
            conditioner.setup(context)
        prompt = self._prompt()
        denoiser = Denoiser(context, prompt, self.conditioners, self._window_offsets())
        if self.synchronizer is not None:
            self.synchronizer.setup(context)
        scheduler = self.model.scheduler
        self.model.set_timesteps(scheduler, num_inference_steps, self.geometry.window_size_latent)
        return _Run(seed, context, comm, prompt, denoiser, scheduler, scheduler.timesteps, torch.empty(0), estimate=estimate)

    def _check_one_per_job(self) -> None:
        """ConfigError for a second conditioner of a class that allows one per job."""
        seen: set[type] = set()
        for conditioner in self.conditioners:
            cls = type(conditioner)
            if getattr(cls, "one_per_job", False) and cls in seen:
                name = getattr(cls, "name", cls.__name__)
                raise ConfigError(f"a job takes one {name!r} conditioner, got several in conditioners")
            seen.add(cls)

    def _prepare_windows(self, run: _Run) -> None:
        """This rank's window batches, each with its own scheduler state, and the fusion."""
        batches = self._window_batches(run.scheduler, run.prompt, run.seed)
        run.fusion_mode = self.fusion or getattr(self.geometry, "preferred_fusion", "latent")
        if self.windows == "shifted":  # SpotDiffusion: new non-overlapping windows every step

            run.batches, run.fusion = make_shifted_fusion(self, run)
            return
        if run.comm is not None:
            batches = run.comm.assign(batches, self._batch_costs(batches, len(run.timesteps), run.comm))
        run.batches = batches
        run.fusion = make_fusion(
            run.fusion_mode, self.geometry, run.canvas, batches, self._weights_fn(run.prompt, run.canvas.device),
            self._step_kwargs(run.scheduler), reduce=run.comm.all_reduce_ if run.comm is not None else None,
            noise_sigma=self.model.initial_noise_sigma(run.scheduler), generator_for=run.context.generator_for,
            scheduler=run.scheduler,
        )
        if not bool((run.fusion.weight_sum > 0).all()):
            raise ConfigError(f"geometry {self.geometry.name!r} (with its region masks) leaves canvas cells without weight")

    @staticmethod
    def _progress(run: _Run, start: int, progress: bool):
        """Step indices under a progress bar that ticks per step, or per window batch when a
        step has many (:class:`~jointdiff.cost.budget.LoopProgress`)."""
        show = progress and (run.comm is None or run.comm.rank == 0)
        run.progress = budget.LoopProgress(len(run.timesteps), len(run.batches), start, disable=not show)
        return run.progress.steps(start)

    def _denoise_step(self, run: _Run, i: int) -> torch.Tensor:
        """One step over this rank's batches; returns the new canvas (after the all-reduce)."""
        t = run.timesteps[i]
        batches = run.fusion.step_batches(i, run.batches)
        if batches is not run.batches:  # windows = "shifted": this step's own windows
            run.batches = list(batches)
            run.denoiser.offsets = self._window_offsets()
            run.denoiser._rows_cache.clear()  # prompts and offsets are cached per window ids
        # A shallow copy of a batch's scheduler, positioned at this step, for plugins.
        clock = copy.copy(run.batches[0].scheduler if run.batches else run.scheduler)
        state = StepState(i, t, len(run.timesteps), run.canvas, run.denoiser, run.context, run.fusion, clock)
        failure = self._local_step(state, run)
        if run.comm is not None:
            run.comm.check(failure, f"step {i}")
        with run.timer.phase("fusion"):
            canvas = run.fusion.end_step(t, run.denoiser)
        if self.check_finite:
            self._note_finite(run, canvas, i)
        return canvas

    @staticmethod
    def _note_finite(run: _Run, canvas: torch.Tensor, i: int) -> None:
        """Record on the device, without waiting for it, whether step ``i``'s canvas is
        finite: ``run.bad_step`` keeps the first step that was not."""
        if run.bad_step is None:
            run.bad_step = torch.full((), len(run.timesteps), dtype=torch.long, device=canvas.device)
        run.bad_step = torch.where(torch.isfinite(canvas).all(), run.bad_step, run.bad_step.clamp(max=i))

    @staticmethod
    def _raise_if_nonfinite(run: _Run, cause: BaseException | None = None) -> None:
        """:class:`NonFiniteLatentsError` naming the first step whose canvas had NaN or inf
        (one host-device sync)."""
        if run.bad_step is None:
            return
        bad = int(run.bad_step)
        if bad < len(run.timesteps):
            message = f"NaN or inf in the canvas latents at step {bad} (timestep {int(run.timesteps[bad])})"
            raise NonFiniteLatentsError(message) from cause

    def _local_step(self, state: StepState, run: _Run) -> BaseException | None:
        """Synchronizer, conditioners and the model for this rank's batches; the numerator
        is left in the fusion. With window parallelism an exception is returned (for the
        error check every rank joins), not raised."""
        fusion, t, timer = run.fusion, state.timestep, run.timer
        try:
            if self.synchronizer is not None:
                with timer.phase("synchronization"):
                    self.synchronizer.begin_step(state)
            fusion.begin_step(state.step_index)
            for batch in run.progress.batches(run.batches) if run.progress is not None else run.batches:
                with timer.phase("fusion"):
                    window_latents = fusion.window_latents(batch)
                if self.synchronizer is not None:
                    with timer.phase("synchronization"):
                        window_latents = self.synchronizer.update(window_latents, batch, state)
                for conditioner in self.conditioners:
                    window_latents = conditioner.modify_latents(window_latents, batch, state)
                with timer.phase("model"):
                    output = run.denoiser.step_output(window_latents, t, batch.window_ids, batch.scheduler,
                                                      batch.prompt_index, state.step_index)
                with timer.phase("fusion"):
                    fusion.add(batch, window_latents, output, t, run.denoiser)
        except Exception as error:
            if run.comm is None:
                if self.check_finite:  # an earlier NaN canvas is the cause to name
                    self._raise_if_nonfinite(run, error)
                raise
            return error
        return None

    def _end_step(self, run: _Run, i: int, checkpoint: Checkpoint | None, on_step_end: StepEndCallback | None,
                  callback: StepCallback | None) -> bool:
        """After step ``i``: the step-end callback (may replace the canvas or stop), the
        checkpoint when due, then the observing callback. Returns whether to stop; a stopped
        job writes its checkpoint at this step so it can be resumed."""
        t, last = run.timesteps[i], i + 1 == len(run.timesteps)
        due = checkpoint is not None and checkpoint.due(i, len(run.timesteps))
        if self.check_finite and (last or due or on_step_end is not None or callback is not None or (i + 1) % self.finite_check_every == 0):
            self._raise_if_nonfinite(run)
        stop = late_stop = saved = False
        if on_step_end is not None:
            stop = self._run_callback(run, f"callback_on_step_end of step {i}", lambda: on_step_end(i, t, run.canvas), True)
        if checkpoint is not None and checkpoint.due(i, len(run.timesteps)):
            self._save(run, checkpoint, i + 1)
            saved = True
        if callback is not None:
            late_stop = self._run_callback(run, f"the step callback of step {i}", lambda: callback(i, int(t), run.canvas), False)
        stop = stop or late_stop
        if stop and checkpoint is not None and not last and (late_stop or not saved):  # may have new latents
            self._save(run, checkpoint, i + 1)
        return stop

    def _run_callback(self, run: _Run, where: str, action: Callable[[], Any], replaces: bool) -> bool:
        """Run a callback; returned latents (``replaces``) or a :class:`StopJob`'s replace
        the canvas. With window parallelism a failure on any rank stops every rank with an
        error, a :class:`StopJob` on any rank stops every rank. Returns whether to stop."""
        failure, stop = None, False
        try:
            try:
                latents = action()
            except StopJob as request:
                stop, latents = True, request.latents
            if latents is not None and (replaces or stop):
                self._replace_canvas(run, latents, where)
        except Exception as error:
            if run.comm is None:
                raise
            failure = error
        if run.comm is not None:
            stop = run.comm.check(failure, where, stop)
        return stop

    @staticmethod
    def _replace_canvas(run: _Run, latents: Any, where: str) -> None:
        shape = tuple(run.canvas.shape)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ConfigError(f"{where} must return None or canvas latents of shape {shape}, got {got}")
        try:
            run.fusion.set_canvas(latents.to(run.canvas.device, torch.float32))
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
        run.canvas = run.fusion.canvas

    def _batch_costs(self, batches: Sequence[WindowBatch], num_steps: int, comm: Distributed) -> list[float]:
        """Relative cost of each batch over the job, for balancing the ranks."""
        costs = window_costs(self.geometry.num_windows, num_steps, self.synchronizer, comm.sync_cost, comm.anchor_cost)
        return [sum(costs[w] for w in batch.window_ids) for batch in batches]

    # -- checkpoints (jointdiff.engine.job_state) ------------------------------------------------

    def _fingerprint(self, run: _Run, latents: torch.Tensor | None) -> dict[str, Any]:
        return job_state.fingerprint(self, run, latents)

    def _save(self, run: _Run, checkpoint: Checkpoint, next_step: int) -> None:
        job_state.save(self, run, checkpoint, next_step)

    def _resume(self, run: _Run, checkpoint: Checkpoint | None) -> int:
        return job_state.resume(self, run, checkpoint)

    def _finish(self, run: _Run, output_type: str, checkpoint: Checkpoint | None, stopped: int | None) -> JointResult:
        """The result (decoded on rank 0 only with window parallelism: every rank holds the
        same canvas); the checkpoint of a job that ran all its steps is removed."""
        finished = stopped is None or stopped + 1 == len(run.timesteps)
        run.fusion.close()  # shifted windows: the geometry gets its own windows back
        if finished and run.comm is None:  # with ranks, no process holds every window
            run.fusion.hand_over_windows()
        metadata: dict[str, Any] = {"seed": run.seed, "num_inference_steps": len(run.timesteps),
                                    "windows": self.geometry.num_windows}
        metadata["job"] = job_of_engine(self, len(run.timesteps), run.seed)  # saved PNGs carry it (JointResult.save)
        if not finished:
            metadata["stopped_at_step"] = stopped
        if run.comm is not None:
            metadata.update(rank=run.comm.rank, world_size=run.comm.world_size)
        if output_type == "latent" or (run.comm is not None and run.comm.rank != 0):
            result = JointResult([], run.canvas, None, metadata)
        else:
            with run.timer.phase("decode"):
                pixels = self.geometry.decode(run.canvas, self._final_decode())
            images = self.geometry.to_images(pixels)
            result = JointResult(images, run.canvas, pixels, metadata,
                                 companions=lambda path: self.geometry.write_companions(images, path))
        if checkpoint is not None and finished:
            remove_checkpoint(checkpoint, run.comm)
        return result

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents)

    def _final_decode(self):
        """The decode function of the final decode: in tiles of the model's native window
        when large (``decode_tile_latent``, :func:`jointdiff.models.tiled_decode.final_decode`)."""
        latent = self.model.latent_format
        return tiled_decode.final_decode(self._vae_decode, latent.scale_factor, latent.native_window,
                                         self.decode_tile_latent, tiled_decode.decoder_norms(self.model))

    def estimate(self, num_inference_steps: int = 50, *, flops: bool = True, seed: int = 0) -> budget.Estimate:
        """What this job will cost (windows, model evaluations, memory and, with ``flops``,
        FLOPs), before it runs: see :func:`jointdiff.cost.budget.estimate` and
        :mod:`jointdiff.cost.profiling`. Sets the geometry up for the model; ``flops`` runs each
        network once on one window (cached per model and window shape); ``seed`` matters only
        to shifted windows (their layout)."""
        return budget.estimate(
            self.geometry, self.model, self.view_batch_size, num_inference_steps, self.synchronizer,
            conditioners=self.conditioners, fusion=self.fusion, decode_tile_latent=self.decode_tile_latent,
            flops=flops, loop=loop_plan(self, num_inference_steps, seed),
        )

"""Conformance checks for jointdiff plugins, for the plugin's own test suite.

A few lines run every check on a plugin class with pytest::

    from jointdiff.testing import GeometryConformance

    class TestMyGeometry(GeometryConformance):
        def make_geometry(self):
            return MyGeometry(width_px=1024)

:class:`ConditionerConformance`, :class:`SynchronizerConformance` and
:class:`FamilyConformance` (model families) work the same way. Every check is also a plain
function (:func:`check_geometry`, :func:`check_conditioner`, :func:`check_synchronizer`,
:func:`check_family`, ...) that raises ``AssertionError`` saying what is wrong. The checks
need no GPU and no download: conditioner and synchronizer checks run a built-in tiny model
(random weights; ``tiny``, a UNet, by default; pass ``model="tiny-flux"`` or another tiny
model name to check on a transformer family), so they test the contract, not image quality.

Conventions follow :mod:`jointdiff.core.geometry`: canvases are ``(S, C, H, W)`` latents, windows
``(B, C, h, w)``, sizes ``(h, w)`` in latent cells.

Plugin classes may offer two optional classmethods used by these checks and by jointdiff's
own tests: ``example_options()`` returns small, cheap options (a dict) that construct a
working instance, and ``zero_strength_options()`` (synchronizers) returns options for an
instance that must leave latents unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, Sequence

import pydantic
import torch

from jointdiff.core import registry as plugin_module
from jointdiff.core.conditioner import Conditioner, Prompt, encode_text
from jointdiff.core.context import JobContext, StepState, WindowBatch
from jointdiff.core.family import SD_LATENT, Embeddings, LatentFormat, ModelFamily
from jointdiff.core.geometry import Geometry
from jointdiff.core.synchronizer import Synchronizer
from jointdiff.core.tiling import TiledGeometry
from jointdiff.engine.denoiser import Denoiser
from jointdiff.models.loading import as_model, load_model
from jointdiff.testing.family import (
    FAMILY_CHECKS,
    check_family,
    check_family_facts,
    check_family_forward,
    check_family_prompts,
    check_family_schedule,
    check_family_vae,
)
from jointdiff.testing.geometry import (
    LATENT_CHANNELS,
    OneWindowGeometry,
    _canvas,
    _close,
    _fuse,
    check_geometry,
    check_geometry_batching,
    check_geometry_coverage,
    check_geometry_decode,
    check_geometry_insert_is_linear,
    check_geometry_origins,
    check_geometry_pixel_scale,
    check_geometry_round_trip,
    check_geometry_shapes,
    check_options_round_trip,
    fail,
    local_decoder,
)
from jointdiff.testing.invariance import (
    check_batch_order_invariance,
    check_batch_size_invariance,
    check_invariance,
    check_resume_invariance,
)

# ----------------------------------------------------------------------------- model context


@functools.lru_cache(maxsize=8)
def tiny_model(name: str = "tiny") -> Any:
    """A built-in tiny model (``"tiny"``: Stable Diffusion; ``"tiny-flux"``: a FLUX.1
    transformer; ...) on the CPU in float32, built once per process. Shared: checks must not
    modify its weights."""
    return load_model(name, device="cpu", dtype="float32")


def tiny_pipeline() -> Any:
    """The diffusers pipeline of the built-in tiny Stable Diffusion model (see :func:`tiny_model`)."""
    return tiny_model("tiny").pipeline


class _ExampleStrip(TiledGeometry):
    """A horizontal strip of three windows of ``window`` latent cells (stride half a
    window): a job's geometry for checks of conditioners and synchronizers, independent of
    which plugins are installed."""

    name = "conformance-strip"

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def canvas_size_px(self) -> tuple[int, int]:
        return (self.window * self.latent_scale, 2 * self.window * self.latent_scale)

    def window_stride_latent(self):
        return (self.window, self.window), (self.window // 2, self.window // 2)


def example_geometry(window_latent: int = 32) -> Geometry:
    """A small geometry (three windows) for conditioner and synchronizer checks. Windows are
    half the native 64 cells by default: the UNet is convolutional, and it is 4x cheaper."""
    return _ExampleStrip(window_latent)


def make_context(model: Any = None, geometry: Geometry | None = None, steps: int = 2, seed: int = 0) -> JobContext:
    """A :class:`JobContext` as the engine builds it (geometry set up, generator seeded, the
    model's timesteps set). ``model``: a model family, a pipeline, or a tiny model name."""
    model = tiny_model(model) if isinstance(model, str) else as_model(model if model is not None else tiny_pipeline())
    geometry = geometry if geometry is not None else example_geometry()
    geometry.setup(model.latent_format)
    model.set_timesteps(model.scheduler, steps, geometry.window_size_latent)
    generator = torch.Generator("cpu").manual_seed(seed)
    return JobContext(model, geometry, model.device, model.dtype, steps, generator)


def encode_test_prompt(context: JobContext, text: str = "a test prompt", guidance_scale: float | None = None) -> Prompt:
    """A :class:`Prompt` encoded with the model family (with guidance where it has one)."""
    embeds, negative, scale = encode_text(context, [text], [None], guidance_scale, "test prompt")
    return Prompt(embeds, negative, scale)


# ----------------------------------------------------------------------------- conditioner


def _tensors(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nest of dicts, lists and tuples, with where it sits."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{path}[{index}]")


def check_prompt(prompt: Prompt, num_windows: int, reference: Prompt | None = None) -> None:
    """Embeddings are :class:`~jointdiff.core.family.Embeddings` with the same tensor names
    and per-row shapes as the family's own encoding (``reference``); negatives match them;
    every window has a prompt index in ``[0, P)``, for batches of any size."""
    embeds, negative = prompt.embeds, prompt.negative_embeds
    if reference is not None:
        want = {k: tuple(v.shape[1:]) for k, v in reference.embeds.tensors.items()}
        got = {k: tuple(v.shape[1:]) for k, v in embeds.tensors.items()}
        if want != got:
            fail(f"prompt embeds must have the model's tensors {want} per row, got {got}")
    if negative is not None and {k: v.shape for k, v in negative.tensors.items()} != {k: v.shape for k, v in embeds.tensors.items()}:
        fail(f"negative_embeds {negative!r} must match embeds {embeds!r}")
    if not float(prompt.guidance_scale) >= 0:
        fail(f"guidance_scale must be a number >= 0, got {prompt.guidance_scale!r}")
    for size in sorted({1, 2, num_windows}):
        ids = list(range(num_windows))[-size:]
        indices = prompt.indices(ids)
        if len(indices) != len(ids) or not all(isinstance(i, int) and 0 <= i < len(embeds) for i in indices):
            fail(f"prompt indices for windows {ids} must be {len(ids)} ints in [0, {len(embeds)}), got {indices!r}")


def _branch_inputs(context: JobContext, prompt: Prompt | None, ids: Sequence[int], branches: int):
    """Model inputs of a window batch as the denoiser lays them out: rows are
    ``[branch 0: windows..., branch 1: windows...]`` (unconditional branch first), with
    their :class:`Embeddings` rows (a test prompt's when the conditioner has none)."""
    geometry, model = context.geometry, context.model
    canvas = _canvas(geometry, model.latent_format.channels, seed=4).to(context.device, context.dtype)
    windows = geometry.extract(canvas, ids)
    if prompt is None or prompt.negative_embeds is None and branches == 2:
        prompt = encode_test_prompt(context)
    negative = prompt.negative_embeds if prompt.negative_embeds is not None else prompt.embeds
    index = prompt.indices(ids)
    rows = [negative.select(index), prompt.embeds.select(index)][-branches:]
    states = Embeddings.cat(rows).to(context.device, context.dtype)
    return torch.cat([windows] * branches), states


def _model_kwargs_rows(conditioner: Conditioner, context: JobContext, ids: list[int], branches: int) -> None:
    """One batch: every returned tensor has one row per UNet input row, and row ``b*B + k``
    equals what window ``ids[k]`` gets when computed alone."""
    timestep = context.model.scheduler.timesteps[0]
    prompt = conditioner.prompt()
    model_input, states = _branch_inputs(context, prompt, ids, branches)
    kwargs = conditioner.model_kwargs(model_input, timestep, states, ids, context)
    if not isinstance(kwargs, dict):
        fail(f"model_kwargs must return a dict, got {type(kwargs).__name__}")
    for path, tensor in _tensors(kwargs):
        if tensor.ndim == 0 or tensor.shape[0] != len(model_input):
            fail(f"model_kwargs{path} has shape {tuple(tensor.shape)}; expected {len(model_input)} "
                 f"rows ({branches} branch(es) x {len(ids)} window(s))")
    for k, window_id in enumerate(ids):
        one_input, one_states = _branch_inputs(context, prompt, [window_id], branches)
        alone = dict(_tensors(conditioner.model_kwargs(one_input, timestep, one_states, [window_id], context)))
        for path, tensor in _tensors(kwargs):
            if path not in alone:
                fail(f"model_kwargs{path} is returned for a batch of {len(ids)} but not for window {window_id} alone")
            rows = tensor[[b * len(ids) + k for b in range(branches)]]
            where = f"model_kwargs{path} of window {window_id} in a batch of {len(ids)}"
            _close(rows, alone[path], 1e-4, where)


def check_model_kwargs(conditioner: Conditioner, context: JobContext) -> None:
    """For batches of 1, 2 and all windows, with and without a guidance branch, the rows of
    ``model_kwargs`` match the model input rows (see :func:`_model_kwargs_rows`); and the
    model family's ``forward`` accepts them."""
    count = context.geometry.num_windows
    for branches in (1, 2):
        for size in sorted({1, min(2, count), count}):
            _model_kwargs_rows(conditioner, context, list(range(count))[-size:], branches)
    ids = list(range(count))[: min(2, count)]
    model_input, states = _branch_inputs(context, conditioner.prompt(), ids, 2)
    timestep = context.model.scheduler.timesteps[0]
    kwargs = conditioner.model_kwargs(model_input, timestep, states, ids, context)
    model = context.model
    scale = torch.full((len(model_input),), model.default_guidance_scale) if model.guidance_mode == "distilled" else None
    with torch.no_grad():
        output = model.forward(model_input, timestep, states, guidance_scale=scale, extra=kwargs)
    if output.shape != model_input.shape:
        fail(f"with these model_kwargs the model returned {tuple(output.shape)} for input {tuple(model_input.shape)}")


def check_conditioner(conditioner: Conditioner, context: JobContext | None = None) -> None:
    """Every conditioner check: set up on ``context`` (default: the tiny model and
    :func:`example_geometry`), then :func:`check_prompt` and :func:`check_model_kwargs`."""
    context = context if context is not None else make_context()
    conditioner.setup(context)
    prompt = conditioner.prompt()
    if prompt is not None:
        check_prompt(prompt, context.geometry.num_windows, encode_test_prompt(context))
    check_model_kwargs(conditioner, context)
    check_options_round_trip(conditioner)


# ----------------------------------------------------------------------------- synchronizer


class _CanvasWindows:
    """What :attr:`StepState.fusion` offers a synchronizer with latent fusion: the noisy
    latents of any windows, cut from the canvas."""

    def __init__(self, geometry: Geometry, canvas: torch.Tensor) -> None:
        self.geometry, self.canvas = geometry, canvas

    def latents_of(self, window_ids: Sequence[int]) -> torch.Tensor:
        return self.geometry.extract(self.canvas, window_ids)


def run_synchronizer(
    synchronizer: Synchronizer, context: JobContext, prompt: Prompt | None = None, batch_size: int = 2
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Drive a synchronizer as the engine does, for every step of ``context`` on one noisy
    canvas: ``setup``, then per step ``begin_step`` and ``update`` of each window batch.
    Returns ``(window latents, updated latents)`` pairs; fails if the canvas changes in place."""
    model, geometry = context.model, context.geometry
    scheduler = model.scheduler
    model.set_timesteps(scheduler, context.num_inference_steps, geometry.window_size_latent)
    denoiser = Denoiser(context, prompt if prompt is not None else encode_test_prompt(context), [])
    synchronizer.setup(context)
    canvas = _canvas(geometry, model.latent_format.channels, seed=6).to(context.device)
    canvas = canvas * model.initial_noise_sigma(scheduler)
    before = canvas.clone()
    ids = list(range(geometry.num_windows))
    batches = [
        WindowBatch(j, tuple(ids[i : i + batch_size]), copy.deepcopy(scheduler))
        for j, i in enumerate(range(0, len(ids), batch_size))
    ]
    pairs = []
    windows = _CanvasWindows(geometry, canvas)
    for step, timestep in enumerate(scheduler.timesteps):
        state = StepState(step, timestep, len(scheduler.timesteps), canvas, denoiser, context, windows)
        synchronizer.begin_step(state)
        for batch in batches:
            latents = geometry.extract(canvas, batch.window_ids)
            updated = synchronizer.update(latents.clone(), batch, state)
            if updated.shape != latents.shape or not bool(torch.isfinite(updated).all()):
                fail(f"update must return finite latents of shape {tuple(latents.shape)}, got {tuple(updated.shape)}")
            pairs.append((latents.float().cpu(), updated.detach().float().cpu()))
    if not torch.equal(canvas, before):
        fail("the synchronizer modified the canvas in place (the engine reads it for every batch)")
    return pairs


def check_synchronizer_deterministic(
    factory: Callable[[], Synchronizer], pipeline: Any = None, atol: float = 0.0, prompt: Prompt | None = None
) -> None:
    """Two fresh instances given the same inputs return the same latents."""
    first = run_synchronizer(factory(), make_context(pipeline), prompt)
    second = run_synchronizer(factory(), make_context(pipeline), prompt)
    for index, ((_, a), (_, b)) in enumerate(zip(first, second)):
        _close(a, b, atol, f"synchronizer output {index} of two identical runs")


def check_synchronizer_noop(
    factory: Callable[[], Synchronizer], pipeline: Any = None, atol: float = 1e-6, prompt: Prompt | None = None
) -> None:
    """An instance at zero strength (from ``factory``) returns every window's latents unchanged."""
    for index, (latents, updated) in enumerate(run_synchronizer(factory(), make_context(pipeline), prompt)):
        _close(updated, latents, atol, f"zero-strength synchronizer output {index} vs. its input")


def check_synchronizer(
    factory: Callable[[], Synchronizer], zero_strength: Callable[[], Synchronizer] | None = None, pipeline: Any = None
) -> None:
    """Every synchronizer check; the no-op check runs when a zero-strength factory is given."""
    prompt = encode_test_prompt(make_context(pipeline))
    check_synchronizer_deterministic(factory, pipeline, prompt=prompt)
    if zero_strength is not None:
        check_synchronizer_noop(zero_strength, pipeline, prompt=prompt)
    check_options_round_trip(factory())


# ----------------------------------------------------------------------------- options by convention


def example_options(cls: type, guess: bool = True) -> dict[str, Any] | None:
    """Options to build a working instance of ``cls`` in tests: its ``example_options()``
    if it has one; else, with ``guess``, ``{}`` if its defaults validate; else None.

    Defaults that validate may still be unusable offline (a conditioner or synchronizer that
    loads weights), which is what ``example_options()`` is for."""
    provider = getattr(cls, "example_options", None)
    if provider is not None:
        return dict(provider())
    if not guess:
        return None
    try:
        cls.Options()
    except pydantic.ValidationError:
        return None
    return {}


def zero_strength_options(cls: type) -> dict[str, Any] | None:
    """Options of a zero-strength (no-op) synchronizer, from ``cls.zero_strength_options()``."""
    provider = getattr(cls, "zero_strength_options", None)
    return dict(provider()) if provider is not None else None


def family_model(cls: type, model: Any = None, options: Mapping[str, Any] | None = None) -> Any:
    """An instance of the model family ``cls`` to check: ``model`` itself when it is a
    bound family, else ``cls`` bound to the pipeline of the tiny model ``model`` (default:
    the first of ``cls.tiny_models``), with ``options``."""
    if isinstance(model, ModelFamily):
        return model
    if model is None:
        if not cls.tiny_models:
            fail(f"model family {getattr(cls, 'name', cls.__name__)!r} has no tiny_models: pass model= "
                 "(a bound family or a pipeline) to check it")
        model = next(iter(cls.tiny_models))
    pipeline = tiny_model(model).pipeline if isinstance(model, str) else model
    return cls(pipeline, dict(options or {}))


def check_plugin_class(kind: str, cls: type, options: Mapping[str, Any] | None = None, model: Any = None) -> None:
    """Run the checks of ``kind`` on ``cls`` built with ``options`` (default: its
    :func:`example_options`).

    ``model``: what to check on (a tiny model name such as ``"tiny"`` or ``"tiny-flux"``, a
    model family or a pipeline; default ``"tiny"``): geometries are set up with its latent
    format (or ``model`` itself when it is a :class:`LatentFormat`), conditioners and
    synchronizers run on it. For ``kind == "family"``, ``cls`` is
    bound to it (default: the class's first tiny model) and :func:`check_family` runs."""
    options = dict(options) if options is not None else example_options(cls)
    if options is None:
        fail(f"{cls.__name__} needs options: pass them or give the class an example_options() classmethod")
    if kind == "family":
        check_family(family_model(cls, model, options))
        return
    if isinstance(model, str):
        model = tiny_model(model)
    if kind == "geometry":
        latent = model if model is None or isinstance(model, (LatentFormat, int)) else as_model(model).latent_format
        latent = latent if latent is not None else 8
        check_geometry(cls(**options), latent, atol=getattr(cls, "round_trip_atol", 1e-5))
    elif kind == "conditioner":
        check_conditioner(cls(**options), make_context(model))
    elif kind == "synchronizer":
        zero = zero_strength_options(cls)
        check_synchronizer(lambda: cls(**options), (lambda: cls(**zero)) if zero is not None else None, model)
    else:
        raise ValueError(f"kind must be geometry, conditioner, synchronizer or family, got {kind!r}")


@contextlib.contextmanager
def isolated_plugins(*plugins: Any, entry_points: bool = True) -> Iterator[Any]:
    """Swap in a fresh process-wide plugin manager (so :func:`jointdiff.core.registry.create` sees
    only what this test loads) and restore the previous one afterwards.

    ``entry_points``: load the installed ``jointdiff`` entry points (honouring
    ``JOINTDIFF_PLUGINS``); ``plugins``: modules or objects with hook implementations to add.
    Yields the :class:`jointdiff.core.registry.PluginManager`.
    """
    manager = plugin_module.PluginManager()
    if entry_points:
        manager.load_entry_points()
    for plugin in plugins:
        manager.add(plugin, getattr(plugin, "__name__", None) or repr(plugin))
    previous = plugin_module._MANAGER
    plugin_module._MANAGER = manager
    try:
        yield manager
    finally:
        plugin_module._MANAGER = previous


# ----------------------------------------------------------------------------- pytest mixins


class GeometryConformance:
    """Mix into a ``Test...`` class and define :meth:`make_geometry`; pytest then runs every
    geometry check as its own test (skipping, with its reason, any the geometry's
    ``conformance_exempt`` names). Override ``atol`` for resampling geometries, and
    ``latent`` (a :class:`~jointdiff.core.family.LatentFormat`, SD's by default) to check
    against another model's latent format. ``setup`` receives that ``LatentFormat``, as the
    engine calls it."""

    latent: LatentFormat = SD_LATENT
    atol = 1e-5

    @property
    def latent_scale(self) -> int:
        """Pixels per latent cell of :attr:`latent` (the ``k`` of the k× pixel-scale check)."""
        return self.latent.scale_factor

    def make_geometry(self) -> Geometry:
        raise NotImplementedError("define make_geometry() to return the geometry to check")

    def _geometry(self, check: str | None = None) -> Geometry:
        """The geometry, set up; skips the test when its ``conformance_exempt`` names ``check``."""
        geometry = self.make_geometry()
        why = dict(getattr(geometry, "conformance_exempt", {})).get(check) if check else None
        if why is not None:
            import pytest  # lazy: pytest is there only when the mixin runs under it

            pytest.skip(f"{geometry.name}: {check} does not apply: {why}")
        latent = self.latent
        if self.latent_scale != latent.scale_factor:  # a subclass that sets latent_scale = k (kit 2.0)
            latent = dataclasses.replace(latent, scale_factor=int(self.latent_scale))
        geometry.setup(latent)
        return geometry

    def test_geometry_shapes(self) -> None:
        check_geometry_shapes(self._geometry())

    def test_geometry_batching(self) -> None:
        check_geometry_batching(self._geometry())

    def test_geometry_insert_is_linear(self) -> None:
        check_geometry_insert_is_linear(self._geometry(), self.atol)

    def test_geometry_covers_canvas(self) -> None:
        check_geometry_coverage(self._geometry())

    def test_geometry_round_trip(self) -> None:
        check_geometry_round_trip(self._geometry("round_trip"), self.atol)

    def test_geometry_origins(self) -> None:
        check_geometry_origins(self._geometry())

    def test_geometry_pixel_scale(self) -> None:
        check_geometry_pixel_scale(self._geometry("pixel_scale"))

    def test_geometry_decode(self) -> None:
        check_geometry_decode(self._geometry("decode"), self.latent_scale)

    def test_geometry_options_round_trip(self) -> None:
        check_options_round_trip(self.make_geometry())


class ConditionerConformance:
    """Mix into a ``Test...`` class and define :meth:`make_conditioner`; override
    :meth:`make_pipeline` or :meth:`make_geometry` to check on another model or canvas."""

    def make_conditioner(self) -> Conditioner:
        raise NotImplementedError("define make_conditioner() to return the conditioner to check")

    def make_pipeline(self) -> Any:
        return tiny_model()

    def make_geometry(self) -> Geometry:
        return example_geometry()

    def test_conditioner_batches(self) -> None:
        check_conditioner(self.make_conditioner(), make_context(self.make_pipeline(), self.make_geometry()))


class SynchronizerConformance:
    """Mix into a ``Test...`` class and define :meth:`make_synchronizer`; define
    :meth:`make_zero_strength_synchronizer` when the synchronizer has a strength option."""

    def make_synchronizer(self) -> Synchronizer:
        raise NotImplementedError("define make_synchronizer() to return the synchronizer to check")

    def make_zero_strength_synchronizer(self) -> Synchronizer | None:
        return None

    def make_pipeline(self) -> Any:
        return tiny_model()

    def test_synchronizer_deterministic(self) -> None:
        check_synchronizer_deterministic(self.make_synchronizer, self.make_pipeline())

    def test_synchronizer_noop_at_zero_strength(self) -> None:
        if self.make_zero_strength_synchronizer() is None:
            import pytest

            pytest.skip("no zero-strength instance: define make_zero_strength_synchronizer()")
        check_synchronizer_noop(self.make_zero_strength_synchronizer, self.make_pipeline())

    def test_synchronizer_options_round_trip(self) -> None:
        check_options_round_trip(self.make_synchronizer())


class FamilyConformance:
    """Mix into a ``Test...`` class and define :meth:`make_model` (a
    :class:`~jointdiff.core.family.ModelFamily` bound to a small pipeline on the CPU in
    float32, e.g. of random tiny weights); pytest then runs every model-family check as its
    own test. ``make_model`` is called once per test: cache it if building is slow."""

    def make_model(self) -> Any:
        raise NotImplementedError("define make_model() to return the model family (bound to a pipeline) to check")

    def test_family_facts(self) -> None:
        check_family_facts(self.make_model())

    def test_family_prompts(self) -> None:
        check_family_prompts(self.make_model())

    def test_family_forward(self) -> None:
        check_family_forward(self.make_model())

    def test_family_schedule(self) -> None:
        check_family_schedule(self.make_model())

    def test_family_vae(self) -> None:
        check_family_vae(self.make_model())

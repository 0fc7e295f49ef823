"""Model-family conformance checks: what the engine, fusion and plugins rely on a
:class:`~jointdiff.core.family.ModelFamily` to do.

Every check takes a family bound to a (tiny, random-weight) pipeline on the CPU in float32
and raises ``AssertionError`` naming the family and what is wrong. They are cheap: windows
of a few latent cells, two-step schedules, batches of one or two. Checks never change the
model's weights or the pipeline's own scheduler (they step a copy).

Tensor conventions follow :mod:`jointdiff.core.family`: window latents ``(N, C, h, w)``
float32 in the canvas latent space, pixels ``(N, 3, f·h, f·w)``.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence, get_args

import torch

from jointdiff.core.family import Embeddings, GuidanceMode, LatentFormat, ModelFamily
from jointdiff.testing.geometry import _close, fail

GUIDANCE_MODES = get_args(GuidanceMode)
BATCH_ATOL = 1e-4
"""Tolerance of batch invariance: rows of a batch vs. each row alone (float32 kernels may
reorder sums by batch size, nothing more)."""
STEPS = 2


def _who(model: ModelFamily) -> str:
    return f"model family {getattr(model, 'name', type(model).__name__)!r}"


def _relative_atol(atol: float, *tensors: torch.Tensor) -> float:
    """``atol`` scaled to the largest magnitude among ``tensors`` (at least 1)."""
    scale = max([1.0] + [float(t.detach().abs().max()) for t in tensors if t.numel()])
    return atol * scale


def _check_tensor(value: Any, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """A finite float32 tensor of ``shape``."""
    if not isinstance(value, torch.Tensor):
        fail(f"{what} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        fail(f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if value.dtype != torch.float32:
        fail(f"{what} is {value.dtype}, expected torch.float32")
    if not bool(torch.isfinite(value).all()):
        fail(f"{what} has non-finite values")
    return value


def small_side(model: ModelFamily) -> int:
    """A small window side (latent cells) the family takes: its ``min_window`` (at least 8),
    rounded up to whole patches."""
    latent = model.latent_format
    side = max(latent.min_window, 8)
    return -(-side // latent.patch) * latent.patch


def _latents(model: ModelFamily, n: int, side: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, model.latent_format.channels, side, side, generator=generator)
    return latents.to(model.device)


def _scheduler(model: ModelFamily, side: int) -> Any:
    """A copy of the pipeline's scheduler with ``STEPS`` timesteps set for ``side`` windows."""
    scheduler = copy.deepcopy(model.scheduler)
    model.set_timesteps(scheduler, STEPS, (side, side))
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        fail(f"{_who(model)}: set_timesteps({STEPS} steps) left the scheduler without timesteps")
    return scheduler


# ----------------------------------------------------------------------------- class facts


def _check_latent_format(latent: Any, what: str) -> None:
    if not isinstance(latent, LatentFormat):
        fail(f"{what} must be a LatentFormat, got {type(latent).__name__}")
    for field in ("channels", "scale_factor", "patch", "native_window", "min_window", "max_window"):
        value = getattr(latent, field)
        if not isinstance(value, int) or value < 1:
            fail(f"{what}.{field} must be a positive int, got {value!r}")
    if not latent.min_window <= latent.native_window <= latent.max_window:
        fail(f"{what}: native_window {latent.native_window} is outside min_window..max_window "
             f"({latent.min_window}..{latent.max_window})")
    if latent.native_window % latent.patch:
        fail(f"{what}: native_window {latent.native_window} is not a whole number of {latent.patch}-cell patches")
    if latent.max_window < max(latent.min_window, 8):
        fail(f"{what}: max_window {latent.max_window} leaves no window of at least 8 cells")


def check_family_facts(model: ModelFamily) -> None:
    """Class facts: a ``name``, non-empty ``pipeline_classes`` that accept the bound
    pipeline, consistent latent formats (class and checkpoint), a known guidance mode and
    a non-negative default guidance scale."""
    cls = type(model)
    if not isinstance(model, ModelFamily):
        fail(f"{cls.__name__} is not a jointdiff.core.family.ModelFamily")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        fail(f"{cls.__name__}.name must be a non-empty string, got {name!r}")
    who = _who(model)
    classes = cls.pipeline_classes
    if not isinstance(classes, tuple) or not classes or not all(isinstance(c, str) and c for c in classes):
        fail(f"{who}: pipeline_classes must be a non-empty tuple of diffusers pipeline class names, got {classes!r}")
    _check_latent_format(getattr(cls, "latent", None), f"{who}: class attribute latent")
    _check_latent_format(model.latent_format, f"{who}: latent_format")
    for what, mode in (("class attribute guidance", cls.guidance), ("guidance_mode", model.guidance_mode)):
        if mode not in GUIDANCE_MODES:
            fail(f"{who}: {what} must be one of {list(GUIDANCE_MODES)}, got {mode!r}")
    scale = cls.default_guidance_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
        fail(f"{who}: default_guidance_scale must be a number >= 0, got {scale!r}")
    if not cls.accepts(model.pipeline):
        fail(f"{who}: accepts() refuses its own pipeline, a {type(model.pipeline).__name__} "
             f"(pipeline_classes: {', '.join(classes)})")
    if not isinstance(model.denoiser_module, torch.nn.Module):
        fail(f"{who}: denoiser_module must be a torch.nn.Module, got {type(model.denoiser_module).__name__}")
    sigma = model.initial_noise_sigma(model.scheduler)
    if not isinstance(sigma, float) or not sigma > 0:
        fail(f"{who}: initial_noise_sigma must be a positive float, got {sigma!r}")


# ----------------------------------------------------------------------------- prompts


PROMPTS = ("a photo of a lake", "a red boat on the water at sunset")
NEGATIVES = ("", "blurry")


def _check_embeddings(embeds: Any, rows: int, what: str) -> Embeddings:
    if not isinstance(embeds, Embeddings):
        fail(f"{what} must be Embeddings, got {type(embeds).__name__}")
    shapes = {k: tuple(v.shape) for k, v in embeds.tensors.items()}
    if len(embeds) != rows or any(s[0] != rows for s in shapes.values()):
        fail(f"{what} must have {rows} row(s) (one per prompt), got {embeds!r}")
    for key, tensor in embeds.tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            fail(f"{what}[{key!r}] has non-finite values")
    return embeds


def encode_family_prompts(model: ModelFamily, count: int = 2) -> tuple[Embeddings, Embeddings | None]:
    """``count`` test prompts encoded by the family, with negatives when it uses ``cfg``."""
    negatives = list(NEGATIVES[:count]) if model.guidance_mode == "cfg" else None
    return model.encode_prompts(list(PROMPTS[:count]), negatives)


def check_family_prompts(model: ModelFamily) -> None:
    """``encode_prompts`` returns :class:`Embeddings` of ``P`` rows for ``P`` = 1 and 2;
    without negative prompts the second result is None; with them (``cfg`` families) it
    has the same tensor names and shapes as the prompts'."""
    who = _who(model)
    for count in (1, 2):
        result = model.encode_prompts(list(PROMPTS[:count]))
        if not isinstance(result, tuple) or len(result) != 2:
            fail(f"{who}: encode_prompts must return (embeds, negative_embeds), got {type(result).__name__}")
        _check_embeddings(result[0], count, f"{who}: encode_prompts of {count} prompt(s)")
        if result[1] is not None:
            fail(f"{who}: encode_prompts without negative prompts must return None negatives, got {result[1]!r}")
        if model.guidance_mode != "cfg":
            continue
        embeds, negative = model.encode_prompts(list(PROMPTS[:count]), list(NEGATIVES[:count]))
        what = f"{who}: encode_prompts of {count} prompt(s) with negative prompts"
        _check_embeddings(embeds, count, what)
        if negative is None:
            fail(f"{what} returned no negative embeddings (cfg guidance needs them)")
        _check_embeddings(negative, count, f"{what}: negatives")
        want = {k: tuple(v.shape) for k, v in embeds.tensors.items()}
        got = {k: tuple(v.shape) for k, v in negative.tensors.items()}
        if want != got:
            fail(f"{what}: negatives {got} must have the prompts' tensors and shapes {want}")


# ----------------------------------------------------------------------------- the model call


def _guidance(model: ModelFamily, n: int) -> torch.Tensor | None:
    """Distinct per-row scales for ``distilled`` families (None otherwise)."""
    if model.guidance_mode != "distilled":
        return None
    return float(model.default_guidance_scale) + torch.arange(n, dtype=torch.float32) * 1.5


def check_family_forward(model: ModelFamily, atol: float = BATCH_ATOL) -> None:
    """``forward`` on ``N`` windows ``(N, C, h, w)`` (``h = w``: a few whole patches)
    returns finite float32 ``(N, C, h, w)``, leaves its inputs alone and is batch-invariant:
    each row of a batch of 2 (two prompts; two guidance scales ``(N,)`` for ``distilled``
    families) equals that row computed alone, within ``atol`` (relative to the output's size).
    Families with ``supports_offsets`` take ``offsets`` ``(N, 2)``: zero offsets change
    nothing, and each row uses its own offset (batch-invariant as well)."""
    who = _who(model)
    side = small_side(model)
    scheduler = _scheduler(model, side)
    timestep = scheduler.timesteps[0]
    embeds, _ = model.encode_prompts(list(PROMPTS[:2]))
    embeds = embeds.to(model.device)
    latents = _latents(model, 2, side, seed=11)
    scale = _guidance(model, 2)
    before = latents.clone(), {k: v.clone() for k, v in embeds.tensors.items()}
    with torch.no_grad():
        together = model.forward(latents, timestep, embeds, guidance_scale=scale)
    _check_tensor(together, tuple(latents.shape), f"{who}: forward of {tuple(latents.shape)} windows")
    if not torch.equal(latents, before[0]) or any(not torch.equal(embeds[k], v) for k, v in before[1].items()):
        fail(f"{who}: forward modified its input latents or embeddings in place")
    tolerance = _relative_atol(atol, together)
    for k in range(2):
        with torch.no_grad():
            alone = model.forward(
                latents[k : k + 1], timestep, embeds.select([k]),
                guidance_scale=scale[k : k + 1] if scale is not None else None,
            )
        _check_tensor(alone, (1, *latents.shape[1:]), f"{who}: forward of one window")
        _close(together[k : k + 1], alone, tolerance,
               f"{who}: forward is not batch-invariant: row {k} of a batch of 2 vs. that window alone")
    if not model.supports_offsets:
        return
    # Window offsets on the canvas (positions = "canvas"): zero offsets are the ordinary
    # image's ids; each row takes its own offset.
    zero = torch.zeros(2, 2, dtype=torch.long)
    with torch.no_grad():
        unshifted = model.forward(latents, timestep, embeds, guidance_scale=scale, offsets=zero)
    _close(unshifted, together, tolerance, f"{who}: forward with zero offsets vs. without offsets")
    offsets = torch.tensor([[0, 0], [2 * model.latent_format.patch, 4 * model.latent_format.patch]])
    with torch.no_grad():
        shifted = model.forward(latents, timestep, embeds, guidance_scale=scale, offsets=offsets)
        alone = model.forward(latents[1:], timestep, embeds.select([1]),
                              guidance_scale=scale[1:] if scale is not None else None, offsets=offsets[1:])
    _check_tensor(shifted, tuple(latents.shape), f"{who}: forward with offsets")
    _close(shifted[:1], together[:1], tolerance, f"{who}: forward with offsets: row 0 (offset (0, 0)) vs. without offsets")
    _close(shifted[1:], alone, tolerance, f"{who}: forward with offsets is not batch-invariant: row 1 vs. that window alone")


# ----------------------------------------------------------------------------- schedule math


def check_family_schedule(model: ModelFamily, atol: float = 1e-4) -> None:
    """On the model's scheduler after ``set_timesteps`` (a copy, two steps): at every
    timestep ``output_from_x0`` inverts ``predicted_x0`` (both ways); ``add_noise`` is the
    documented blend ``a·x0 + b·ε`` with scalars ``a``, ``b`` and, at the first timestep,
    mostly noise (``0 <= a < b``, ``b`` within a factor 2 of ``initial_noise_sigma``, the
    noise level the engine starts from)."""
    who = _who(model)
    side = small_side(model)
    scheduler = _scheduler(model, side)
    shape = (2, model.latent_format.channels, side, side)
    for index, timestep in enumerate(scheduler.timesteps):
        at = f"at timestep {float(timestep):g} (step {index})"
        latents, output = _latents(model, 2, side, seed=20 + index), _latents(model, 2, side, seed=40 + index)
        x0 = _check_tensor(model.predicted_x0(latents, output, timestep, scheduler), shape, f"{who}: predicted_x0 {at}")
        back = _check_tensor(model.output_from_x0(latents, x0, timestep, scheduler), shape, f"{who}: output_from_x0 {at}")
        _close(back, output, _relative_atol(atol, output, x0),
               f"{who}: output_from_x0(predicted_x0(output)) vs. output {at}")
        target = _latents(model, 2, side, seed=60 + index)
        out = model.output_from_x0(latents, target, timestep, scheduler)
        again = model.predicted_x0(latents, out, timestep, scheduler)
        _close(again, target, _relative_atol(atol, target, out),
               f"{who}: predicted_x0(output_from_x0(x0)) vs. x0 {at}")
    timestep = scheduler.timesteps[0]
    at = f"at the first timestep {float(timestep):g}"
    x0, noise = _latents(model, 2, side, seed=80), _latents(model, 2, side, seed=81)
    noisy = _check_tensor(model.add_noise(x0, noise, timestep, scheduler), shape, f"{who}: add_noise {at}")
    a = model.add_noise(torch.ones_like(x0), torch.zeros_like(x0), timestep, scheduler).float()
    b = model.add_noise(torch.zeros_like(x0), torch.ones_like(x0), timestep, scheduler).float()
    a_value, b_value = float(a.flatten()[0]), float(b.flatten()[0])
    for value, weights, what in ((a_value, a, "add_noise(1, 0)"), (b_value, b, "add_noise(0, 1)")):
        _close(weights, torch.full_like(weights, value), 1e-5 * max(1.0, abs(value)),
               f"{who}: {what} {at} (one weight for every cell)")
    _close(noisy, a_value * x0 + b_value * noise, _relative_atol(1e-4, noisy),
           f"{who}: add_noise(x0, noise) vs. the blend {a_value:.4g}·x0 + {b_value:.4g}·noise {at}")
    sigma = model.initial_noise_sigma(scheduler)
    if not (0 <= a_value < b_value and 0.5 * sigma <= b_value <= 2 * sigma):
        fail(f"{who}: add_noise {at} must be mostly noise at the initial noise level {sigma:.4g}: "
             f"got {a_value:.4g}·x0 + {b_value:.4g}·noise")


# ----------------------------------------------------------------------------- VAE


def check_family_vae(model: ModelFamily, atol: float = 1e-4) -> None:
    """``from_vae_latents`` inverts ``to_vae_latents`` (both ways); ``decode`` gives finite
    float32 pixels ``(N, 3, f·h, f·w)``; ``encode(decode(x))`` has the canvas latent shape."""
    who = _who(model)
    latent = model.latent_format
    side = small_side(model)
    latents = _latents(model, 2, side, seed=90)
    with torch.no_grad():
        vae = model.to_vae_latents(latents)
        if not isinstance(vae, torch.Tensor):
            fail(f"{who}: to_vae_latents must return a tensor, got {type(vae).__name__}")
        back = model.from_vae_latents(vae)
        _close(back.float(), latents, _relative_atol(atol, latents, vae), f"{who}: from_vae_latents(to_vae_latents(x)) vs. x")
        other = torch.randn(vae.shape, generator=torch.Generator().manual_seed(91)).to(vae)
        _close(model.to_vae_latents(model.from_vae_latents(other)).float(), other.float(),
               _relative_atol(atol, other), f"{who}: to_vae_latents(from_vae_latents(z)) vs. z")
        f = latent.scale_factor
        pixels = _check_tensor(model.decode(latents), (2, 3, f * side, f * side), f"{who}: decode of {tuple(latents.shape)}")
        generator = torch.Generator(pixels.device).manual_seed(92)
        encoded = model.encode(pixels.clamp(-1, 1), generator=generator)
        _check_tensor(encoded, tuple(latents.shape), f"{who}: encode(decode(x))")


# ----------------------------------------------------------------------------- all


FAMILY_CHECKS = (check_family_facts, check_family_prompts, check_family_forward, check_family_schedule, check_family_vae)


def check_family(model: ModelFamily, checks: Sequence[Any] = FAMILY_CHECKS) -> None:
    """Every model-family check on ``model`` (a family bound to a small pipeline; use
    random tiny weights: the checks test the contract, not image quality)."""
    for check in checks:
        check(model)

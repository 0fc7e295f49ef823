"""Geometry conformance checks: coverage, round trips, linearity, shapes, decode.

They need no model. Canvases are ``(S, C, H, W)`` latents, windows ``(B, C, h, w)``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image

from jointdiff.core.family import LatentFormat
from jointdiff.core.geometry import Geometry
from jointdiff.core.tiling import TiledGeometry

LATENT_CHANNELS = 4


def fail(message: str) -> None:
    """Raise AssertionError (the checks do not use ``assert``: they must work under ``-O``)."""
    raise AssertionError(message)


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    if actual.shape != expected.shape:
        fail(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    if not error <= atol:
        fail(f"{what}: differs by up to {error:.3g} (tolerance {atol:.3g})")


def _canvas(geometry: Geometry, channels: int = LATENT_CHANNELS, seed: int = 0) -> torch.Tensor:
    sheets, height, width = geometry.canvas_shape_latent
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(sheets, channels, height, width, generator=generator)


def _fuse(geometry: Geometry, canvas: torch.Tensor, weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MultiDiffusion's fusion (Bar-Tal et al. 2023, Eq. 5) of the canvas's own windows:
    ``(sum_i insert_i(w_i * extract_i(x)), sum_i insert_i(w_i))``."""
    numerator = torch.zeros_like(canvas)
    denominator = torch.zeros(canvas.shape[0], 1, *canvas.shape[2:])
    for window_id in range(geometry.num_windows):
        ids = [window_id]
        weights = geometry.window_weights(ids, canvas.device).float()
        if not weighted:
            weights = torch.ones_like(weights)
        geometry.insert(numerator, geometry.extract(canvas, ids) * weights, ids)
        geometry.insert(denominator, weights, ids)
    return numerator, denominator


def check_geometry_shapes(geometry: Geometry) -> None:
    """Sizes are positive integers; ``extract`` gives ``(B, C, h, w)`` in the canvas's dtype
    and leaves the canvas alone; ``window_weights`` gives finite, non-negative ``(B, 1, h, w)``."""
    shape, window = geometry.canvas_shape_latent, geometry.window_size_latent
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        fail(f"canvas_shape_latent must be three positive ints (S, H, W), got {shape!r}")
    if len(window) != 2 or not all(isinstance(v, int) and v > 0 for v in window):
        fail(f"window_size_latent must be two positive ints (h, w), got {window!r}")
    count = geometry.num_windows
    if not isinstance(count, int) or count < 1:
        fail(f"num_windows must be a positive int, got {count!r}")
    canvas = _canvas(geometry).double()
    before = canvas.clone()
    for ids in ([0], list(range(count)), list(range(count))[::-1][:3]):
        windows = geometry.extract(canvas, ids)
        if tuple(windows.shape) != (len(ids), canvas.shape[1], *window) or windows.dtype != canvas.dtype:
            fail(f"extract(canvas, {ids}) gave {tuple(windows.shape)} {windows.dtype}, expected "
                 f"{(len(ids), canvas.shape[1], *window)} {canvas.dtype}")
        weights = geometry.window_weights(ids, "cpu")
        if tuple(weights.shape) != (len(ids), 1, *window):
            fail(f"window_weights({ids}) has shape {tuple(weights.shape)}, expected {(len(ids), 1, *window)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            fail(f"window_weights({ids}) must be finite and non-negative")
    if not torch.equal(canvas, before):
        fail("extract modified the canvas")


def _smooth_canvas(geometry: Geometry, scale: int) -> torch.Tensor:
    """A low-frequency canvas ``(S, 2, k·H, k·W)`` (float64): one slow wave per axis, periodic
    over the canvas so that wrapped and resampled views see a continuous function."""
    sheets, height, width = geometry.canvas_shape_latent
    y = (torch.arange(scale * height, dtype=torch.float64) + 0.5) / (scale * height)
    x = (torch.arange(scale * width, dtype=torch.float64) + 0.5) / (scale * width)
    wave = torch.cos(2 * torch.pi * y)[:, None] + torch.sin(2 * torch.pi * x)[None, :]
    ramp = torch.arange(sheets, dtype=torch.float64).view(sheets, 1, 1, 1)
    return torch.stack([wave, 0.5 * wave.flip(0)])[None] + ramp


def check_geometry_pixel_scale(geometry: Geometry, scale: int | None = None, rtol: float = 0.05) -> None:
    """The contract ControlNet conditions and region masks rely on: ``extract`` and ``insert``
    take canvases at ``k``× the latent resolution (``k`` = the VAE factor by default) and give
    ``(B, C, k·h, k·w)`` windows taken as the latents are: a constant canvas gives constant
    windows, and average-pooling the ``k``× windows of a smooth canvas gives the windows of the
    pooled canvas (exactly for crops; within ``rtol`` of the value range for geometries that
    resample, on average, whose interpolation differs between resolutions). ``insert`` at ``k``× covers
    exactly what it covers at 1×, up-sampled."""
    k = int(scale if scale is not None else geometry.latent_scale)
    (h, w), count = geometry.window_size_latent, geometry.num_windows
    ids = sorted({0, count // 2, count - 1})
    fine = _smooth_canvas(geometry, k)
    windows = geometry.extract(fine, ids)
    if tuple(windows.shape) != (len(ids), 2, k * h, k * w):
        fail(f"extract at {k}x the latent resolution gave {tuple(windows.shape)}, expected {(len(ids), 2, k * h, k * w)}")
    constant = geometry.extract(torch.full_like(fine, 0.75), ids)
    _close(constant, torch.full_like(constant, 0.75), 1e-6, f"extract of a constant canvas at {k}x")
    coarse = torch.nn.functional.avg_pool2d(fine.flatten(0, 0), k)
    expected = geometry.extract(coarse, ids)
    pooled = torch.nn.functional.avg_pool2d(windows, k)
    spread = float(fine.max() - fine.min())
    what = f"windows extracted at {k}x, average-pooled, vs windows of the pooled canvas"
    if not geometry.resamples:
        _close(pooled, expected, 1e-6 * spread, what)
    elif float((pooled - expected).abs().mean()) > rtol * spread:  # the mean: sheet edges of the test canvas are steps
        fail(f"{what}: differ by {float((pooled - expected).abs().mean()):.3g} on average (tolerance {rtol * spread:.3g})")
    covered_fine = torch.zeros(fine.shape[0], 1, *fine.shape[2:], dtype=torch.float64)
    geometry.insert(covered_fine, torch.ones(len(ids), 1, k * h, k * w, dtype=torch.float64), ids)
    covered = torch.zeros(fine.shape[0], 1, *coarse.shape[2:], dtype=torch.float64)
    geometry.insert(covered, torch.ones(len(ids), 1, h, w, dtype=torch.float64), ids)
    if not geometry.resamples:
        up = covered.repeat_interleave(k, -2).repeat_interleave(k, -1)
        _close(covered_fine, up, 1e-9, f"insert of ones at {k}x vs the 1x insert up-sampled")


def check_geometry_batching(geometry: Geometry, atol: float = 1e-6) -> None:
    """Results do not depend on how the engine groups windows into batches: a batch's
    extract, weights and insert equal those of its windows one at a time."""
    canvas = _canvas(geometry)
    ids = list(range(geometry.num_windows))[::-1]  # any order, not only ascending
    together = geometry.extract(canvas, ids)
    alone = torch.cat([geometry.extract(canvas, [i]) for i in ids])
    _close(together, alone, atol, "extract of a batch vs. one window at a time")
    weights = geometry.window_weights(ids, "cpu")
    _close(weights, torch.cat([geometry.window_weights([i], "cpu") for i in ids]), atol, "window_weights of a batch")
    values = torch.randint(-8, 9, together.shape, generator=torch.Generator().manual_seed(1)).float()
    batched, single = torch.zeros_like(canvas), torch.zeros_like(canvas)
    geometry.insert(batched, values, ids)
    for b, i in enumerate(ids):
        geometry.insert(single, values[b : b + 1], [i])
    _close(batched, single, atol, "insert of a batch vs. one window at a time")


def check_geometry_insert_is_linear(geometry: Geometry, atol: float = 1e-5) -> None:
    """``insert`` adds into its target (it must not overwrite) and is linear in the values,
    since the engine uses it for both weighted latents and weights."""
    ids = list(range(geometry.num_windows))
    h, w = geometry.window_size_latent
    generator = torch.Generator().manual_seed(2)
    # Small integers: sums of them are exact in float32, so crop geometries match exactly.
    a, b = (torch.randint(-8, 9, (len(ids), 2, h, w), generator=generator).float() for _ in range(2))
    target = _canvas(geometry, channels=2, seed=3).round()
    start = target.clone()
    geometry.insert(target, a, ids)
    from_zero = torch.zeros_like(target)
    geometry.insert(from_zero, a, ids)
    _close(target - start, from_zero, atol, "insert into a non-zero target (it must add, not overwrite)")
    combined, parts = torch.zeros_like(target), torch.zeros_like(target)
    geometry.insert(combined, 2 * a + b, ids)
    geometry.insert(parts, a, ids)
    geometry.insert(parts, a, ids)
    geometry.insert(parts, b, ids)
    _close(combined, parts, atol, "insert(2a + b) vs. insert(a) + insert(a) + insert(b)")


def check_geometry_coverage(geometry: Geometry) -> None:
    """Every canvas cell gets a positive total weight from the windows (else it is never
    denoised and the engine would divide by zero)."""
    canvas = torch.zeros(geometry.canvas_shape_latent[0], 1, *geometry.canvas_shape_latent[1:])
    _, weight_sum = _fuse(geometry, canvas, weighted=True)
    uncovered = (weight_sum <= 0).nonzero()
    if len(uncovered):
        s, _, y, x = uncovered[0].tolist()
        fail(f"{len(uncovered)} canvas cells get no window weight, e.g. sheet {s}, row {y}, column {x}")


def check_geometry_round_trip(geometry: Geometry, atol: float = 1e-5) -> None:
    """Fusing the canvas's own windows gives the canvas back: with unit weights and with the
    geometry's weights, ``sum insert(w * extract(x)) / sum insert(w) == x``. Resampling
    geometries pass a looser ``atol`` (interpolation is not exactly invertible) and may give a
    ``smooth_test_canvas(channels)`` to check on instead of noise, which no interpolation keeps."""
    smooth = getattr(geometry, "smooth_test_canvas", None)
    canvas = smooth(LATENT_CHANNELS) if smooth is not None else _canvas(geometry)
    for weighted in (False, True):
        numerator, denominator = _fuse(geometry, canvas, weighted)
        if bool((denominator <= 0).any()):
            fail("some canvas cells are not covered by any window (see check_geometry_coverage)")
        label = "geometry weights" if weighted else "unit weights"
        _close(numerator / denominator, canvas, atol, f"insert(extract(canvas)) round trip with {label}")


def check_geometry_origins(geometry: Geometry) -> None:
    """``window_origins_latent()`` is None (windows are not crops of one plane) or an
    ``(N, 2)`` long tensor of ``(top, left)`` in latent cells such that every window is the
    canvas crop at its origin, on one of the canvas's sheets, continuing across the edges
    where an axis wraps."""
    origins = geometry.window_origins_latent()
    if origins is None:
        return
    count = geometry.num_windows
    if not isinstance(origins, torch.Tensor) or origins.dtype != torch.long or tuple(origins.shape) != (count, 2):
        what = f"{tuple(origins.shape)} {origins.dtype}" if isinstance(origins, torch.Tensor) else repr(origins)
        fail(f"window_origins_latent() must be None or a ({count}, 2) torch.long tensor, got {what}")
    canvas = _canvas(geometry)
    h, w = geometry.window_size_latent
    windows = geometry.extract(canvas, list(range(count)))
    for window_id, (top, left) in enumerate(origins.tolist()):
        crops = canvas.roll((-top, -left), dims=(-2, -1))[:, :, :h, :w]  # every sheet's crop
        if not any(torch.equal(windows[window_id], crop) for crop in crops):
            fail(f"window {window_id} is not the canvas crop at its origin {(top, left)} from window_origins_latent()")


def local_decoder(latent_scale: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A stand-in VAE decoder acting on each latent cell alone: ``(B, C, h, w)`` →
    ``(B, 3, f*h, f*w)`` in [-1, 1]. Padding or cropping errors in ``decode`` show up as
    shifted pixels, which a real (mixing) decoder would hide."""

    def decode(latents: torch.Tensor) -> torch.Tensor:
        pixels = torch.tanh(latents[:, :3].float())
        return pixels.repeat_interleave(latent_scale, -2).repeat_interleave(latent_scale, -1)

    return decode


def check_geometry_decode(geometry: Geometry, latent_scale: int = 8, atol: float = 1e-6) -> None:
    """``decode`` returns ``(S, 3, f*H, f*W)`` aligned with the canvas (checked with
    :func:`local_decoder`), and ``to_images`` turns that into at least one PIL image."""
    canvas = _canvas(geometry)
    decoder = local_decoder(latent_scale)
    pixels = geometry.decode(canvas, decoder)
    _close(pixels, decoder(canvas), atol, "decode(canvas) vs. decoding each sheet cell by cell")
    images = geometry.to_images(pixels)
    if not images or not all(isinstance(image, Image.Image) for image in images):
        fail(f"to_images must return a non-empty list of PIL images, got {images!r}")


def check_options_round_trip(plugin: Any) -> None:
    """The plugin's options survive a JSON round trip (jobs are saved as TOML/JSON)."""
    dumped = plugin.options.model_dump(mode="json")
    rebuilt = type(plugin)(dumped)
    if rebuilt.options != plugin.options:
        fail(f"{type(plugin).__name__}: options {dumped!r} do not rebuild the same options")


def check_geometry(geometry: Geometry, latent: LatentFormat | int = 8, atol: float = 1e-5) -> None:
    """Every geometry check, after ``geometry.setup(latent)`` (a model's latent format, or the
    VAE factor of an SD-like model), except those the geometry's ``conformance_exempt``
    (``{check name: why}``, e.g. ``{"decode": "..."}``) says do not apply to it; the reasons
    are part of its documentation, and its own tests check what replaces them."""
    geometry.setup(latent)
    latent_scale = geometry.latent_scale
    exempt = dict(getattr(geometry, "conformance_exempt", {}))
    checks = {
        "shapes": lambda: check_geometry_shapes(geometry),
        "batching": lambda: check_geometry_batching(geometry),
        "insert_is_linear": lambda: check_geometry_insert_is_linear(geometry, atol),
        "coverage": lambda: check_geometry_coverage(geometry),
        "round_trip": lambda: check_geometry_round_trip(geometry, atol),
        "origins": lambda: check_geometry_origins(geometry),
        "pixel_scale": lambda: check_geometry_pixel_scale(geometry),
        "decode": lambda: check_geometry_decode(geometry, latent_scale),
        "options_round_trip": lambda: check_options_round_trip(geometry),
    }
    unknown = set(exempt) - set(checks)
    if unknown:
        fail(f"conformance_exempt names unknown checks {sorted(unknown)}; the checks are {sorted(checks)}")
    for name, check in checks.items():
        if name not in exempt:
            check()


class OneWindowGeometry(TiledGeometry):
    """A canvas that is exactly one window of ``size_latent`` ``(h, w)`` latent cells (square
    or not): for checking that one window denoised by the engine equals a stock pipeline
    generating an image of that size."""

    name = "one-window"

    def __init__(self, size_latent: tuple[int, int]) -> None:
        super().__init__()
        self.size = tuple(int(v) for v in size_latent)

    def canvas_size_px(self) -> tuple[int, int]:
        return (self.size[0] * self.latent_scale, self.size[1] * self.latent_scale)

    def window_stride_latent(self):
        return self.size, self.size

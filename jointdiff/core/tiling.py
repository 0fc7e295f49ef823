"""A reusable base for geometries whose windows are axis-aligned crops of canvas sheets.

Windows are ``(top, left)`` origins in latent cells on a canvas of shape ``(S, C, H, W)``
(one sheet, unless a subclass puts windows on several: :meth:`TiledGeometry.sheet_of`); an
axis may *wrap* (the canvas closes into a loop along it), in which case a window may run
past the edge and continue from the other side. Extraction and insertion use plain slices
(at most two pieces per wrapped axis), which keeps fusion deterministic on every device.

Window sides and strides are whole multiples of the model's patch
(:class:`~jointdiff.core.family.LatentFormat`), canvas sides whole multiples of its VAE
factor times the patch; a window left unset is the model's native window.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import pydantic

from jointdiff.core.family import LatentFormat
from jointdiff.core.geometry import DecodeFn, EncodeFn, Geometry, decode_wrapped, encode_wrapped
from jointdiff.core.options import PluginOptions
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEFAULT_STRIDE_FRACTION = 8
"""A stride left unset is ``window // 8`` latent cells: 8 for SD's native 64-cell window
(MultiDiffusion's and SyncDiffusion's stride), 16 for the 128-cell window of SDXL or FLUX."""


class WindowOptions(PluginOptions):
    """Square windows (latent cells): the options :meth:`TiledGeometry.window_stride_latent`
    reads. Both are checked against the model when the geometry is set up (whole patches,
    within the model's window sizes, stride at most the window): the model's native window
    is only known then."""

    window_latent: int | None = pydantic.Field(
        None,
        gt=0,
        description="window side in latent cells; None: the model's native window "
        "(64 for SD 1.x/2.x, 128 for SDXL and FLUX)",
    )
    stride_latent: int | None = pydantic.Field(
        None,
        gt=0,
        description="distance between windows in latent cells, at most the window; "
        "None: window // 8 (8 for SD's 64)",
    )


def default_stride_latent(window: int, patch: int = 1, fraction: int = DEFAULT_STRIDE_FRACTION) -> int:
    """The stride (latent cells) used when none is given: ``window // fraction``, rounded
    down to whole ``patch`` cells and at least one patch."""
    return max(patch, window // fraction // patch * patch)


def resolve_window_stride(
    geometry: Geometry,
    window_latent: int | None,
    stride_latent: int | None,
    fraction: int = DEFAULT_STRIDE_FRACTION,
) -> tuple[int, int]:
    """``(window, stride)`` in latent cells from the options ``window_latent`` and
    ``stride_latent`` of a set-up ``geometry`` (None: the model's native window, and
    :func:`default_stride_latent` of the window), checked against the model's latent format
    (:meth:`~jointdiff.core.geometry.Geometry.window_side`,
    :meth:`~jointdiff.core.geometry.Geometry.check_stride`: ConfigError naming the option)."""
    window = geometry.window_side(window_latent, "window_latent")
    patch = geometry.latent_format.patch
    stride = default_stride_latent(window, patch, fraction) if stride_latent is None else int(stride_latent)
    geometry.check_stride(stride, window, "stride_latent")
    return window, stride


def axis_starts(
    extent: int, window: int, stride: int, wrap: bool, axis: str, step: int = 1
) -> tuple[list[int], int]:
    """Window origins along one axis, and the stride actually used (all in latent cells).

    Without wrap, windows step by ``stride`` and a last window is added flush with the far
    edge when ``stride`` does not divide ``extent - window`` (every cell covered). With wrap,
    the stride used is the largest common divisor of ``extent`` and ``window`` not above
    ``stride`` (and a multiple of ``step``, the model's patch, which must divide ``extent``,
    ``window`` and ``stride``): then the layout is invariant under a shift by the stride and
    every cell is covered by exactly ``window / stride`` windows, so the seam is like any
    other column. A smaller stride than asked is announced with one warning per process and
    layout that states the extra windows (:func:`_announce_wrap_stride`).
    """
    if extent < window:
        raise ConfigError(f"canvas {axis} is {extent} latent cells, smaller than one window ({window})")
    if wrap:  # also when extent == window: windows straddling the edge join its two sides
        used = max(d for d in range(step, stride + 1, step) if extent % d == 0 and window % d == 0)
        if used != stride:
            _announce_wrap_stride(extent, window, stride, used, axis)
        return list(range(0, extent, used)), used
    if extent == window:
        return [0], stride
    starts = list(range(0, extent - window + 1, stride))
    if starts[-1] + window < extent:
        starts.append(extent - window)
    return starts, stride


_ANNOUNCED_STRIDES: set[str] = set()
"""Wrap stride warnings already given in this process (a geometry is set up several times
per job: when the job is read, when it runs, by the engine)."""


def _announce_wrap_stride(extent: int, window: int, stride: int, used: int, axis: str) -> None:
    """Warn, once per process and layout, that a wrapped axis uses a smaller stride than
    asked, and what it costs: windows along the axis (the whole job's windows and model
    calls grow by the same factor)."""
    runs, asked = extent // used, math.ceil(extent / stride)
    message = (
        f"wrapped {axis} of {extent} latent cells with window {window}: using stride {used} instead of "
        f"{stride} so that every cell is covered equally; this runs {runs} windows along the {axis} "
        f"instead of {asked} (+{100 * (runs - asked) / asked:.0f}% windows and time)"
    )
    if window % stride == 0:
        lower, upper = extent // stride * stride, -(-extent // stride) * stride
        sizes = " or ".join(str(v) for v in dict.fromkeys(v for v in (lower, upper) if v >= window))
        message += f"; a {axis} of {sizes} latent cells keeps stride {stride}"
    if message in _ANNOUNCED_STRIDES:
        return
    _ANNOUNCED_STRIDES.add(message)
    warnings.warn(message, stacklevel=4)


def wrapped_segments(start: int, size: int, extent: int) -> list[tuple[int, int, int]]:
    """Split a window ``[start, start+size)`` on a looping axis of length ``extent`` into
    ``(canvas_start, window_start, length)`` pieces that do not cross the edge."""
    pieces, offset = [], 0
    while offset < size:
        canvas_start = (start + offset) % extent
        length = min(size - offset, extent - canvas_start)
        pieces.append((canvas_start, offset, length))
        offset += length
    return pieces


def shifted_segments(extent: int, window: int, shift: int, wrap: bool) -> list[tuple[int, int, int]]:
    """Non-overlapping windows along one axis, offset by ``shift`` (latent cells, ``0 <= shift
    < window``), as ``(origin, owned_start, owned_length)``: the window at ``origin`` owns
    window cells ``[owned_start, owned_start + owned_length)``, and the owned parts cover
    ``[0, extent)`` exactly once (SpotDiffusion's shifted tiling, Frolov et al. 2025).

    The cuts lie at ``shift + k·window``. On a wrapped axis every window starts at its cut
    (modulo ``extent``) and runs across the edge where it must; with ``extent`` not a
    multiple of ``window`` one window owns only the short rest. On an axis that does not
    wrap the part before the first cut and after the last one are shorter than a window:
    their windows are *clamped* into the canvas (flush with its edge) and own only that
    part, so every window stays whole and sees real canvas context (no padding), at the
    cost of one partly used window per edge. An axis one window long never shifts."""
    if wrap:
        count = -(-extent // window)
        return [((shift + k * window) % extent, 0, min(window, extent - k * window)) for k in range(count)]
    if extent == window:
        return [(0, 0, window)]
    cuts = [0, *range(shift if shift > 0 else window, extent, window), extent]
    segments = []
    for start, end in zip(cuts, cuts[1:]):
        origin = min(start, extent - window)
        segments.append((origin, start - origin, end - start))
    return segments


@dataclass(frozen=True)
class ShiftedTiling:
    """One sheet's non-overlapping windows for one step (:meth:`TiledGeometry.shifted_tiling`):
    ``origins`` ``(top, left)`` in latent cells and, per window, the box it owns
    ``(y0, y1, x0, x1)`` in window cells; the owned boxes cover the sheet exactly once."""

    shift: tuple[int, int]
    origins: list[tuple[int, int]]
    owned: list[tuple[int, int, int, int]]


class TiledGeometry(Geometry):
    """Base of crop geometries (strip, grid, torus, atlas tiles, the ``ring`` template).

    Subclasses give the canvas size in pixels (:meth:`canvas_size_px`, abstract), the window
    and stride in latent cells and which axes wrap; this class computes the windows
    (:func:`axis_starts`), extracts, inserts and decodes (with circular context along
    wrapped axes: :func:`jointdiff.core.geometry.decode_wrapped`). By default windows are square,
    from the options ``window_latent`` (None: the model's native window) and
    ``stride_latent`` (None: ``window // 8``) of :class:`WindowOptions`, see
    :func:`resolve_window_stride`.
    """

    decode_padding_latent: int = 8

    @abstractmethod
    def canvas_size_px(self) -> tuple[int, int]:
        """``(H_px, W_px)`` of the canvas; called by :meth:`setup` after
        :meth:`window_stride_latent` (``self._window`` holds the window's ``(h, w)``)."""

    def window_stride_latent(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((h, w), (stride_y, stride_x))`` in latent cells, called by :meth:`setup` once
        the latent format is known. Default: square windows from the options
        ``window_latent`` and ``stride_latent`` (:func:`resolve_window_stride`; unset or
        absent options take the model's native window and ``window // 8``)."""
        window, stride = resolve_window_stride(
            self, getattr(self.options, "window_latent", None), getattr(self.options, "stride_latent", None)
        )
        return (window, window), (stride, stride)

    def wraps(self) -> tuple[bool, bool]:
        """Whether the canvas loops along ``(y, x)``."""
        return (False, False)

    def size_option_names(self) -> tuple[str, str]:
        """The options that set ``(height, width)``, named in errors."""
        return ("height_px", "width_px")

    def setup(self, latent: LatentFormat | int) -> None:
        """Windows for the model's latent format: window sides and strides whole patches
        within the model's window limits, canvas sides (pixels) whole multiples of the VAE
        factor times the patch (ConfigError naming the option and value)."""
        super().setup(latent)
        scale, patch = self.latent_scale, self.latent_format.patch
        (win_h, win_w), (stride_y, stride_x) = self.window_stride_latent()
        for side in (win_h, win_w):  # also windows of subclasses that set their own
            self.window_side(side, "window_latent")
        self.check_stride(stride_y, win_h, "stride_latent")
        self.check_stride(stride_x, win_w, "stride_latent")
        self._window = (win_h, win_w)  # the resolved window (window_latent None: the native one)
        self._stride = (stride_y, stride_x)  # as asked; stride_used_latent: as used
        height_px, width_px = self.canvas_size_px()
        unit = scale * patch
        for label, value in zip(self.size_option_names(), (height_px, width_px)):
            if value % unit:
                factor = f"the VAE factor {scale}" if patch == 1 else f"{unit} (the VAE factor {scale} times the patch {patch})"
                raise ConfigError(f"{self.name}: {label} = {value} is not a multiple of {factor}")
        self._size = (height_px // scale, width_px // scale)
        wrap_y, wrap_x = self.wraps()
        tops, used_y = axis_starts(self._size[0], win_h, stride_y, wrap_y, "height", patch)
        lefts, used_x = axis_starts(self._size[1], win_w, stride_x, wrap_x, "width", patch)
        self.stride_used_latent = (used_y, used_x)
        self.origins = [(top, left) for top in tops for left in lefts]

    def window_origins_latent(self) -> torch.Tensor:
        """``(N, 2)`` long tensor of every window's ``(top, left)`` in latent cells, on its own
        canvas sheet. On a wrapped axis a window past the edge keeps counting beyond the
        canvas side (positions are not taken modulo the side)."""
        import torch

        return torch.tensor(self.origins, dtype=torch.long).reshape(len(self.origins), 2)

    @property
    def canvas_shape_latent(self) -> tuple[int, int, int]:
        return (1, *self._size)

    def sheet_of(self, window_id: int) -> int:
        """The canvas sheet window ``window_id`` lies on (0: one sheet)."""
        return 0

    @property
    def window_size_latent(self) -> tuple[int, int]:
        return self._window

    @property
    def num_windows(self) -> int:
        return len(self.origins)

    def _pieces(self, window_id: int, scale: int = 1) -> list[tuple[slice, slice, slice, slice]]:
        """Canvas and window slices ``(cy, cx, wy, wx)`` that make up one window, on a canvas
        ``scale`` times the latent resolution (``scale`` = VAE factor for pixel inputs)."""
        top, left = self.origins[window_id]
        (h, w), (H, W) = self._window, self._size
        wrap_y, wrap_x = self.wraps()
        rows = wrapped_segments(top, h, H) if wrap_y else [(top, 0, h)]
        cols = wrapped_segments(left, w, W) if wrap_x else [(left, 0, w)]
        k = scale
        return [
            (slice(k * cy, k * (cy + ny)), slice(k * cx, k * (cx + nx)), slice(k * wy, k * (wy + ny)), slice(k * wx, k * (wx + nx)))
            for cy, wy, ny in rows
            for cx, wx, nx in cols
        ]

    def _scale_of(self, canvas: torch.Tensor) -> int:
        """Integer factor between ``canvas`` and the latent canvas (1 for latents)."""
        (H, W), (height, width) = self._size, canvas.shape[-2:]
        scale = height // H
        if scale < 1 or (height, width) != (scale * H, scale * W):
            raise ValueError(
                f"canvas of spatial size {(height, width)} is not an integer multiple of the "
                f"latent canvas {(H, W)} of geometry {self.name!r}"
            )
        return scale

    def extract(self, canvas: torch.Tensor, window_ids: Sequence[int]) -> torch.Tensor:
        """Windows ``(B, C, k*h, k*w)`` of ``canvas`` ``(S, C, k*H, k*W)``: latents (k = 1) or a
        pixel-space input such as a condition image or a mask (k = VAE factor)."""
        scale = self._scale_of(canvas)
        h, w = self._window
        out = canvas.new_empty(len(window_ids), canvas.shape[1], scale * h, scale * w)
        for b, window_id in enumerate(window_ids):
            sheet = self.sheet_of(window_id)
            for cy, cx, wy, wx in self._pieces(window_id, scale):
                out[b, :, wy, wx] = canvas[sheet, :, cy, cx]
        return out

    def insert(self, target: torch.Tensor, values: torch.Tensor, window_ids: Sequence[int]) -> None:
        scale = self._scale_of(target)
        for b, window_id in enumerate(window_ids):
            sheet = self.sheet_of(window_id)
            for cy, cx, wy, wx in self._pieces(window_id, scale):
                target[sheet, :, cy, cx] += values[b, :, wy, wx]

    def decode(self, canvas: torch.Tensor, decode: DecodeFn) -> torch.Tensor:
        """Decode with circular context along wrapped axes, so the VAE's zero padding leaves
        no seam where the canvas closes (:func:`jointdiff.core.geometry.decode_wrapped`)."""
        return decode_wrapped(canvas, decode, self.wraps(), self.decode_padding_latent, self.latent_scale)

    def encode(self, pixels: torch.Tensor, encode: EncodeFn) -> torch.Tensor:
        """Encode with circular context along wrapped axes, cropped off the latents, so the
        encoder sees across the seam (:func:`jointdiff.core.geometry.encode_wrapped`)."""
        return encode_wrapped(pixels, encode, self.wraps(), self.decode_padding_latent, self.latent_scale)

    # -- shifted non-overlapping windows (windows = "shifted", :mod:`jointdiff.engine.shifted`) ------

    def shifted_tiling(self, shift: tuple[int, int]) -> ShiftedTiling:
        """One sheet's non-overlapping windows offset by ``shift`` ``(dy, dx)`` latent cells
        (each in ``[0, window)``), laid out by :func:`shifted_segments` along each axis with
        this geometry's window and wraps: every cell of the sheet is owned by exactly one
        window. Pure (the geometry's own windows are not changed); call after :meth:`setup`."""
        (win_h, win_w), (height, width) = self._window, self._size
        wrap_y, wrap_x = self.wraps()
        rows = shifted_segments(height, win_h, int(shift[0]), wrap_y)
        cols = shifted_segments(width, win_w, int(shift[1]), wrap_x)
        origins = [(top, left) for top, _, _ in rows for left, _, _ in cols]
        owned = [(y0, y0 + ny, x0, x0 + nx) for _, y0, ny in rows for _, x0, nx in cols]
        return ShiftedTiling((int(shift[0]), int(shift[1])), origins, owned)

    def use_sheet_origins(self, origins: Sequence[tuple[int, int]]) -> None:
        """Make ``origins`` (one sheet's windows, e.g. a :class:`ShiftedTiling`'s) the windows
        of every sheet, sheet-major (window ``k·len(origins) + j`` is window ``j`` of sheet
        ``k``; ``tile_origins`` of tiled subclasses such as ``torus`` and ``atlas`` follows).
        ConfigError when :meth:`sheet_of` does not place the windows that way."""
        sheets = self.canvas_shape_latent[0]
        self.origins = [tuple(o) for o in origins] * sheets
        if hasattr(self, "tile_origins"):
            self.tile_origins = [tuple(o) for o in origins]
        per_sheet = len(origins)
        if any(self.sheet_of(w) != w // per_sheet for w in range(len(self.origins))):
            raise ConfigError(
                f"geometry {self.name!r} cannot use shifted windows: its sheet_of() does not place windows "
                "sheet by sheet"
            )

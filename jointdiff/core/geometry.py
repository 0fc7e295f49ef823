"""The Geometry interface: how fixed-size windows map onto a canvas of any shape.

Conventions (as kornia): tensors are ``(B, C, H, W)``; sizes are ``(h, w)``; latent and pixel
units are named ``*_latent`` and ``*_px``; angles are degrees and carry ``_deg``.

A canvas is a latent tensor of shape ``(S, C, H, W)``: ``S`` *sheets* (1 for a strip or grid,
6 for a cubemap, ...). A geometry maps window ``i`` to a ``(C, h, w)`` view of the canvas.
It must not assume integer crops in the engine's place: a geometry may *resample* (a
perspective view of an equirectangular canvas), so extraction and insertion are its own.

Fusion follows MultiDiffusion (Bar-Tal et al. 2023, Eq. 5): the fused canvas is
``sum_i insert_i(w_i * x_i) / sum_i insert_i(w_i)`` where ``insert_i`` maps a window back onto
the canvas and ``w_i`` is the window's weight map.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

from jointdiff.core.family import SD_LATENT, LatentFormat
from jointdiff.core.options import Configurable
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from PIL import Image

DecodeFn = Callable[["torch.Tensor"], "torch.Tensor"]
"""Maps latents ``(B, C, h, w)`` (unscaled by the VAE factor) to pixels ``(B, 3, f*h, f*w)`` in [-1, 1]."""
EncodeFn = Callable[["torch.Tensor", int], "torch.Tensor"]
"""``encode(pixels, sheet)``: pixels ``(1, 3, f*h, f*w)`` in [-1, 1] of canvas sheet ``sheet`` to
latents ``(1, C, h, w)`` (the inverse direction of :data:`DecodeFn`; ``sheet`` keys the
posterior's noise, so the result depends on neither call order nor batching)."""


class Geometry(Configurable, ABC):
    """Base class of every geometry plugin.

    Lifecycle: construct with options (validated, no model needed) → :meth:`setup` with the
    model's :class:`~jointdiff.core.family.LatentFormat` (VAE factor, patch, native window;
    computes the windows) → the engine calls :meth:`extract`,
    :meth:`insert` and :meth:`window_weights` inside the loop → :meth:`decode` and
    :meth:`to_images` at the end.
    """

    resamples: ClassVar[bool] = False
    """True when windows are interpolated from the canvas (not exact crops): with ``x0``
    fusion each window then starts from fresh noise of its own."""

    preferred_fusion: ClassVar[str] = "latent"
    """The fusion the engine uses unless the job says otherwise: ``"latent"`` for crops,
    ``"x0"`` for geometries that resample (see :mod:`jointdiff.engine.fusion`)."""

    def setup(self, latent: LatentFormat | int) -> None:
        """Prepare windows for the model's latent format (an int is taken as the VAE factor
        of an SD-like model). Subclasses call this first, then read :attr:`latent_format`,
        :attr:`latent_scale` and :meth:`window_side`.

        Raises :class:`~jointdiff.utils.errors.ConfigError` when sizes do not fit the model.
        """
        if not isinstance(latent, LatentFormat):
            latent = LatentFormat(**{**SD_LATENT.__dict__, "scale_factor": int(latent)})
        self.latent_format = latent
        self.latent_scale = latent.scale_factor

    def window_side(self, value: int | None, option: str = "window_latent") -> int:
        """A window side in latent cells: ``value``, or the model's native window when None;
        checked against the model's patch and window limits (ConfigError naming ``option``)."""
        side = self.latent_format.native_window if value is None else int(value)
        self.latent_format.check_window(side, option, self.name)
        return side

    def check_stride(self, stride: int, window: int, option: str = "stride_latent") -> None:
        """ConfigError when ``stride`` is not whole patches or exceeds ``window`` (cells left
        without a window)."""
        patch = self.latent_format.patch
        if stride % patch:
            raise ConfigError(f"{self.name}: {option} = {stride} latent cells is not a whole number of {patch}×{patch} patches")
        if stride > window:
            raise ConfigError(
                f"{self.name}: {option} = {stride} must not exceed the window ({window} latent cells), "
                "or cells between windows are never denoised"
            )

    def window_origins_latent(self) -> torch.Tensor | None:
        """``(N, 2)`` ``(top, left)`` of every window on the canvas in latent cells, for
        positional ids offset to the canvas (``positions = "canvas"``); None when windows
        are not crops of one plane (resampled views, cube faces)."""
        return None

    window_maps: ClassVar[tuple[str, ...]] = ()
    """Names of the per-window maps :meth:`window_map` can render (e.g. ``("depth",
    "normal", "mask")`` for rendered views of a mesh): conditions that come from the geometry
    itself, such as a depth ControlNet's image (``image = "depth"``). Empty: none."""

    def window_map(self, name: str, window_ids: Sequence[int], scale: int = 1) -> torch.Tensor:
        """The map ``name`` (one of :attr:`window_maps`) of each window, ``(B, C, scale*h,
        scale*w)`` float32 in [0, 1] (``scale`` 1: the latent window, the VAE factor: its
        pixels). ``depth``: C = 1, near = 1, background = 0, far surfaces above 0 (the
        ControlNet convention, the silhouette kept); ``normal``: C = 3, ``(n + 1) / 2`` in the view's camera frame; ``mask``:
        C = 1, 1 where the window shows the surface. Raises ConfigError for other names."""
        raise ConfigError(
            f"{self.name}: no per-window map {name!r}"
            + (f"; this geometry renders {', '.join(map(repr, self.window_maps))}" if self.window_maps else "; this geometry renders none")
        )

    fuse_until: float = 1.0
    """With ``x0`` fusion, the fraction of the steps during which the windows are fused; the
    windows step alone afterwards (SyncMVD stops at 0.8). 1: every step."""

    def window_coverage(self, window_ids: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor | None:
        """``(B, 1, h, w)`` in [0, 1]: where each window shows the canvas. Elsewhere (1 − coverage)
        the ``x0`` fusion keeps the window's own x̂0 (a rendered view's background). None: the
        canvas covers every window pixel (the default)."""
        return None

    def final_windows(self, window_ids: Sequence[int], latents: torch.Tensor) -> None:
        """After the last step of a job with ``x0`` fusion, in one process: the windows' own
        final latents ``(B, C, h, w)``, before :meth:`decode`. A geometry whose output is made
        from its windows (the ``mesh`` geometry bakes its texture from the decoded views, as
        SyncMVD) keeps them; ignored by default."""

    def setup_work(self) -> dict[str, int]:
        """Work done once per job outside the model, by kind (e.g. ``{"rays": ...}``), for the
        cost estimate (:class:`jointdiff.cost.budget.Estimate`); after :meth:`setup`. None by default."""
        return {}

    def write_companions(self, images: list[Image.Image], path: Path) -> list[Path]:
        """Files written next to the saved output images (``path``: the first image's), e.g.
        a textured mesh; returns their paths. None by default."""
        return []

    @property
    @abstractmethod
    def canvas_shape_latent(self) -> tuple[int, int, int]:
        """``(S, H, W)`` of the canvas in latent cells."""

    @property
    @abstractmethod
    def window_size_latent(self) -> tuple[int, int]:
        """``(h, w)`` of every window in latent cells (the model's native latent size)."""

    @property
    @abstractmethod
    def num_windows(self) -> int:
        """Number of windows."""

    @abstractmethod
    def extract(self, canvas: torch.Tensor, window_ids: Sequence[int]) -> torch.Tensor:
        """Take windows out of ``canvas`` ``(S, C, H, W)``; returns ``(B, C, h, w)``.

        ``canvas`` may also be at an integer multiple ``k`` of the latent resolution,
        ``(S, C, k*H, k*W)`` (a pixel-space condition image or mask, ``k`` = VAE factor);
        the windows are then ``(B, C, k*h, k*w)``, taken exactly as the latents are.
        """

    @abstractmethod
    def insert(self, target: torch.Tensor, values: torch.Tensor, window_ids: Sequence[int]) -> None:
        """Add ``values`` ``(B, C', h, w)`` into ``target`` ``(S, C', H, W)`` in place.

        The adjoint of :meth:`extract` for crops; for resampling geometries, the inverse warp.
        Used for both weighted values and weights, so it must be linear in ``values``.
        """

    def window_weights(self, window_ids: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Fusion weights ``(B, 1, h, w)`` of the windows; uniform by default (MultiDiffusion)."""
        import torch

        h, w = self.window_size_latent
        return torch.ones(len(window_ids), 1, h, w, device=device)

    def decode(self, canvas: torch.Tensor, decode: DecodeFn) -> torch.Tensor:
        """Decode the final canvas ``(S, C, H, W)`` into pixels ``(S, 3, f*H, f*W)`` in [-1, 1].

        Geometries that wrap override this to decode with circular context (no seam):
        :func:`decode_wrapped`.
        """
        return decode_sheets(canvas, decode)

    def encode(self, pixels: torch.Tensor, encode: EncodeFn) -> torch.Tensor:
        """Encode canvas pixels ``(S, 3, f*H, f*W)`` in [-1, 1] into latents ``(S, C, H, W)``,
        the counterpart of :meth:`decode` (an init image, :mod:`jointdiff.image.init_image`).
        Sheet by sheet by default (:func:`encode_sheets`); geometries that wrap override it
        to encode with circular context (:func:`encode_wrapped`)."""
        return encode_sheets(pixels, encode)

    def wraps(self) -> tuple[bool, bool]:
        """Whether the canvas loops along ``(y, x)`` (a wrapped strip, a torus, the longitude
        of an equirectangular panorama); masks are filtered circularly along such axes."""
        return (False, False)

    def to_images(self, pixels: torch.Tensor) -> list[Image.Image]:
        """Turn decoded pixels ``(S, 3, H_px, W_px)`` in [-1, 1] into output images (one per sheet)."""
        return tensor_to_pil(pixels)


def decode_sheets(canvas: torch.Tensor, decode: DecodeFn) -> torch.Tensor:
    """Decode a canvas ``(S, C, H, W)`` sheet by sheet into pixels ``(S, 3, f*H, f*W)``."""
    import torch

    return torch.cat([decode(canvas[s : s + 1]) for s in range(canvas.shape[0])])


def decode_wrapped(
    canvas: torch.Tensor, decode: DecodeFn, wraps: tuple[bool, bool], padding_latent: int, scale: int
) -> torch.Tensor:
    """Decode a canvas ``(S, C, H, W)`` that loops along the axes ``wraps = (y, x)`` (a wrapped
    strip, a torus, an equirectangular panorama) sheet by sheet with ``min(padding_latent,
    side)`` cells of circular context on both sides of each wrapped axis, cropped off the
    pixels afterwards (``scale`` pixels per latent cell): the VAE sees the other side of the
    seam instead of zero padding, so nothing marks where the canvas closes. Returns
    ``(S, 3, scale*H, scale*W)``; with no wrapped axis, :func:`decode_sheets`."""
    import torch

    pads = []
    for dim, wrapped in zip((-2, -1), wraps):
        pad = min(padding_latent, canvas.shape[dim]) if wrapped else 0
        if pad:
            canvas = torch.cat([canvas.narrow(dim, canvas.shape[dim] - pad, pad), canvas, canvas.narrow(dim, 0, pad)], dim)
        pads.append(pad * scale)
    pixels = decode_sheets(canvas, decode)
    pad_y, pad_x = pads
    return pixels[..., pad_y : pixels.shape[-2] - pad_y, pad_x : pixels.shape[-1] - pad_x]


def encode_sheets(pixels: torch.Tensor, encode: EncodeFn) -> torch.Tensor:
    """Encode canvas pixels ``(S, 3, f*H, f*W)`` sheet by sheet into latents ``(S, C, H, W)``."""
    import torch

    return torch.cat([encode(pixels[s : s + 1], s) for s in range(pixels.shape[0])])


def encode_wrapped(
    pixels: torch.Tensor, encode: EncodeFn, wraps: tuple[bool, bool], padding_latent: int, scale: int
) -> torch.Tensor:
    """The mirror of :func:`decode_wrapped`: encode canvas pixels ``(S, 3, scale*H, scale*W)``
    that loop along ``wraps = (y, x)`` sheet by sheet with ``min(padding_latent, side)`` cells
    (``scale`` pixels each) of circular context on both sides of each wrapped axis, and crop
    that context off the latents: the encoder sees the other side of the seam instead of
    zero padding. Returns ``(S, C, H, W)``; with no wrapped axis, :func:`encode_sheets`."""
    import torch

    pads = []
    for dim, wrapped in zip((-2, -1), wraps):
        side = pixels.shape[dim] // scale
        pad = min(padding_latent, side) if wrapped else 0
        if pad:
            px = pad * scale
            pixels = torch.cat([pixels.narrow(dim, pixels.shape[dim] - px, px), pixels, pixels.narrow(dim, 0, px)], dim)
        pads.append(pad)
    latents = encode_sheets(pixels, encode)
    pad_y, pad_x = pads
    return latents[..., pad_y : latents.shape[-2] - pad_y, pad_x : latents.shape[-1] - pad_x]


def tensor_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in [-1, 1] → list of RGB PIL images (rounded, as diffusers does)."""
    import torch
    from PIL import Image

    array = ((pixels.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in array]


DEFAULT_MAX_MEGAPIXELS = 64.0
"""Canvases above this many megapixels (all sheets) are refused unless the limit is raised:
64 MP is e.g. a 4096×16384 px strip. A 10-megapixel panorama runs; a gigapixel one is refused
before anything is allocated."""


def check_canvas_megapixels(geometry: Geometry, max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS) -> None:
    """ConfigError when the set-up ``geometry``'s canvas (``S · H · W`` latent cells at
    ``latent_scale`` pixels each) is above ``max_megapixels`` (None: no limit). Arithmetic on
    the canvas shape and the window count only, so a gigapixel canvas is refused at once,
    before a model loads or the cost estimate walks its windows."""
    if max_megapixels is None:
        return
    sheets, height, width = geometry.canvas_shape_latent
    scale = geometry.latent_scale
    megapixels = sheets * height * width * scale * scale / 1e6
    if megapixels <= max_megapixels:
        return
    size = f"{scale * height}×{scale * width} px" + (f" × {sheets} sheets" if sheets > 1 else "")
    raise ConfigError(
        f"{geometry.name}: the canvas is {megapixels:.1f} megapixels ({size}; {geometry.num_windows:,} windows), "
        f"above max_megapixels = {max_megapixels:g}; if you mean it, raise max_megapixels (JointDiffusion(max_megapixels=...) "
        "or the job's max_megapixels), else make the canvas smaller"
    )


def needs_x0_fusion(geometry: Geometry) -> bool:
    """Whether ``geometry``'s windows work only with ``x0`` fusion (SyncTweedies): it says where
    its windows show the canvas (:meth:`Geometry.window_coverage` overridden: elsewhere a
    window keeps its own x̂0) or stops fusing before the last step (``fuse_until`` < 1). The
    ``latent`` and ``x0_renoise`` fusions cut windows out of the canvas and know neither."""
    own_coverage = type(geometry).window_coverage is not Geometry.window_coverage
    return own_coverage or float(getattr(geometry, "fuse_until", 1.0)) < 1.0


def check_fusion_option(geometry: Geometry, fusion: str | None) -> None:
    """ConfigError naming ``fusion`` when it is not ``x0`` (or None: the geometry's preferred
    fusion) for a geometry that :func:`needs_x0_fusion`."""
    if fusion is None or fusion == "x0" or not needs_x0_fusion(geometry):
        return
    raise ConfigError(
        f"fusion = {fusion!r} cannot be used with geometry {geometry.name!r}: its windows need fusion = 'x0' "
        "(views that keep their own background and stop being fused after fuse_until); remove fusion or set it to 'x0'"
    )


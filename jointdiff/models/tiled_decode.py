"""Tiled VAE decoding: big canvases decoded in overlapping tiles, blended without seams.

A VAE decoder's memory grows with the image (its activations at full resolution are a
hundred or more channels per output pixel), so a large canvas decoded in one piece runs out
of memory long after the denoising loop fitted. :func:`tiled` wraps a
:data:`~jointdiff.core.geometry.DecodeFn`: the latents ``(B, C, H, W)`` are cut into overlapping
tiles, each tile is decoded on its own, and the decoded tiles are blended with weights that
ramp from ~0 at a tile's inner border to 1 over the overlap, so every output pixel is a
continuous mix and no tile border shows as a line. The ramps are separable and normalised per
axis (a partition of unity along each axis), so the blend needs no weight buffer: peak memory
is one tile's decoder activations plus the output pixels. A decoder without spatial context
is reproduced exactly; latents no larger than one tile are decoded in one call.

Geometries keep their continuity: they pad the canvas circularly (wrapped strips, tori,
equirectangular panoramas) or with neighbouring faces (cubes) *before* calling the decode
function and crop or blend afterwards, so the tiled decode sees the same context as a whole
one. What tiling cannot keep is the decoder's global context: GroupNorm statistics and the
mid-block attention are computed per tile. Per-tile statistics shift each tile's tone a
little; inside the canvas the ramps turn that into slow gradients, but where a looping canvas
closes, its first and last tiles meet without a ramp. :class:`SharedNormStats` therefore
normalises every tile with statistics gathered over the whole image in a first pass (twice
the decode time, no extra memory); attention stays per tile. How far a tiled decode is from a
one-piece one is measured in ``tests/test_large_canvas.py`` and ``docs/benchmarks.md``.

The engine (:meth:`jointdiff.engine.loop.JointDiffusion`, ``decode_tile_latent``) decodes in tiles
of the model's native window when a decode call would produce more than
:data:`AUTO_TILE_MEGAPIXELS` megapixels (:func:`final_decode`).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

from jointdiff.core.geometry import DecodeFn
from jointdiff.utils.errors import ConfigError

Ramp = Literal["linear", "cosine"]

AUTO_TILE_MEGAPIXELS = 4.0
"""With ``decode_tile_latent = None`` (auto), a decode call whose output has more than this
many megapixels (batch included) is tiled; smaller ones are decoded in one piece, exactly as
before (a 512×2048 panorama is 1 MP)."""

MIN_TILE_LATENT = 8
"""The smallest tile side (latent cells) :func:`tiled` accepts."""


def tile_starts(extent: int, tile: int, overlap: int) -> list[int]:
    """Origins of tiles of ``tile`` cells covering ``[0, extent)`` with at least ``overlap``
    cells shared by neighbours, spread evenly (one tile when it covers everything)."""
    if extent <= tile:
        return [0]
    count = math.ceil((extent - overlap) / (tile - overlap))
    return [round(k * (extent - tile) / (count - 1)) for k in range(count)]


def axis_weights(extent: int, tile: int, overlap: int, scale: int, ramp: Ramp = "linear") -> list[tuple[int, torch.Tensor]]:
    """``(start, weights)`` per tile along one axis: ``start`` in latent cells, ``weights``
    ``(scale * min(tile, extent),)`` float32 over the tile's pixels. Each tile's weight ramps
    up over its overlap with the previous tile and down over its overlap with the next (a
    half-pixel offset keeps it above 0); then the weights are divided by their sum at every
    pixel, so they add up to exactly 1 along the axis."""
    starts = tile_starts(extent, tile, overlap)
    size = min(tile, extent)
    local = torch.arange(scale * size, dtype=torch.float64) + 0.5
    raw = []
    for k, start in enumerate(starts):
        weight = torch.ones(scale * size, dtype=torch.float64)
        if k > 0:  # overlap with the previous tile, in pixels
            width = scale * (starts[k - 1] + size - start)
            weight = torch.minimum(weight, (local / width).clamp(max=1.0))
        if k + 1 < len(starts):
            width = scale * (start + size - starts[k + 1])
            weight = torch.minimum(weight, ((scale * size - local) / width).clamp(max=1.0))
        if ramp == "cosine":
            weight = torch.sin(weight * (math.pi / 2)) ** 2
        raw.append(weight)
    total = torch.zeros(scale * extent, dtype=torch.float64)
    for start, weight in zip(starts, raw):
        total[scale * start : scale * (start + size)] += weight
    return [
        (start, (weight / total[scale * start : scale * (start + size)]).float())
        for start, weight in zip(starts, raw)
    ]


def owned_ranges(starts: list[int], size: int, extent: int) -> list[tuple[int, int]]:
    """The part of each tile (``[lo, hi)`` in cells, relative to the tile) that is closer to
    it than to its neighbours: the overlaps split at their middles. The ranges partition the
    axis, so statistics summed over them count every cell once."""
    ranges = []
    for k, start in enumerate(starts):
        lo = 0 if k == 0 else (start + starts[k - 1] + size) // 2
        hi = extent if k + 1 == len(starts) else (starts[k + 1] + start + size) // 2
        ranges.append((lo - start, hi - start))
    return ranges


class SharedNormStats:
    """GroupNorm statistics shared by all tiles of one decode (two passes).

    Pass 1 decodes every tile as usual and sums, for every listed ``GroupNorm`` module, each
    group's values and squares over the part of the tile it owns (:func:`owned_ranges`,
    scaled to the module's resolution). Pass 2 decodes the tiles again, normalising with the
    whole image's means and variances instead of the tile's own. The statistics of pass 1
    come from tiles normalised on their own, so they are close to, not exactly, those of a
    one-piece decode; attention inside the decoder stays per tile."""

    def __init__(self, norms) -> None:
        self.norms = [n for n in norms if isinstance(n, torch.nn.GroupNorm)]
        self.sums: dict[int, list] = {}
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.tile: tuple[int, int] = (0, 0)
        self.owned: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))

    def _spatial(self, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """``x`` as ``(B, C, s*th, s*tw)`` and the factor ``s`` between it and the tile's
        latents; None when its shape is not the tile's at some integer factor."""
        th, tw = self.tile
        if x.ndim == 3:  # attention's GroupNorm sees (B, C, h*w)
            factor = math.isqrt(x.shape[-1] // (th * tw)) if x.shape[-1] >= th * tw else 0
            if factor < 1 or factor * factor * th * tw != x.shape[-1]:
                return None
            return x.reshape(x.shape[0], x.shape[1], factor * th, factor * tw), factor
        if x.ndim != 4 or x.shape[-1] % tw:
            return None
        factor = x.shape[-1] // tw
        return (x, factor) if x.shape[-2] == factor * th else None

    def _collect(self, module: torch.nn.GroupNorm, inputs) -> None:
        if self.stats is not None:
            return
        spatial = self._spatial(inputs[0])
        if spatial is None:
            return
        x, factor = spatial
        (y0, y1), (x0, x1) = self.owned
        region = x[..., factor * y0 : factor * y1, factor * x0 : factor * x1].detach().double()
        region = region.reshape(region.shape[0], module.num_groups, -1)
        sums = self.sums.setdefault(id(module), [0.0, 0.0, 0])
        sums[0] = sums[0] + region.sum(-1)
        sums[1] = sums[1] + (region * region).sum(-1)
        sums[2] += region.shape[-1]

    def _normalise(self, module: torch.nn.GroupNorm, inputs, output):
        if self.stats is None or id(module) not in self.stats:
            return None
        x = inputs[0]
        mean, var = self.stats[id(module)]
        groups = x.reshape(x.shape[0], module.num_groups, -1).float()
        rstd = torch.rsqrt(var.to(groups.device, torch.float32) + module.eps)
        y = ((groups - mean.to(groups.device, torch.float32)[..., None]) * rstd[..., None]).reshape(x.shape)
        if module.affine:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = y * module.weight.float().reshape(shape) + module.bias.float().reshape(shape)
        return y.to(output.dtype)

    def finish_pass(self) -> bool:
        """Turn the sums of pass 1 into statistics; False when no module saw a tile."""
        self.stats = {}
        for key, (total, squares, count) in self.sums.items():
            mean = total / count
            self.stats[key] = (mean, (squares / count - mean * mean).clamp(min=0.0))
        return bool(self.stats)

    def hooks(self) -> list:
        return [n.register_forward_pre_hook(self._collect) for n in self.norms] + [
            n.register_forward_hook(self._normalise) for n in self.norms
        ]


def tiled(
    decode_fn: DecodeFn,
    tile_latent: int | tuple[int, int],
    overlap_latent: int | tuple[int, int],
    scale: int,
    ramp: Ramp = "linear",
    shared_norms: Sequence[torch.nn.Module] = (),
) -> DecodeFn:
    """A decode function that decodes latents ``(B, C, H, W)`` in tiles of at most
    ``tile_latent`` cells (``(h, w)`` or one side for both) overlapping by at least
    ``overlap_latent`` cells, each with ``decode_fn``, and blends them with ``ramp`` weights
    (``"linear"`` or ``"cosine"``) over the overlaps. ``scale`` is the decoder's pixels per
    latent cell (the VAE factor). Latents no larger than one tile are passed to ``decode_fn``
    unchanged (the result is then exactly ``decode_fn``'s).

    ``shared_norms``: the decoder's ``GroupNorm`` modules (:func:`decoder_norms`). With them,
    every tile is normalised with the statistics of the whole image (:class:`SharedNormStats`,
    two passes: twice the decode time, no extra memory), so tiles agree in tone, as a
    one-piece decode does; without them each tile's own statistics shift its colours a
    little (the ramps hide that inside the canvas, but not where a looping canvas closes).

    The output ``(B, C_out, scale*H, scale*W)`` is float32 on the decoded pixels' device."""
    tile_h, tile_w = (tile_latent, tile_latent) if isinstance(tile_latent, int) else tile_latent
    over_h, over_w = (overlap_latent, overlap_latent) if isinstance(overlap_latent, int) else overlap_latent
    for name, tile, over in (("height", tile_h, over_h), ("width", tile_w, over_w)):
        if tile < MIN_TILE_LATENT:
            raise ConfigError(f"decode tile {name} = {tile} latent cells is below the minimum {MIN_TILE_LATENT}")
        if not 0 <= over < tile:
            raise ConfigError(f"decode tile overlap {name} = {over} latent cells must be in [0, {tile})")
    if ramp not in ("linear", "cosine"):
        raise ConfigError(f"decode tile ramp must be 'linear' or 'cosine', got {ramp!r}")
    if scale < 1:
        raise ConfigError(f"decode scale must be a positive integer, got {scale!r}")
    norms = list(shared_norms)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        height, width = latents.shape[-2:]
        if height <= tile_h and width <= tile_w:
            return decode_fn(latents)
        th, tw = min(tile_h, height), min(tile_w, width)
        rows = axis_weights(height, tile_h, over_h, scale, ramp)
        cols = axis_weights(width, tile_w, over_w, scale, ramp)
        owned_y = owned_ranges([top for top, _ in rows], th, height)
        owned_x = owned_ranges([left for left, _ in cols], tw, width)
        shared = SharedNormStats(norms) if norms else None
        handles = shared.hooks() if shared is not None else []
        try:
            if shared is not None:  # pass 1: the whole image's GroupNorm statistics
                shared.tile = (th, tw)
                for (top, _), own_y in zip(rows, owned_y):
                    for (left, _), own_x in zip(cols, owned_x):
                        shared.owned = (own_y, own_x)
                        decode_fn(latents[..., top : top + th, left : left + tw])
                shared.finish_pass()
            out = None
            for top, weight_y in rows:
                for left, weight_x in cols:
                    pixels = decode_fn(latents[..., top : top + th, left : left + tw])
                    expected = (latents.shape[0], scale * th, scale * tw)
                    if (pixels.shape[0], *pixels.shape[-2:]) != expected:
                        raise ValueError(
                            f"tiled decode: a tile of {th}×{tw} latent cells decoded to {tuple(pixels.shape)}, "
                            f"expected (B, C, {scale * th}, {scale * tw}) for scale {scale}"
                        )
                    if out is None:
                        out = torch.zeros(
                            latents.shape[0], pixels.shape[1], scale * height, scale * width,
                            dtype=torch.float32, device=pixels.device,
                        )
                    weight = weight_y.to(pixels.device)[:, None] * weight_x.to(pixels.device)[None, :]
                    region = out[..., scale * top : scale * (top + th), scale * left : scale * (left + tw)]
                    region += pixels.float() * weight
                    del pixels
        finally:
            for handle in handles:
                handle.remove()
        return out

    decode.tile_latent = (tile_h, tile_w)  # type: ignore[attr-defined]
    decode.overlap_latent = (over_h, over_w)  # type: ignore[attr-defined]
    return decode


def decoder_norms(model) -> list[torch.nn.Module]:
    """The ``GroupNorm`` modules of a model family's VAE decoder (``pipeline.vae.decoder``,
    else the whole VAE), for :func:`tiled`'s ``shared_norms``; empty when there is none."""
    vae = getattr(getattr(model, "pipeline", None), "vae", None)
    module = getattr(vae, "decoder", vae)
    if not isinstance(module, torch.nn.Module):
        return []
    return [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]


def default_overlap(tile_latent: int) -> int:
    """The overlap used with ``tile_latent``: a quarter of the tile (16 cells = 128 px for
    SD's 64-cell window, as diffusers' tiled VAE)."""
    return max(1, tile_latent // 4)


def check_tile_option(decode_tile_latent: int | None) -> None:
    """ConfigError unless ``decode_tile_latent`` is None (auto), 0 (never tile) or a tile
    side of at least :data:`MIN_TILE_LATENT` cells."""
    if decode_tile_latent is None:
        return
    if isinstance(decode_tile_latent, bool) or not isinstance(decode_tile_latent, int) or (
        decode_tile_latent != 0 and decode_tile_latent < MIN_TILE_LATENT
    ):
        raise ConfigError(
            f"decode_tile_latent must be None (auto: tiles of the model's native window above "
            f"{AUTO_TILE_MEGAPIXELS:g} megapixels), 0 (decode in one piece) or a tile side of at least "
            f"{MIN_TILE_LATENT} latent cells, got {decode_tile_latent!r}"
        )


def decode_plan(shape: tuple[int, ...], scale: int, native_window: int, decode_tile_latent: int | None) -> int | None:
    """The tile side (latent cells) used to decode latents of ``shape`` ``(B, C, H, W)``, or
    None for one piece: ``decode_tile_latent`` None tiles with ``native_window`` when the
    output exceeds :data:`AUTO_TILE_MEGAPIXELS`, 0 never tiles, a side tiles whenever the
    latents are larger than one tile."""
    batch, height, width = shape[0], shape[-2], shape[-1]
    if decode_tile_latent == 0:
        return None
    if decode_tile_latent is None:
        if batch * height * width * scale * scale <= AUTO_TILE_MEGAPIXELS * 1e6:
            return None
        tile = native_window
    else:
        tile = decode_tile_latent
    return tile if height > tile or width > tile else None


def final_decode(
    decode_fn: DecodeFn,
    scale: int,
    native_window: int,
    decode_tile_latent: int | None = None,
    shared_norms: Sequence[torch.nn.Module] = (),
) -> DecodeFn:
    """The engine's final decode: ``decode_fn`` for small inputs, :func:`tiled` with
    :func:`decode_plan`'s tile (overlap :func:`default_overlap`, ``shared_norms``) for large
    ones. The decision is made per call, on the latents the geometry hands over (padding
    included)."""
    check_tile_option(decode_tile_latent)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        tile = decode_plan(tuple(latents.shape), scale, native_window, decode_tile_latent)
        if tile is None:
            return decode_fn(latents)
        return tiled(decode_fn, tile, default_overlap(tile), scale, shared_norms=shared_norms)(latents)

    return decode

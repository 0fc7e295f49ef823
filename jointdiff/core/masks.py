"""Region masks on the canvas: rasterize shapes, load mask images, feather, downsample.

Conventions: masks are float tensors with values in [0, 1]; a canvas mask is ``(S, 1, H, W)``
(``S`` sheets, as the latent canvas); sizes are ``(h, w)``; pixel coordinates have their
origin at the top-left corner of the sheet, ``x`` to the right, ``y`` down, and pixel
``(x, y)`` covers the square ``[x, x+1) × [y, y+1)``. Masks are drawn at pixel resolution and
reduced to latent resolution by *area* averaging, so a latent cell's value is the fraction of
its ``f × f`` pixels inside the region (``f`` = VAE factor).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from jointdiff.utils import images
from jointdiff.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch


def rectangle_mask(size_px: tuple[int, int], box_px: Sequence[float], what: str = "rect") -> torch.Tensor:
    """``(h, w)`` mask of the box ``[left, top, right, bottom]`` in pixels (right and bottom
    exclusive, as PIL's crop boxes); the box is clipped to the sheet."""
    import torch

    height, width = size_px
    left, top, right, bottom = (int(round(v)) for v in box_px)
    if right <= left or bottom <= top:
        raise ConfigError(f"{what} = {list(box_px)!r} must be [left, top, right, bottom] with right > left and bottom > top")
    mask = torch.zeros(height, width)
    mask[max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)] = 1.0
    return mask


def polygon_mask(
    size_px: tuple[int, int], points_px: Sequence[Sequence[float]], what: str = "polygon", supersample: int = 4
) -> torch.Tensor:
    """``(h, w)`` mask of a polygon of ``[x, y]`` vertices in pixels, rasterized with Pillow's
    ``ImageDraw.polygon`` at ``supersample`` times the resolution (within the polygon's
    bounding box) and box-averaged: edges are antialiased, and Pillow's inclusive outline
    adds at most ``1 / supersample`` px along them."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageDraw

    if len(points_px) < 3 or any(len(p) != 2 for p in points_px):
        raise ConfigError(f"{what} = {list(points_px)!r} must be a list of at least three [x, y] points")
    height, width = size_px
    xs, ys = [float(p[0]) for p in points_px], [float(p[1]) for p in points_px]
    left, top = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
    right, bottom = min(width, math.ceil(max(xs))), min(height, math.ceil(max(ys)))
    mask = torch.zeros(height, width)
    if right <= left or bottom <= top:
        return mask
    s = supersample
    image = Image.new("L", ((right - left) * s, (bottom - top) * s), 0)
    ImageDraw.Draw(image).polygon([((x - left) * s, (y - top) * s) for x, y in zip(xs, ys)], fill=255)
    fine = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    mask[top:bottom, left:right] = F.avg_pool2d(fine[None, None], s)[0, 0]
    return mask


def image_mask(source: Any, size_px: tuple[int, int], what: str = "mask") -> torch.Tensor:
    """``(h, w)`` mask from a grayscale image: a path, a PIL image (converted to ``L``), an
    array or tensor ``(h, w)`` / ``(1, h, w)`` with values in [0, 1]. Grey levels are kept
    as soft weights. The size must be the sheet's pixel size."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(source, (str, Path, Image.Image)):
        mask = torch.from_numpy(images.load_array(source, "L", what))
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        mask = torch.as_tensor(np.asarray(source) if isinstance(source, np.ndarray) else source).float().cpu()
        mask = mask[0] if mask.ndim == 3 and mask.shape[0] == 1 else mask
        if mask.ndim != 2:
            raise ConfigError(f"{what}: a mask array must be (h, w) or (1, h, w), got shape {tuple(mask.shape)}")
        if mask.numel() and (float(mask.min()) < 0.0 or float(mask.max()) > 1.0):
            raise ConfigError(f"{what}: mask values must lie in [0, 1], got [{float(mask.min())}, {float(mask.max())}]")
    else:
        raise ConfigError(f"{what} must be an image path, PIL image, array or tensor, got {type(source).__name__}")
    if tuple(mask.shape) != tuple(size_px):
        raise ConfigError(
            f"{what} is {mask.shape[1]}×{mask.shape[0]} px (w×h) but the canvas sheet is "
            f"{size_px[1]}×{size_px[0]} px; masks are drawn on the canvas"
        )
    return mask


def feather(mask: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Soften a mask ``(..., h, w)`` with a Gaussian blur of standard deviation ``radius_px``
    (as Pillow's ``GaussianBlur(radius)``), edges replicated; ``radius_px`` 0 returns it unchanged."""
    import torch
    import torch.nn.functional as F

    if radius_px <= 0:
        return mask
    half = max(1, math.ceil(3.0 * radius_px))
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / radius_px) ** 2)
    kernel = kernel / kernel.sum()
    shape = mask.shape
    x = mask.reshape(-1, 1, *shape[-2:]).float()
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, half, half), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.reshape(shape).clamp(0.0, 1.0)


def area_downsample(mask_px: torch.Tensor, factor: int) -> torch.Tensor:
    """``(S, 1, f*H, f*W)`` pixel mask → ``(S, 1, H, W)``: each latent cell gets the mean of
    its ``f × f`` pixels (the fraction of the cell inside the region)."""
    import torch.nn.functional as F

    height, width = mask_px.shape[-2:]
    if height % factor or width % factor:
        raise ConfigError(f"mask of {width}×{height} px is not a multiple of the VAE factor {factor}")
    return F.avg_pool2d(mask_px.float(), kernel_size=factor)

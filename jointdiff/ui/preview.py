"""Cheap previews of a canvas while it denoises: latents → RGB without the VAE.

A VAE latent cell is close to a linear function of the colour of the 8×8 (16×16) pixels it
encodes, so a small linear map per latent channel gives a recognisable picture at no cost
(the approach of ComfyUI's and A1111's "approx" previews):

- **SD 1.x/2.x**: the well-known 4×3 factors (Keturn, "Decoding latents to RGB without
  upscaling", 2022), applied to the scaled latents the denoiser sees;
- **every other family**: a map fitted once per loaded model by least squares from random
  latents to the VAE's decoded colours, average-pooled to one colour per latent cell;
- **a tiny autoencoder** (TAESD, diffusers ``AutoencoderTiny``): the family's own
  (``ModelFamily.tiny_autoencoder``) or one named in ``taesd``, when it loads without a
  download (a local folder or the local hub cache): a real decode at a fraction of the VAE's cost.

Tensors: canvas latents ``(S, C, H, W)`` (S sheets: 1, or 6 cube faces); previews are PIL
images of ``(H, W)`` cells per sheet (×8 with TAESD), sheets side by side.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from PIL import Image

SD_FACTORS = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])
"""SD 1.x/2.x latent channel → (R, G, B) in [-1, 1] (Keturn 2022)."""

SHOWN_WIDTH_PX = 512
"""Previews narrower than this are enlarged (nearest neighbour, whole factors up to 8) to be seen."""

FIT_CELLS = 32
"""Side, in latent cells, of the random latents a projection is fitted on (1024 samples per sheet)."""

_FITTED: weakref.WeakKeyDictionary[Any, tuple[torch.Tensor, torch.Tensor]] = weakref.WeakKeyDictionary()


class Previewer:
    """``previewer(model, canvas) -> PIL image`` for :class:`jointdiff.jobs.queue.JobQueue`.
    ``taesd``: family name → AutoencoderTiny folder or hub id, in place of the family's own
    (loaded offline only; a model whose TAESD does not load falls back to the linear map)."""

    def __init__(self, taesd: dict[str, str] | None = None) -> None:
        self.taesd = dict(taesd or {})
        self._decoders: dict[str, Any] = {}

    def __call__(self, model: Any, canvas: torch.Tensor) -> Image.Image:
        decoder = self._tiny_decoder(model)
        if decoder is not None:
            with torch.no_grad():
                vae_latents = model.to_vae_latents(canvas.to(model.device, torch.float32))
                rgb = decoder.decode(vae_latents.to(decoder.dtype)).sample.float()
        else:
            rgb = project(canvas, *linear_map(model))
        return to_image(rgb)

    def _tiny_decoder(self, model: Any) -> Any:
        path = self.taesd.get(model.name) or getattr(model, "tiny_autoencoder", None)
        if path is None:
            return None
        if path not in self._decoders:
            self._decoders[path] = load_tiny_decoder(path, model.device)
        return self._decoders[path]


def load_tiny_decoder(path: str, device: torch.device) -> Any:
    """diffusers ``AutoencoderTiny`` from a local folder or the local hub cache (never a
    download); None when it is not there."""
    from diffusers import AutoencoderTiny

    try:
        return AutoencoderTiny.from_pretrained(path, local_files_only=True).to(device).eval()
    except Exception:  # not cached, or not an AutoencoderTiny: the linear preview serves instead
        return None


def linear_map(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(factors (C, 3), bias (3,))`` taking the model's canvas latents to RGB in [-1, 1]."""
    if model.name == "sd" and model.latent_format.channels == SD_FACTORS.shape[0]:
        return SD_FACTORS, torch.zeros(3)
    if model not in _FITTED:
        _FITTED[model] = fit_linear_map(model)
    return _FITTED[model]


@torch.no_grad()
def fit_linear_map(model: Any, cells: int = FIT_CELLS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``rgb ≈ z · factors + bias`` over random canvas latents ``z`` (unit
    Gaussian, as the canvas starts) and their VAE decode, average-pooled to one colour per
    latent cell: the linear map that best predicts the VAE's colours from one cell."""
    latent = model.latent_format
    side = max(cells, latent.min_window) // latent.patch * latent.patch
    generator = torch.Generator("cpu").manual_seed(seed)
    z = torch.randn(1, latent.channels, side, side, generator=generator)
    pixels = model.decode(z.to(model.device, model.dtype)).float().cpu()
    colours = torch.nn.functional.adaptive_avg_pool2d(pixels, (side, side))
    inputs = torch.cat([z.flatten(2)[0].T, torch.ones(side * side, 1)], dim=1)  # (N, C + 1)
    targets = colours.flatten(2)[0].T  # (N, 3)
    solution = torch.linalg.lstsq(inputs, targets).solution
    return solution[:-1], solution[-1]


def project(canvas: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``(S, C, H, W)`` latents → ``(S, 3, H, W)`` RGB in [-1, 1] by the per-channel map."""
    latents = canvas.detach().float().cpu()
    return (torch.einsum("schw,cr->srhw", latents, factors.float()) + bias.float().view(1, 3, 1, 1)).clamp(-1, 1)


def to_image(rgb: torch.Tensor) -> Image.Image:
    """``(S, 3, H, W)`` in [-1, 1] → one RGB image, the sheets side by side."""
    sheets = ((rgb.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    strip = torch.cat(list(sheets), dim=2)  # (3, H, S·W)
    image = Image.fromarray(strip.permute(1, 2, 0).contiguous().numpy())
    factor = min(8, max(1, SHOWN_WIDTH_PX // image.width))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image

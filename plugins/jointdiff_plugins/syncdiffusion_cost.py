"""What SyncDiffusion costs, as the cost estimate asks any synchronizer: the network rows of one
synchronized step and the FLOPs per row of the networks the core does not price itself (the
loss decoder when it is TAESD, and LPIPS). See
:meth:`jointdiff.core.synchronizer.Synchronizer.evaluations_per_step` and ``price_per_row``.
"""

from __future__ import annotations

from typing import Any

import torch

from jointdiff.plugin import cached_flops, count_flops, decoder_unit
from jointdiff_plugins.lpips_loader import AnchorDistance, load_lpips


def rows_per_step(windows: int, branches: int, rows: int, shared_branches: bool = False) -> dict[str, int]:
    """Rows SyncDiffusion's ``update`` runs in one synchronized step: the anchor's guided
    forward, decode and LPIPS features once (no gradient), then for the ``N − 1`` other
    windows a guided forward and backward of the denoiser, the loss decoder and LPIPS, once
    per region branch, or once for all branches when they share the move (``shared_branches``:
    SyncDiffusion's ``reuse_region_moves``)."""
    others = (windows - 1) * (1 if shared_branches else branches)
    if others <= 0:  # the anchor alone: nothing to move
        return {}
    return {
        "denoiser.forward": rows * (1 + others), "denoiser.backward": rows * others,
        "decoder.forward": 1 + others, "decoder.backward": others,
        "perceptual.forward": 1 + others, "perceptual.backward": others,
    }


def price_per_row(model: Any, window: tuple[int, int], options: Any, taesd: Any) -> tuple[dict[str, float], list[str]]:
    """The loss decoder (the VAE or TAESD; ``taesd``: the loaded module, None when it cannot
    be loaded) and LPIPS prices per row, with notes on what could not be priced."""
    notes: list[str] = []
    unit: dict[str, float] = {}
    if getattr(options, "decoder", "vae") == "vae":
        unit.update(decoder_unit(model, window, gradient=True))
    elif taesd is None:
        notes.append("the TAESD loss decoder is not priced (not loadable here)")
    else:
        run = lambda z: taesd.decode(z.to(taesd.dtype), return_dict=False)[0]  # noqa: E731
        unit.update(decoder_unit(model, window, gradient=True, decode=run, name="taesd"))
    pixels = tuple(model.latent_format.scale_factor * side for side in window)
    try:
        unit.update(perceptual_unit(options, pixels, model.device))
    except Exception as error:  # lpips missing, or a custom module the meta device cannot run
        notes.append(f"LPIPS is not priced ({type(error).__name__})")
    return unit, notes


def perceptual_unit(options: Any, pixels: tuple[int, int], device: torch.device) -> dict[str, float]:
    """LPIPS per image of ``pixels`` (h, w) as :class:`AnchorDistance` runs it:
    ``perceptual.forward`` (features of one image) and ``perceptual.backward`` (the input
    gradient of its distance to the anchor). The built-in LPIPS is counted on the meta device
    (nothing computed, nothing downloaded); a custom ``lpips_module`` on ``device``."""
    custom = getattr(options, "lpips_module", None)
    net = getattr(options, "net", "vgg")
    key = ("lpips", net if custom is None else id(custom), tuple(pixels))
    where = torch.device("meta") if custom is None else torch.device(device)
    measured: dict[str, float] = {}

    def distance() -> AnchorDistance:
        if custom is not None:
            return AnchorDistance(custom)
        with torch.device("meta"):  # parameters are never allocated; stray buffers moved after
            return AnchorDistance(load_lpips(net, random_backbone=True).to("meta"))

    def measure(part: str) -> float:
        if not measured:
            dist = distance()
            image = torch.zeros(1, 3, *pixels, device=where)
            with torch.no_grad():
                measured["forward"] = count_flops(lambda: dist.set_anchor(image))
            x = torch.zeros(1, 3, *pixels, device=where, requires_grad=True)
            with torch.enable_grad():
                measured["both"] = count_flops(lambda: torch.autograd.grad(dist(x.clone()).sum(), x))
        return measured[part]

    forward = cached_flops(key + ("forward",), lambda: measure("forward"))
    both = cached_flops(key + ("both",), lambda: measure("both"))
    return {"perceptual.forward": forward, "perceptual.backward": both - forward}

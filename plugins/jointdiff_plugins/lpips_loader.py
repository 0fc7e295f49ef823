"""LPIPS for the synchronizer: offline-aware loading and a distance to a fixed anchor image.

LPIPS (Zhang et al., CVPR 2018) compares unit-normalised deep features of two images:
``d(x, y) = sum_l mean_hw( w_l · (f̂_l(x) − f̂_l(y))² )``. In ``lpips`` 0.1.4 the linear heads
``w_l`` ship inside the package (``lpips/weights/v0.1/<net>.pth``); the backbone ``f`` is a
torchvision ImageNet classifier (AlexNet, VGG16 or SqueezeNet 1.1) whose weights torchvision
downloads from download.pytorch.org into the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``).

Images are ``(B, 3, H, W)`` in [-1, 1].
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jointdiff.plugin import ConfigError, ModelLoadError, stdout_folded

if TYPE_CHECKING:
    import torch

LPIPS_NETS = ("vgg", "alex", "squeeze")
_TORCHVISION_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}
_RANDOM_BACKBONE_SEED = 0


def backbone_weights_url(net: str) -> str:
    """The download URL torchvision uses for the ImageNet backbone of LPIPS ``net``."""
    from torchvision import models

    if net not in LPIPS_NETS:
        raise ConfigError(f"net must be one of {list(LPIPS_NETS)}, got {net!r}")
    return getattr(models, _TORCHVISION_WEIGHTS[net]).IMAGENET1K_V1.url


def backbone_weights_path(net: str) -> Path:
    """Where torchvision looks for (and caches) the backbone weights of LPIPS ``net``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / backbone_weights_url(net).rsplit("/", 1)[-1]


def _build(net: str, random_backbone: bool) -> torch.nn.Module:
    import lpips

    with warnings.catch_warnings(), stdout_folded("LPIPS"):
        # lpips 0.1.4 passes torchvision's deprecated ``pretrained=`` argument.
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)


def load_lpips(net: str = "vgg", *, random_backbone: bool = False) -> torch.nn.Module:
    """An ``lpips.LPIPS`` module (eval mode, frozen, on the CPU).

    The backbone weights come from the torch hub cache, or are downloaded by torchvision.
    When neither works, raises :class:`~jointdiff.utils.errors.ModelLoadError` saying where to put
    the file. ``random_backbone=True`` builds the backbone from a fixed seed instead (lpips'
    ``pnet_rand``): fine for tests of code paths and gradients, meaningless as a metric.
    """
    import torch

    url = backbone_weights_url(net)
    if random_backbone:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_BACKBONE_SEED)
            module = _build(net, True)
    else:
        try:
            module = _build(net, False)
        except Exception as error:  # URLError, HTTPError, a corrupt cache file, ...
            raise ModelLoadError(_missing_weights_message(net, url, error)) from error
    return module.eval().requires_grad_(False)


def _missing_weights_message(net: str, url: str, error: Exception) -> str:
    path = backbone_weights_path(net)
    reason = f"{type(error).__name__}: {error}".splitlines()[0]
    return (
        f"LPIPS net {net!r} needs torchvision's ImageNet backbone weights, which are not in the "
        f"torch hub cache ({path}) and could not be downloaded ({reason}). Download {url} on a "
        f"connected machine and put it at {path} (or point $TORCH_HOME at a folder holding "
        "hub/checkpoints/<that file>), or pass a ready module: "
        f"lpips_module=lpips.LPIPS(net={net!r}). For tests only, lpips_random_backbone=True "
        "builds a random backbone (not a perceptual metric)."
    )


class AnchorDistance:
    """Per-sample LPIPS between a batch of images and one fixed anchor image.

    For an ``lpips.LPIPS`` module (non-spatial, with linear heads) the anchor's normalised
    features are computed once per :meth:`set_anchor` and reused for every batch, which halves
    the backbone work of the loss; the value is the same as ``module(images, anchor)``. Any
    other module is called as ``module(images, anchor_batch)`` and must return per-sample
    distances of shape ``(B,)`` or ``(B, 1, 1, 1)``.
    """

    def __init__(self, module: Any) -> None:
        self.module = module
        self._anchor: torch.Tensor | None = None
        self._anchor_features: list[torch.Tensor] | None = None

    @property
    def _cacheable(self) -> bool:
        m = self.module
        parts = all(hasattr(m, a) for a in ("net", "lins", "scaling_layer", "version", "spatial"))
        return parts and getattr(m, "lpips", False) is True and not m.spatial

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        import lpips

        m = self.module
        scaled = m.scaling_layer(images) if m.version == "0.1" else images
        return [lpips.normalize_tensor(f) for f in m.net.forward(scaled)]

    def set_anchor(self, image: torch.Tensor) -> None:
        """Fix the anchor ``(1, 3, H, W)`` in [-1, 1] (no gradient flows into it). Images are
        cast to the module's floating dtype (float32 unless the module is, e.g., float64)."""
        import torch

        dtype = next((p.dtype for p in _parameters(self.module) if p.is_floating_point()), image.dtype)
        self._anchor = image.detach().to(dtype)
        with torch.no_grad():
            self._anchor_features = self._features(self._anchor) if self._cacheable else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """LPIPS of each image ``(B, 3, H, W)`` to the anchor; returns ``(B,)``."""
        if self._anchor is None:
            raise RuntimeError("AnchorDistance: set_anchor() must be called first")
        images = images.to(self._anchor.dtype)
        if self._anchor_features is None:
            anchor = self._anchor.expand(images.shape[0], -1, -1, -1)
            return self.module(images, anchor).reshape(images.shape[0], -1).sum(1)
        total = 0
        for lin, feature, anchor in zip(self.module.lins, self._features(images), self._anchor_features):
            total = total + lin((feature - anchor) ** 2).mean([2, 3], keepdim=True)
        return total.reshape(images.shape[0])


def _parameters(module: Any) -> list[torch.Tensor]:
    import torch

    return list(module.parameters()) if isinstance(module, torch.nn.Module) else []

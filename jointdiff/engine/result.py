"""What a job returns (:class:`JointResult`), and how a step callback ends it early
(:class:`StopJob`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jointdiff.image.output import save_result

if TYPE_CHECKING:
    import torch
    from PIL import Image


class StopJob(Exception):
    """Raised by a step callback to end the job after the current step: the result holds
    the canvas so far (``metadata["stopped_at_step"]``) and a checkpoint, if any, is kept
    (written at this step) so the job can be resumed. ``latents`` (optional) replace the
    canvas first, as a returned value would. With window parallelism one rank raising it
    stops every rank."""

    def __init__(self, latents: torch.Tensor | None = None, message: str = "stopped by a step callback") -> None:
        super().__init__(message)
        self.latents = latents


@dataclass
class JointResult:
    """What a job returns: the output images, the final canvas latents ``(S, C, H, W)``
    (float32, unscaled; with ``x0`` fusion, the fused clean latents of the last step) and the
    decoded pixels ``(S, 3, H_px, W_px)`` in [-1, 1]."""

    images: list[Image.Image]
    latents: torch.Tensor
    pixels: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    companions: Any = None
    """``companions(first_image_path) -> paths``: the geometry's files written next to the
    saved images (:meth:`jointdiff.core.geometry.Geometry.write_companions`), or None."""

    def save(self, path: Any, *, overwrite: bool = True) -> list[Any]:
        """Save the images (several: ``out_0.png``, ...) with the job and seed in every PNG,
        as the CLI does; ``overwrite=False`` keeps existing files (next free name). See
        :func:`jointdiff.image.output.save_result`."""
        return save_result(self, path, overwrite=overwrite)

"""The ``inpaint_model`` conditioner: start from an image with an inpainting model.

An inpainting model (Stable Diffusion inpainting's 9-channel UNet, Rombach et al. 2022;
FLUX.1 Fill) takes, besides the noisy latents, the VAE latents of the image with the region
to repaint blanked out and the mask, joined to the latents along channels. This conditioner
computes that condition once for the whole canvas with the job's model family
(:meth:`~jointdiff.core.family.ModelFamily.inpaint_condition`) and gives every window its
own part of it, cut by the geometry exactly as the latents are (the condition is at latent
resolution), so every window of the joint diffusion (MultiDiffusion, Bar-Tal et al. 2023)
sees the known image around what it repaints (ControlSync's ``c^(i) = ψ_{c→i}(c)``, Lee et
al. 2023, with an inpainting model's condition).

Conventions, as diffusers' inpainting pipelines (StableDiffusionInpaintPipeline,
FluxFillPipeline):

- ``mask`` is 1 (white) where the model repaints and 0 (black) where the image is kept,
  binarised at 0.5; a colour mask file is read as grayscale;
- ``image`` is RGB in [0, 1] (a file or PIL image is divided by 255), mapped to [-1, 1] for
  the VAE; repainted pixels are zeroed there (mid-grey) before encoding;
- the kept region is *not* pasted back into the latents each step (diffusers does that only
  for 4-channel UNets): the model keeps it, so it is close to the image, not equal to it.

Tensors: ``image`` ``(S, 3, H_px, W_px)`` or ``(3, H_px, W_px)``; ``mask`` ``(S, 1, H_px,
W_px)``, ``(1, H_px, W_px)`` or ``(H_px, W_px)``, at the canvas's pixel size (``S`` sheets; a
list gives one item per sheet). The condition ``(S, C', H, W)`` (SD: 5 channels, FLUX.1 Fill:
80) is kept once on the device in the model's dtype; window rows ``(B', C', h, w)`` are cut
per batch. A geometry that resamples (equirect, cubemap) interpolates the condition, the
mask channels included.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pydantic

from jointdiff.plugin import Conditioner, ConfigError, PluginOptions, hookimpl, images

if TYPE_CHECKING:
    import torch

REQUIRES_PLUGIN_API = "2.0"


def _check_paths(value: Any) -> Any:
    """Paths must exist now, before any model loads; arrays and tensors are checked in setup."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, (str, Path)) and not Path(item).expanduser().is_file():
            raise ValueError(f"no such image file {str(item)!r}")
    return value


class InpaintModelConditioner(Conditioner):
    """An inpainting model's condition (masked-image latents and mask) for every window.

    The job's model must be an inpainting checkpoint (``model.is_inpainting``): SD 1.x/2.x
    inpainting (UNet with 9 input channels) or FLUX.1 Fill. A job takes one (the model has
    one condition input).
    """

    name = "inpaint_model"
    one_per_job = True

    class Options(PluginOptions):
        image: Any = pydantic.Field(
            description="the image at the canvas's pixel size: path, PIL, array or tensor, RGB in [0, 1]; a list per sheet"
        )
        mask: Any = pydantic.Field(
            description="1 (white) = repaint, 0 (black) = keep (diffusers' convention), binarised at 0.5; "
            "path, PIL, array or tensor at the canvas's pixel size; a list per sheet"
        )

        @pydantic.field_validator("image", "mask")
        @classmethod
        def _exists(cls, value: Any) -> Any:
            return _check_paths(value)

    @classmethod
    def example_options(cls) -> dict:
        """Options for tests on the conformance kit's example canvas (512×256 px at a VAE
        factor of 8): a grey image and a mask that repaints its right half, written as PNGs
        to a new temporary folder (paths, so the options survive a job file's round trip)."""
        import tempfile

        from PIL import Image

        folder = Path(tempfile.mkdtemp(prefix="jointdiff-inpaint-example-"))
        Image.new("RGB", (512, 256), (128, 128, 128)).save(folder / "image.png")
        mask = Image.new("L", (512, 256), 0)
        mask.paste(255, (256, 0, 512, 256))
        mask.save(folder / "mask.png")
        return {"image": str(folder / "image.png"), "mask": str(folder / "mask.png")}

    def __repr__(self) -> str:
        def short(value: Any) -> str:
            if isinstance(value, (list, tuple)):
                return f"[{', '.join(short(v) for v in value)}]"
            return repr(str(value)) if isinstance(value, (str, Path)) else f"<{type(value).__name__}>"

        return f"{type(self).__name__}(image={short(self.options.image)}, mask={short(self.options.mask)})"

    def setup(self, context) -> None:
        """Check the model and the sizes, then compute the canvas-scale condition once."""
        import torch

        model = context.model
        if not model.is_inpainting:
            raise ConfigError(
                f"inpaint_model: the job's model (family {model.name!r}) is not an inpainting model; "
                "use an inpainting checkpoint (SD inpainting, FLUX.1 Fill)"
            )
        image = load_sheets(self.options.image, context, "image", channels=3)
        mask = load_sheets(self.options.mask, context, "mask", channels=1)
        with torch.no_grad():
            condition = model.inpaint_condition(image.to(context.device) * 2 - 1, mask.to(context.device))
        self._condition = condition.to(device=context.device, dtype=context.dtype)

    def model_kwargs(
        self, model_input: torch.Tensor, timestep: torch.Tensor, embeds, window_ids: Sequence[int], context,
        guidance_scale: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """``{"concat_condition": (B', C', h, w)}``: the batch's windows of the condition,
        repeated for every guidance branch (rows ``[branch 0: windows..., branch 1: ...]``)."""
        rows = context.geometry.extract(self._condition, window_ids)
        branches = len(model_input) // len(window_ids)
        return {"concat_condition": rows.repeat(branches, 1, 1, 1)}


# ----------------------------------------------------------------------------- loading


def load_sheets(value: Any, context, option: str, channels: int) -> torch.Tensor:
    """``(S, channels, H_px, W_px)`` float in [0, 1] on the CPU from ``value`` (one item per
    sheet), checked against the canvas: ``S`` sheets of ``f·H × f·W`` pixels."""
    import torch

    geometry = context.geometry
    sheets, height, width = geometry.canvas_shape_latent
    size = (geometry.latent_scale * height, geometry.latent_scale * width)
    if isinstance(value, torch.Tensor) and value.ndim == 4:
        items = list(value)
    else:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) != sheets:
        raise ConfigError(f"inpaint_model: {option} has {len(items)} sheet(s), the canvas of {geometry.name!r} has {sheets}")
    tensors = [_as_tensor(item, option, channels) for item in items]
    for tensor in tensors:
        if tuple(tensor.shape[-2:]) != size:
            raise ConfigError(
                f"inpaint_model: {option} is {tensor.shape[-1]}×{tensor.shape[-2]} px (w×h) but the canvas is "
                f"{size[1]}×{size[0]} px; it must have the canvas's pixel size"
            )
    return torch.stack([t.expand(channels, -1, -1) for t in tensors])


def _as_tensor(item: Any, option: str, channels: int) -> torch.Tensor:
    """``(C, H, W)`` float in [0, 1] from a path, PIL image, ``(H, W[, C])`` array or
    ``(C, H, W)`` / ``(H, W)`` tensor; a mask (``channels == 1``) is read as grayscale."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(item, (str, Path, Image.Image)):
        item = images.load_array(item, "L" if channels == 1 else "RGB", f"inpaint_model: {option}")
    if isinstance(item, np.ndarray):
        array = np.asarray(item)
        tensor = torch.from_numpy(images.unit_array(array))
        tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor
    elif isinstance(item, torch.Tensor):
        tensor = item.detach().float().cpu()
    else:
        raise ConfigError(f"inpaint_model: {option} must be a path, PIL image, array or tensor, got {type(item).__name__}")
    tensor = tensor[None] if tensor.ndim == 2 else tensor
    if tensor.ndim != 3 or tensor.shape[0] not in (1, channels):
        raise ConfigError(
            f"inpaint_model: {option} must be ({channels}, H, W) per sheet, got shape {tuple(tensor.shape)}"
        )
    return tensor


@hookimpl
def register_conditioners(register):
    register(InpaintModelConditioner)

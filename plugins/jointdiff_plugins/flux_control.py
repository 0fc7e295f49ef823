"""The ``flux_control`` conditioner: FLUX.1 Depth-dev / Canny-dev's control image for every window.

FLUX.1 Depth-dev and Canny-dev (Black Forest Labs, "FLUX.1 Tools", 2024) are not ControlNets:
the transformer itself takes the control image's VAE latents joined to the noisy latents
along channels (diffusers' ``FluxControlPipeline``: 64 + 64 features per 2×2 token). This
conditioner computes those latents and gives every window its own, as ``inpaint_model`` does
for FLUX.1 Fill (ControlSync's ``c^(i) = ψ_{c→i}(c)``, Lee et al. 2023):

- ``image`` at the canvas's pixel size (a depth map, Canny edges, ...): encoded once for the
  whole canvas, cut per window by the geometry exactly as the latents are;
- ``image = "depth"`` (``"normal"``, ``"mask"``, any map the geometry renders): each
  window's own map from the geometry (:meth:`~jointdiff.core.geometry.Geometry.window_map`
  at the VAE factor), encoded once per window, as SyncMVD (Liu et al. 2023) conditions every
  rendered view of a mesh on its depth.

Conventions, as ``FluxControlPipeline``: the image is RGB in [0, 1] (a file or PIL image is
divided by 255), mapped to [-1, 1] for the VAE; latents at the posterior mean (the pipeline
samples the posterior with its generator), scaled and shifted like the canvas; one-channel
images are repeated to RGB; ``preprocess = "canny"`` turns a photo into edges (OpenCV), as
for ``controlnet``. FLUX.1 Depth/Canny-dev were trained with guidance 10 / 30: set
``guidance_scale`` on the text conditioner.

Tensors: the condition ``(S, 16, H, W)`` for a canvas image or ``(N, 16, h, w)`` per window
(geometry maps), kept once on the device in the model's dtype; window rows ``(B', 16, h, w)``
are taken per batch and repeated for every guidance branch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from jointdiff.plugin import Conditioner, ConfigError, check_geometry_maps, hookimpl
from jointdiff_plugins.controlnet import ControlImageOptions, geometry_map_name, load_condition, load_window_maps

if TYPE_CHECKING:
    import torch

WHERE = "flux_control"


class FluxControlConditioner(Conditioner):
    """The control image of a channel-concatenated control model (FLUX.1 Depth/Canny-dev)
    for every window. The job's model must be one (``model.takes_control_image``); a job
    takes one (the model has one condition input)."""

    name = "flux_control"
    one_per_job = True

    class Options(ControlImageOptions):
        """The control image (RGB in [0, 1] for arrays and tensors), as a ControlNet's."""

    def __repr__(self) -> str:
        image = self.options.image
        shown = repr(str(image)) if isinstance(image, str) else f"<{type(image).__name__}>"
        return f"{type(self).__name__}(image={shown}, preprocess={self.options.preprocess!r})"

    def geometry_maps(self) -> tuple[str, ...]:
        """The geometry map the image is, if it is one (``image = "depth"``)."""
        name = geometry_map_name(self.options.image)
        return () if name is None else (name,)

    def setup(self, context) -> None:
        """Check the model, then encode the control image once: per canvas sheet, or per
        window for a geometry map."""
        import torch

        model = context.model
        check_geometry_maps(context.geometry, [self])
        if not model.takes_control_image:
            raise ConfigError(
                f"{WHERE}: the job's model (family {model.name!r}) takes no control image; "
                "use a channel-concatenated control checkpoint (FLUX.1-Depth-dev, FLUX.1-Canny-dev)"
            )
        self._per_window = bool(self.geometry_maps())
        if self._per_window:
            pixels = load_window_maps(self.options, context, 3, WHERE)
        else:
            pixels = load_condition(self.options, context, 3, WHERE)
        with torch.no_grad():
            condition = model.control_image_condition(pixels.to(context.device) * 2 - 1)
        self._condition = condition.to(device=context.device, dtype=context.dtype)

    def model_kwargs(
        self, model_input: torch.Tensor, timestep: torch.Tensor, embeds, window_ids: Sequence[int], context,
    ) -> dict[str, Any]:
        """``{"concat_condition": (B', 16, h, w)}``: the batch's windows of the control
        latents, repeated for every guidance branch (rows ``[branch 0: windows..., ...]``)."""
        if self._per_window:
            rows = self._condition[list(window_ids)]
        else:
            rows = context.geometry.extract(self._condition, window_ids)
        branches = len(model_input) // len(window_ids)
        return {"concat_condition": rows.repeat(branches, 1, 1, 1)}


@hookimpl
def register_conditioners(register):
    register(FluxControlConditioner)

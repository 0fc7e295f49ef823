"""The ``controlnet`` conditioner: ControlNet of any size (ControlSync, Lee et al. 2023).

A condition image the size of the canvas ``c`` is mapped to every window by the job's
geometry, ``c^(i) = ψ_{c→i}(c)`` (ControlSync Eq. 1): a crop for ``strip``/``grid``, the same
resampling as the latents for geometries that resample. Each window's UNet call gets the
ControlNet residuals of its own condition (Zhang, Rao & Agrawala 2023), so every denoising
step and every x̂0 a synchronizer computes (ControlSync Eq. 2–3) follows the condition.

Behaviour follows diffusers' ``StableDiffusionControlNetPipeline`` (non-guess mode):

- the ControlNet runs on both classifier-free-guidance branches, with the same text states
  as the UNet, on the scaled model input;
- the condition image is RGB in [0, 1] (a PIL image is ``/255``; no normalisation to
  [-1, 1]); a one-channel image is repeated to three channels (diffusers converts to RGB);
- at step ``i`` of ``n`` a ControlNet is active unless ``i/n < guidance_start`` or
  ``(i+1)/n > guidance_end``; its residuals are scaled by ``conditioning_scale``;
- several ControlNets add their residuals (diffusers' ``MultiControlNetModel``).

The condition can also come from the geometry itself: ``image = "depth"`` (or ``"normal"``,
``"mask"``, any name in the geometry's ``window_maps``) gives every window the map the
geometry renders for it (:meth:`~jointdiff.core.geometry.Geometry.window_map`, at the pixel
scale the ControlNet takes), as SyncMVD (Liu et al. 2023) gives every rendered view of a mesh
its depth for a depth ControlNet. A geometry that renders no such map is refused before any
model loads.

Tensors: condition images ``(S, C, H_px, W_px)`` at the canvas's pixel size (``S`` sheets),
kept once on the device; window conditions ``(B', C, h_px, w_px)`` are cut per batch. Maps
from the geometry are kept per window, ``(N, C, h_px, w_px)`` (or the family's latents of
them), and their rows taken per batch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import pydantic

from jointdiff.plugin import (
    Conditioner,
    ConfigError,
    ModelLoadError,
    PluginOptions,
    check_geometry_maps,
    hookimpl,
    images,
)

if TYPE_CHECKING:
    import torch

TINY = "tiny"
"""``model = "tiny"``: a random-weight ControlNet built from the job's own UNet
(:func:`jointdiff.models.tiny.tiny_controlnet`), for tests, smoke runs and benchmarks."""
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SPEC_FIELDS = ("model", "image", "conditioning_scale", "guidance_start", "guidance_end",
               "preprocess", "canny_low", "canny_high")


def _check_model(value: Any) -> Any:
    """A hub id, a local diffusers ControlNet folder, ``"tiny"`` or a diffusers ControlNet
    object (``ControlNetModel``, ``SD3ControlNetModel``, ``FluxControlNetModel``, ...);
    anything else is refused before a model loads. Whether it fits the job's model family is
    checked when the model is known."""
    torch = sys.modules.get("torch")  # a ControlNet object means torch is imported; a name needs none
    if torch is not None and isinstance(value, torch.nn.Module) and type(value).__name__.endswith("ControlNetModel"):
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"unknown ControlNet type {type(value).__name__}: model must be a hub id, a local "
            "diffusers folder or a diffusers ControlNet model"
        )
    path = Path(value).expanduser()
    if path.is_dir():
        config = path / "config.json"
        kind = json.loads(config.read_text(encoding="utf-8")).get("_class_name") if config.is_file() else None
        if not str(kind).endswith("ControlNetModel"):
            raise ValueError(f"unknown ControlNet type {kind!r} in {value!r}: expected a diffusers ControlNet folder")
    elif value.startswith((".", "/", "~")) or path.suffix in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"{value!r} is not a diffusers ControlNetModel folder (single-file checkpoints are not supported)")
    return value


def geometry_map_name(value: Any) -> str | None:
    """The name of a geometry map (``"depth"``, ``"normal"``, ``"mask"``, ...) when ``image``
    is one: a bare name (a Python identifier, no suffix or folder) that is not a file here."""
    if isinstance(value, str) and value.isidentifier() and not Path(value).is_file():
        return value
    return None


def check_image(value: Any) -> Any:
    """Paths must exist now (before any model loads); arrays and images are checked in setup.
    A geometry map name is checked against the job's geometry (:meth:`geometry_maps`)."""
    if geometry_map_name(value) is not None:
        return value
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, (str, Path)) and not Path(item).expanduser().is_file():
            raise ValueError(f"no such image file {str(item)!r}")
    return value


class ControlImageOptions(PluginOptions):
    """A control image and its preprocessing: what a ControlNet (:class:`ControlSpec`) and a
    channel-concatenated control model (``flux_control``) both take."""

    image: Any = pydantic.Field(
        description="condition at the canvas's pixel size: path, PIL, array, tensor; a list per sheet; "
        "or the name of a map the geometry renders per window ('depth', 'normal', 'mask')"
    )
    preprocess: Literal["none", "canny"] = pydantic.Field("none", description="'canny': edges of a photo (OpenCV)")
    canny_low: int = pydantic.Field(100, ge=0, description="Canny hysteresis low threshold")
    canny_high: int = pydantic.Field(200, ge=0, description="Canny hysteresis high threshold")

    @pydantic.field_validator("image")
    @classmethod
    def _image_exists(cls, value: Any) -> Any:
        return check_image(value)

    @pydantic.model_validator(mode="after")
    def _canny_ordered(self):
        if self.canny_low > self.canny_high:
            raise ValueError(f"canny_low ({self.canny_low}) must not exceed canny_high ({self.canny_high})")
        return self


class ControlSpec(ControlImageOptions):
    """One ControlNet with its condition (a table of ``controls``)."""

    model: Any = pydantic.Field(description="hub id, local ControlNet folder, 'tiny', or a diffusers ControlNet model")
    conditioning_scale: float = pydantic.Field(1.0, ge=0.0, description="residual scale (diffusers' controlnet_conditioning_scale)")
    guidance_start: float = pydantic.Field(0.0, ge=0.0, le=1.0, description="first fraction of the steps with control")
    guidance_end: float = pydantic.Field(1.0, ge=0.0, le=1.0, description="last fraction of the steps with control")

    @pydantic.field_validator("model")
    @classmethod
    def _known_model(cls, value: Any) -> Any:
        return _check_model(value)

    @pydantic.model_validator(mode="after")
    def _ordered(self):
        if self.guidance_start >= self.guidance_end:
            raise ValueError(f"guidance_start ({self.guidance_start}) must be below guidance_end ({self.guidance_end})")
        return self


@dataclass
class _Control:
    """A loaded ControlNet with its condition on the device: ``(S, C, H_px, W_px)`` for the
    canvas, cut per window by the geometry, or ``(N, C, h_px, w_px)`` per window
    (``per_window``: a geometry map) whose rows are taken as they are."""

    model: Any
    image: torch.Tensor
    spec: ControlSpec
    per_window: bool = False

    def windows(self, geometry, window_ids: Sequence[int]) -> torch.Tensor:
        """The condition of the windows ``window_ids``, ``(B, C, h_px, w_px)``."""
        if self.per_window:
            return self.image[list(window_ids)]
        return geometry.extract(self.image, window_ids)

    def scale_at(self, step: int | None, count: int) -> float:
        """diffusers' ``controlnet_keep`` times the conditioning scale (``step`` None: active)."""
        s = self.spec
        if step is not None and (step / count < s.guidance_start or (step + 1) / count > s.guidance_end):
            return 0.0
        return s.conditioning_scale


class ControlNetConditioner(Conditioner):
    """ControlNet residuals for every window batch, from a canvas-sized condition.

    One ControlNet: give its fields directly (``model``, ``image``, ...). Several: a
    ``controls`` list of tables, each with its own model, image, scale and step range; their
    residuals add up. A job takes one ``controlnet`` conditioner (the UNet has one residual
    input), which is why several ControlNets are a list and not several conditioners.
    """

    name = "controlnet"
    one_per_job = True  # the model has one residual input: several ControlNets go in controls = [...]

    class Options(PluginOptions):
        controls: list[ControlSpec] = pydantic.Field(min_length=1, description="the ControlNets and their conditions")

        @pydantic.model_validator(mode="before")
        @classmethod
        def _single_control(cls, data: Any) -> Any:
            if not isinstance(data, dict):
                return data
            fields = {k: data[k] for k in SPEC_FIELDS if k in data}
            if fields and "controls" in data:
                raise ValueError(f"give either controls = [...] or the fields of one control ({sorted(fields)}), not both")
            if fields:
                return {**{k: v for k, v in data.items() if k not in fields}, "controls": [fields]}
            return data

    def __repr__(self) -> str:
        def short(value: Any) -> str:
            if isinstance(value, (list, tuple)):
                return f"[{', '.join(short(v) for v in value)}]"
            return repr(value) if isinstance(value, (str, int, float)) else f"<{type(value).__name__}>"

        rows = [", ".join(f"{k}={short(getattr(c, k))}" for k in SPEC_FIELDS) for c in self.options.controls]
        return f"{type(self).__name__}(controls=[{'; '.join(rows)}])"

    def geometry_maps(self) -> tuple[str, ...]:
        """The geometry maps the controls take as their image (``image = "depth"``, ...)."""
        names = (geometry_map_name(spec.image) for spec in self.options.controls)
        return tuple(name for name in names if name is not None)

    # -- setup ---------------------------------------------------------------------------

    def setup(self, context) -> None:
        """Load every ControlNet, check it against the model, put its condition (in the form
        the family's ControlNet takes: pixels or latents) on the device."""
        import torch

        check_geometry_maps(context.geometry, [self])  # before any ControlNet loads
        self._controls = []
        for index, spec in enumerate(self.options.controls):
            where = f"controlnet: controls[{index}]" if len(self.options.controls) > 1 else "controlnet"
            model = load_controlnet(spec.model, context, where)
            channels = model.config.get("conditioning_channels", None) or 3
            per_window = geometry_map_name(spec.image) is not None
            if per_window:
                image = load_window_maps(spec, context, channels, where).to(context.device)
            else:
                image = load_condition(spec, context, channels, where).to(context.device)
            with torch.no_grad():  # per sheet, or per window for a geometry map
                condition = torch.cat([context.model.control_condition(model, item[None]) for item in image])
            self._controls.append(_Control(model, condition.to(model.dtype), spec, per_window))

    # -- the loop ------------------------------------------------------------------------

    def model_kwargs(
        self, model_input: torch.Tensor, timestep: torch.Tensor, embeds, window_ids: Sequence[int], context,
        guidance_scale: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The ControlNet residuals (the family's keyword arguments of the model call, e.g.
        ``down_block_additional_residuals`` / ``mid_block_additional_residual`` for a UNet)
        for the rows ``[branch 0: windows..., branch 1: windows...]`` of the model input,
        with the model call's embedded guidance and window offsets.

        Gradients flow through the ControlNet (a synchronizer's x̂0 depends on it)."""
        step, count = step_index(timestep, context)
        branches = len(model_input) // len(window_ids)
        model = context.model
        total: dict[str, Any] | None = None
        for control in self._controls:
            scale = control.scale_at(step, count)
            if scale == 0.0:
                continue  # diffusers multiplies the residuals by 0; skipping adds the same nothing
            condition = control.windows(context.geometry, window_ids)
            if model.controlnet_positive_only and branches == 2:
                rows = list(range(len(window_ids), 2 * len(window_ids)))
                residuals = model.controlnet_kwargs(
                    control.model, model_input[rows], timestep, embeds.select(rows), condition, scale,
                    guidance_scale=_rows_of(guidance_scale, rows), offsets=_rows_of(offsets, rows),
                )
                residuals = _repeat_rows(residuals, 2)
            else:
                condition = condition.repeat(branches, 1, 1, 1)
                residuals = model.controlnet_kwargs(
                    control.model, model_input, timestep, embeds, condition, scale,
                    guidance_scale=guidance_scale, offsets=offsets,
                )
            total = residuals if total is None else model.sum_control(total, residuals)
        return total or {}


def _rows_of(tensor: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


def _repeat_rows(value: Any, times: int) -> Any:
    """Every tensor in a nest of dicts and lists repeated ``times`` along its batch dimension."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.repeat(times, *([1] * (value.ndim - 1)))
    if isinstance(value, dict):
        return {key: _repeat_rows(item, times) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_repeat_rows(item, times) for item in value)
    return value


def step_index(timestep: torch.Tensor, context) -> tuple[int | None, int]:
    """``(i, n)``: the position of ``timestep`` in the job's schedule and its length (the
    engine enumerates ``scheduler.timesteps``); ``i`` is None outside the schedule."""
    import torch

    timesteps = context.model.scheduler.timesteps
    if timesteps is None:
        return None, 1
    found = (timesteps.cpu() == torch.as_tensor(timestep).cpu()).nonzero()
    return (int(found[0, 0]) if len(found) else None), len(timesteps)


# ----------------------------------------------------------------------------- loading


def load_controlnet(model: Any, context, where: str = "controlnet") -> Any:
    """A diffusers ControlNet of the job's model family on the job's device and dtype,
    checked against the family's ControlNet classes and, for UNets, the UNet's config."""
    import diffusers
    import numpy as np
    import torch

    family = context.model
    if not family.controlnet_classes:
        raise ConfigError(f"{where}: model family {family.name!r} has no ControlNet support")
    if isinstance(model, torch.nn.Module):
        controlnet = model
    elif model == TINY:
        controlnet = family.tiny_controlnet()
    else:
        loader = getattr(diffusers, family.controlnet_classes[0])
        try:
            controlnet = loader.from_pretrained(model, torch_dtype=context.dtype)
        except Exception as error:
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            raise ModelLoadError(f"{where}: could not load ControlNet {model!r} ({reason})") from error
    if type(controlnet).__name__ not in family.controlnet_classes:
        raise ConfigError(
            f"{where}: a {type(controlnet).__name__} does not fit model family {family.name!r} "
            f"(it takes {', '.join(family.controlnet_classes)})"
        )
    denoiser = family.denoiser_module
    keys = ("cross_attention_dim", "block_out_channels", "down_block_types")
    for key in keys if family.is_inpainting else ("in_channels", *keys):  # inpainting UNets take more channels
        ours, theirs = controlnet.config.get(key), denoiser.config.get(key)
        if ours is not None and theirs is not None and list(np.atleast_1d(ours)) != list(np.atleast_1d(theirs)):
            raise ConfigError(
                f"{where}: the ControlNet's {key} = {ours!r} does not fit the model ({theirs!r}); "
                "use a ControlNet trained for this model"
            )
    controlnet = controlnet.to(context.device)
    if controlnet.dtype != context.dtype:
        controlnet = controlnet.to(dtype=context.dtype)
    return controlnet.eval().requires_grad_(False)


def load_condition(spec: ControlSpec, context, channels: int, where: str = "controlnet") -> torch.Tensor:
    """The condition ``(S, channels, H_px, W_px)`` in [0, 1] on the CPU, preprocessed and
    checked against the canvas: ``S`` sheets of ``f·H × f·W`` pixels."""
    import torch

    geometry = context.geometry
    sheets, height, width = geometry.canvas_shape_latent
    scale = geometry.latent_scale
    items = spec.image if isinstance(spec.image, (list, tuple)) else [spec.image]
    if isinstance(spec.image, torch.Tensor) and spec.image.ndim == 4:
        items = list(spec.image)
    if len(items) != sheets:
        raise ConfigError(f"{where}: image has {len(items)} sheet(s), the canvas of {geometry.name!r} has {sheets}")
    tensors = [_as_tensor(item, spec, where) for item in items]
    for tensor in tensors:
        if tuple(tensor.shape[-2:]) != (scale * height, scale * width):
            raise ConfigError(
                f"{where}: image is {tensor.shape[-1]}×{tensor.shape[-2]} px (w×h) but the canvas is "
                f"{scale * width}×{scale * height} px; the condition must have the canvas's pixel size"
            )
        if tensor.shape[0] not in (1, channels):
            raise ConfigError(
                f"{where}: image has {tensor.shape[0]} channels; the ControlNet takes {channels} (or 1, repeated)"
            )
    return torch.stack([t.expand(channels, -1, -1) for t in tensors])


def load_window_maps(spec: ControlSpec, context, channels: int, where: str = "controlnet") -> torch.Tensor:
    """The geometry's map ``spec.image`` of every window, ``(N, channels, f·h, f·w)`` in [0, 1]
    on the CPU, at the VAE factor ``f`` (the pixels a ControlNet takes), one-channel maps
    repeated; Canny edges of each window's map with ``preprocess = "canny"``."""
    import torch

    geometry = context.geometry
    name, scale = spec.image, geometry.latent_scale
    maps = [geometry.window_map(name, [index], scale).detach().float().cpu() for index in range(geometry.num_windows)]
    maps = torch.cat(maps)
    if maps.shape[1] not in (1, channels):
        raise ConfigError(
            f"{where}: the geometry's {name!r} map has {maps.shape[1]} channels; "
            f"the model takes {channels} (or 1, repeated)"
        )
    if spec.preprocess == "canny":
        maps = torch.stack([canny(window, spec.canny_low, spec.canny_high) for window in maps])
    return maps.expand(-1, channels, -1, -1).contiguous()


def _as_tensor(item: Any, spec: ControlSpec, where: str) -> torch.Tensor:
    """``(C, H, W)`` float in [0, 1] from a path, PIL image, ``(H, W[, C])`` array or
    ``(C, H, W)`` tensor; Canny edges when ``spec.preprocess == "canny"``."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(item, (str, Path)):
        item = images.open_image_file(item, f"{where}: image")
    if isinstance(item, Image.Image):
        # Grey stays one channel (repeated later): a 16-bit depth map keeps its precision.
        grey = item.mode in ("1", "L", "LA", "I", "F") or item.mode.startswith("I;16")
        tensor = images.load_tensor(item, "L" if grey else "RGB", f"{where}: image")
    elif isinstance(item, np.ndarray):
        array = images.unit_array(item)
        tensor = torch.from_numpy(array)
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor
    elif isinstance(item, torch.Tensor):
        tensor = item.detach().float().cpu()
        tensor = tensor[None] if tensor.ndim == 2 else tensor
    else:
        raise ConfigError(f"{where}: image must be a path, PIL image, array or tensor, got {type(item).__name__}")
    if tensor.ndim != 3:
        raise ConfigError(f"{where}: image must be (C, H, W) per sheet, got shape {tuple(tensor.shape)}")
    if spec.preprocess == "canny":
        tensor = canny(tensor, spec.canny_low, spec.canny_high)
    return tensor


def canny(image: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Canny edges (OpenCV) of an image ``(C, H, W)`` in [0, 1] (C = 1 or 3): ``(1, H, W)``
    with values 0 or 1, as the edge maps ControlNet's Canny model was trained on."""
    import cv2
    import numpy as np
    import torch

    if image.shape[0] not in (1, 3):
        raise ConfigError(f"canny preprocessing takes a 1- or 3-channel image, got {image.shape[0]} channels")
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    gray = pixels[..., 0] if pixels.shape[-1] == 1 else cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(np.ascontiguousarray(gray), low, high)
    return torch.from_numpy(edges.astype(np.float32) / 255.0)[None]


@hookimpl
def register_conditioners(register):
    register(ControlNetConditioner)

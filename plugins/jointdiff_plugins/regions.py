"""The ``regions`` conditioner: region prompts with layout masks (MultiDiffusion, Sec. 4.2).

MultiDiffusion's region-based generation (Bar-Tal, Yariv, Lipman & Dekel, ICML 2023): a
background prompt and prompts ``p_r`` with masks ``M_r`` on the canvas. Every window is
denoised once per prompt, and the results are fused with the prompts' masks (Eq. 5 with
``W_i`` = the mask cut out by the geometry), so each canvas cell follows the prompts that
cover it.

Background weight: ``M_0 = max(0, 1 − Σ_r M_r)``, as MultiDiffusion's own ``region_based.py``
(``bg_mask = 1 - sum(fg_masks)``, negatives clipped to 0). The background prompt fills what the
regions leave; where regions overlap they are averaged with their own weights; a cell fully
inside a region ignores the background.

Bootstrapping (MultiDiffusion Sec. 4.2, "fidelity to tight masks"): for the first
``bootstrap_steps`` steps, each region branch sees its window's latents only inside its mask;
outside, they are replaced by a constant-colour image noised to the current step,
``x ← M_r ⊙ x + (1 − M_r) ⊙ add_noise(E(c), ε, t)``. As in the reference code, ``E(c)`` is the
VAE encoding (posterior sample, times the scaling factor) of a window-sized image of one
uniformly random RGB colour, drawn per window and step from a bank of ``bootstrap_steps``
colours; ``ε`` is the canvas's *initial* noise cut out for the window; the background prompt
is never bootstrapped. Its reference default is 20 of 50 steps.

Randomness is keyed (:meth:`~jointdiff.core.context.JobContext.generator_for`): the bank from
``("regions/colours",)`` and ``("regions/colour_latent", k)``, the pick of window ``w`` of
branch ``r`` at step ``i`` from ``("regions/bootstrap", i, w, r)``. Results therefore do not
depend on batching, batch order, ranks or resume, and the conditioner keeps no state
between steps.

Masks are defined on the canvas in pixel coordinates (origin top-left, ``x`` right, ``y``
down): rectangles ``[left, top, right, bottom]`` (right/bottom exclusive), polygons of
``[x, y]`` points, or grayscale mask images of the canvas's size. They are drawn at pixel
resolution, optionally feathered (Gaussian blur, standard deviation ``feather_px``), then
area-averaged to latent resolution (:mod:`jointdiff.core.masks`). On a 360° canvas (an
equirectangular sheet) the coordinates are equirectangular pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic

from jointdiff.core.masks import area_downsample, feather, image_mask, polygon_mask, rectangle_mask
from jointdiff.plugin import Conditioner, ConfigError, PluginOptions, Prompt, encode_text, hookimpl

if TYPE_CHECKING:
    import torch


class Region(PluginOptions):
    """One region: a prompt and exactly one of ``rect``, ``polygon`` or ``mask``."""

    prompt: str
    rect: list[float] | None = pydantic.Field(None, description="[left, top, right, bottom] in canvas pixels")
    polygon: list[list[float]] | None = pydantic.Field(None, description="[[x, y], ...] in canvas pixels")
    mask: Any = pydantic.Field(None, description="grayscale mask image of the canvas's size (path, PIL, array, tensor)")
    sheet: int = pydantic.Field(0, ge=0, description="canvas sheet the shape is drawn on")
    negative_prompt: str | None = pydantic.Field(None, description="default: the conditioner's negative_prompt")
    guidance_scale: float | None = pydantic.Field(None, ge=0.0, allow_inf_nan=False, description="default: the conditioner's")
    feather_px: float | None = pydantic.Field(None, ge=0.0, description="default: the conditioner's feather_px")

    @pydantic.model_validator(mode="after")
    def _one_shape(self):
        given = [k for k in ("rect", "polygon", "mask") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"region {self.prompt!r} needs exactly one of rect, polygon or mask, got {given or 'none'}")
        if self.rect is not None and len(self.rect) != 4:
            raise ValueError(f"region {self.prompt!r}: rect = {self.rect!r} must be [left, top, right, bottom]")
        if isinstance(self.mask, (str, Path)) and not Path(self.mask).expanduser().is_file():
            raise ValueError(f"region {self.prompt!r}: no such mask image {str(self.mask)!r}")
        return self


class RegionsConditioner(Conditioner):
    """A background prompt plus region prompts with masks; provides the job's prompt.

    From Python, ``masks=[...]`` with ``region_prompts=[...]`` (one prompt per mask) is a
    shorthand for ``regions=[{"prompt": p, "mask": m}, ...]``.
    """

    name = "regions"

    class Options(PluginOptions):
        prompt: str = pydantic.Field(description="background prompt")
        negative_prompt: str | None = pydantic.Field(None, description="default of every region (classifier-free guidance families only)")
        guidance_scale: float | None = pydantic.Field(
            None, ge=0.0, allow_inf_nan=False, description="None: the model family's default"
        )
        regions: list[Region] = pydantic.Field(min_length=1)
        feather_px: float = pydantic.Field(0.0, ge=0.0, description="Gaussian blur of every mask, in pixels")
        bootstrap_steps: int = pydantic.Field(0, ge=0, description="MultiDiffusion's bootstrapping steps (reference: 20 of 50)")

        @pydantic.model_validator(mode="before")
        @classmethod
        def _masks_with_prompts(cls, data: Any) -> Any:
            if not isinstance(data, dict) or ("masks" not in data and "region_prompts" not in data):
                return data
            data = dict(data)
            masks, prompts = list(data.pop("masks", [])), list(data.pop("region_prompts", []))
            if len(masks) != len(prompts):
                raise ValueError(f"masks and region_prompts must pair up: {len(masks)} masks, {len(prompts)} prompts")
            data["regions"] = list(data.get("regions", [])) + [{"prompt": p, "mask": m} for p, m in zip(prompts, masks)]
            return data

    @classmethod
    def example_options(cls) -> dict:
        """Small options for tests: one rectangle region on any canvas of 128 px or more."""
        return {"prompt": "a lake", "regions": [{"prompt": "a red boat", "rect": [0, 0, 128, 128]}], "bootstrap_steps": 1}

    def __repr__(self) -> str:
        fields = self.options.model_dump(exclude={"regions"})
        regions = [r.prompt for r in self.options.regions]
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())}, regions={regions!r})"

    # -- setup ---------------------------------------------------------------------------

    def setup(self, context) -> None:
        """Rasterize the masks, encode the prompts, prepare bootstrapping backgrounds."""
        masks = self.canvas_masks(context.geometry)
        self._prompt = self._encode(context, masks)
        self._masks = masks.to(context.device)
        self._backgrounds = self._bootstrap_backgrounds(context) if self.options.bootstrap_steps else None

    def check_canvas(self, geometry) -> None:
        """Every region on the canvas, checked before the model loads: its sheet exists, its
        rect or polygon is well formed and overlaps the canvas, its mask image has the
        canvas's size (read from the file's header, upright by its EXIF orientation)."""
        sheets, height, width = geometry.canvas_shape_latent
        h_px, w_px = geometry.latent_scale * height, geometry.latent_scale * width
        for index, region in enumerate(self.options.regions):
            where = f"regions: regions[{index}] ({region.prompt!r})"
            if region.sheet >= sheets:
                raise ConfigError(f"{where}: sheet = {region.sheet} but the canvas has {sheets} sheet(s)")
            if region.mask is not None:
                _check_mask_size(region.mask, (h_px, w_px), f"{where}: mask")
                continue
            kind, value = ("rect", region.rect) if region.rect is not None else ("polygon", region.polygon)
            box = _bounding_box(kind, value, f"{where}: {kind}")
            if box[2] <= 0 or box[3] <= 0 or box[0] >= w_px or box[1] >= h_px:
                raise ConfigError(
                    f"{where}: {kind} = {value!r} lies outside the {w_px}×{h_px} px canvas (x 0..{w_px}, y 0..{h_px})"
                )

    def canvas_masks(self, geometry) -> torch.Tensor:
        """Fusion weights ``(P, S, 1, H, W)`` at latent resolution: background first, then
        every region in order (see the module docstring for the background)."""
        import torch

        sheets, height, width = geometry.canvas_shape_latent
        scale = geometry.latent_scale
        regions = []
        for index, region in enumerate(self.options.regions):
            where = f"regions: regions[{index}] ({region.prompt!r})"
            if region.sheet >= sheets:
                raise ConfigError(f"{where}: sheet = {region.sheet} but the canvas has {sheets} sheet(s)")
            pixels = torch.zeros(sheets, 1, scale * height, scale * width)
            pixels[region.sheet, 0] = self._draw(region, (scale * height, scale * width), where)
            radius = self.options.feather_px if region.feather_px is None else region.feather_px
            latent = area_downsample(feather(pixels, radius), scale)
            if not bool((latent > 0).any()):
                raise ConfigError(f"{where}: the mask is empty on the {scale * width}×{scale * height} px canvas")
            regions.append(latent)
        foreground = torch.stack(regions)
        background = (1.0 - foreground.sum(0, keepdim=True)).clamp(min=0.0)
        return torch.cat([background, foreground])

    @staticmethod
    def _draw(region: Region, size_px: tuple[int, int], where: str) -> torch.Tensor:
        if region.rect is not None:
            return rectangle_mask(size_px, region.rect, f"{where}: rect")
        if region.polygon is not None:
            return polygon_mask(size_px, region.polygon, f"{where}: polygon")
        return image_mask(region.mask, size_px, f"{where}: mask")

    def _encode(self, context, masks: torch.Tensor) -> Prompt:
        """Embeddings (``P`` rows) of the background and region prompts, encoded as the
        ``text`` conditioner does; one guidance scale per prompt."""
        import torch

        o = self.options
        default = context.model.default_guidance_scale if o.guidance_scale is None else o.guidance_scale
        texts = [o.prompt] + [r.prompt for r in o.regions]
        negatives = [o.negative_prompt] + [o.negative_prompt if r.negative_prompt is None else r.negative_prompt for r in o.regions]
        scales = [default] + [default if r.guidance_scale is None else r.guidance_scale for r in o.regions]
        given = None if o.guidance_scale is None and all(r.guidance_scale is None for r in o.regions) else max(scales)
        embeds, uncond, _ = encode_text(context, texts, negatives, given, "regions")
        scale = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, dtype=torch.float32)
        return Prompt(embeds, uncond, scale, region_masks=masks)

    def prompt(self) -> Prompt:
        return self._prompt

    # -- bootstrapping -------------------------------------------------------------------

    def _bootstrap_backgrounds(self, context) -> torch.Tensor:
        """``(n, C, h, w)`` latents of ``n = bootstrap_steps`` window-sized images of one
        uniformly random colour each (VAE posterior samples in the model's latent space), float32."""
        import torch

        h, w = context.geometry.window_size_latent
        scale = context.geometry.latent_scale
        colours = torch.rand(self.options.bootstrap_steps, 3, 1, 1, generator=context.generator_for("regions/colours"))
        latents = []
        with torch.no_grad():
            for k, colour in enumerate(colours):
                image = (colour * 2.0 - 1.0).expand(1, 3, scale * h, scale * w).to(context.device)
                posterior = context.generator_for("regions/colour_latent", k)
                latents.append(context.model.encode(image, generator=posterior).float())
        return torch.cat(latents)

    def modify_latents(self, latents: torch.Tensor, batch, state) -> torch.Tensor:
        """Bootstrapping of region branches during the first ``bootstrap_steps`` steps
        (module docstring); other branches and steps are returned unchanged."""
        import torch

        region = batch.prompt_index
        if not region or self._backgrounds is None or state.step_index >= self.options.bootstrap_steps:
            return latents
        if state.initial_noise is None:
            raise ConfigError("regions: bootstrapping needs the job's initial noise (JobContext.initial_noise, set by the engine)")
        geometry = state.context.geometry
        ids = batch.window_ids
        mask = geometry.extract(self._masks[region], ids)
        noise = geometry.extract(state.initial_noise.to(latents.device, torch.float32), ids)
        count = len(self._backgrounds)
        picks = [int(torch.randint(count, (1,), generator=state.generator_for("regions/bootstrap", state.step_index, w, region)))
                 for w in ids]
        background = self._backgrounds[picks]
        noisy = state.context.model.add_noise(background, noise, torch.as_tensor(state.timestep), batch.scheduler)
        return latents * mask + noisy.to(latents.dtype) * (1.0 - mask)


def _bounding_box(kind: str, value: Any, what: str) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` in pixels of a rect or polygon; ConfigError when it is
    not well formed (as :func:`~jointdiff.core.masks.rectangle_mask` and ``polygon_mask``)."""
    if kind == "rect":
        left, top, right, bottom = (float(v) for v in value)
        if not (right > left and bottom > top):
            raise ConfigError(f"{what} = {list(value)!r} must be [left, top, right, bottom] with right > left and bottom > top")
        return left, top, right, bottom
    points = list(value)
    if len(points) < 3 or any(len(point) != 2 for point in points):
        raise ConfigError(f"{what} = {points!r} must be a list of at least three [x, y] points")
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _check_mask_size(mask: Any, size_px: tuple[int, int], what: str) -> None:
    """A mask file's size against the canvas sheet's ``(h, w)``, from its header (in-memory
    masks are checked when they are drawn)."""
    if not isinstance(mask, (str, Path)):
        return
    from PIL import Image

    with Image.open(Path(mask).expanduser()) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # stored turned by 90°: shown swapped
            width, height = height, width
    if (height, width) != tuple(size_px):
        raise ConfigError(
            f"{what} is {width}×{height} px (w×h) but the canvas sheet is {size_px[1]}×{size_px[0]} px; "
            "masks are drawn on the canvas"
        )


@hookimpl
def register_conditioners(register):
    register(RegionsConditioner)

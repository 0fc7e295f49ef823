"""The built-in model families, registered exactly as a third-party family package would."""

from __future__ import annotations

from jointdiff.models.families.flux import Flux
from jointdiff.models.families.flux2 import Flux2
from jointdiff.models.families.qwenimage import QwenImage
from jointdiff.models.families.sd import StableDiffusion
from jointdiff.models.families.sd3 import SD3Family
from jointdiff.models.families.sdxl import StableDiffusionXL
from jointdiff.plugin import hookimpl


@hookimpl
def register_families(register):
    for family in (StableDiffusion, StableDiffusionXL, SD3Family, Flux, Flux2, QwenImage):
        register(family)

"""The built-in model families, registered exactly as a third-party family package would."""

from __future__ import annotations

from jointdiff import hookimpl


@hookimpl
def register_families(register):
    from jointdiff.families.flux import Flux
    from jointdiff.families.flux2 import Flux2
    from jointdiff.families.qwenimage import QwenImage
    from jointdiff.families.sd import StableDiffusion
    from jointdiff.families.sd3 import SD3Family
    from jointdiff.families.sdxl import StableDiffusionXL

    for family in (StableDiffusion, StableDiffusionXL, SD3Family, Flux, Flux2, QwenImage):
        register(family)

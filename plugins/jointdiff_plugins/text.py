"""The ``text`` conditioner: one prompt for every window, with classifier-free guidance."""

from __future__ import annotations

import pydantic

from jointdiff.plugin import Conditioner, PluginOptions, Prompt, encode_text, hookimpl


class TextConditioner(Conditioner):
    """Prompt and negative prompt encoded once with the model family's text encoders.

    Guidance is the family's: classifier-free guidance (Ho & Salimans 2022) with diffusers'
    convention (no unconditional branch when ``guidance_scale <= 1``; an empty negative prompt
    when none is given), the embedded guidance of distilled models (FLUX.1-dev), or none.
    """

    name = "text"

    class Options(PluginOptions):
        prompt: str = pydantic.Field(description="what every window shows")
        negative_prompt: str | None = pydantic.Field(
            None, description="what to steer away from (classifier-free guidance families only)"
        )
        guidance_scale: float | None = pydantic.Field(
            None, ge=0.0, allow_inf_nan=False, description="None: the model family's default (7.5 for SD, 3.5 for FLUX.1-dev)"
        )

    @classmethod
    def example_options(cls) -> dict:
        """Options for tests (``prompt`` has no default)."""
        return {"prompt": "a photo of a city"}

    def setup(self, context) -> None:
        o = self.options
        embeds, negative, scale = encode_text(context, [o.prompt], [o.negative_prompt], o.guidance_scale, "text")
        self._prompt = Prompt(embeds, negative, scale)

    def prompt(self) -> Prompt:
        return self._prompt


@hookimpl
def register_conditioners(register):
    register(TextConditioner)

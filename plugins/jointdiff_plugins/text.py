"""The ``text`` conditioner: one prompt for every window, with classifier-free guidance."""

from __future__ import annotations

import pydantic
import torch

from jointdiff import hookimpl
from jointdiff.conditioner import Conditioner, Prompt
from jointdiff.options import PluginOptions


class TextConditioner(Conditioner):
    """Prompt and negative prompt encoded once with the pipeline's text encoder.

    Guidance follows classifier-free guidance (Ho & Salimans 2022) with diffusers' convention:
    no unconditional branch when ``guidance_scale <= 1``.
    """

    name = "text"

    class Options(PluginOptions):
        prompt: str
        negative_prompt: str = ""
        guidance_scale: float = pydantic.Field(7.5, ge=0.0)

    @classmethod
    def example_options(cls) -> dict:
        """Options for tests (``prompt`` has no default)."""
        return {"prompt": "a photo of a city", "negative_prompt": "blurry", "guidance_scale": 7.5}

    def setup(self, context) -> None:
        pipeline = context.pipeline
        guided = self.options.guidance_scale > 1.0
        with torch.no_grad():
            embeds, negative = pipeline.encode_prompt(
                self.options.prompt,
                context.device,
                1,
                guided,
                negative_prompt=self.options.negative_prompt if guided else None,
            )
        if negative is None:
            negative = torch.zeros_like(embeds)
        self._prompt = Prompt(embeds, negative, self.options.guidance_scale)

    def prompt(self) -> Prompt:
        return self._prompt


@hookimpl
def register_conditioners(register):
    register(TextConditioner)

"""The conformance kit calls plugins exactly as the engine does, and its docs state every
rule it checks: a geometry that reads ``latent.scale_factor`` in ``setup`` (as
docs/plugins.md says it may) passes every geometry check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jointdiff.core.family import LatentFormat
from jointdiff.plugin import GeometryConformance
from jointdiff_plugins.tiles import StripGeometry

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


class DocumentedStrip(StripGeometry):
    """A strip that uses the documented setup argument: the model's LatentFormat."""

    name = "documented-strip"

    def setup(self, latent: LatentFormat) -> None:
        self.pixels_per_cell = latent.scale_factor  # AttributeError for an int
        super().setup(latent)


class TestDocumentedSetupConforms(GeometryConformance):
    def make_geometry(self):
        return DocumentedStrip(length_px=512, window_latent=16, stride_latent=8)


class TestAnotherLatentFormat(GeometryConformance):
    """``latent`` checks a geometry against another model's format (16 channels, 2×2 patches)."""

    latent = LatentFormat(channels=16, scale_factor=8, patch=2, native_window=64)

    def make_geometry(self):
        return DocumentedStrip(length_px=512, window_latent=16, stride_latent=8)

    def test_setup_received_the_format(self):
        geometry = self._geometry()
        assert geometry.latent_format is self.latent and geometry.pixels_per_cell == 8


def test_the_old_latent_scale_attribute_still_sets_the_factor():
    class Old(GeometryConformance):
        latent_scale = 4

        def make_geometry(self):
            return DocumentedStrip(length_px=512, window_latent=16, stride_latent=8)

    geometry = Old()._geometry()
    assert geometry.latent_scale == 4 and geometry.pixels_per_cell == 4


# Every geometry check of the kit → the words of docs/plugins.md that state its rule.
DOCUMENTED_RULES = {
    "test_geometry_shapes": "output shapes and dtypes",
    "test_geometry_batching": "batching that does not change results",
    "test_geometry_insert_is_linear": "`insert` adding linearly",
    "test_geometry_covers_canvas": "every canvas cell covered by a window",
    "test_geometry_round_trip": "extract → insert round trip",
    "test_geometry_origins": "window origins that are where the crops are",
    "test_geometry_pixel_scale": "at `k` times the latent resolution",
    "test_geometry_decode": "`decode` aligned with the canvas",
    "test_geometry_options_round_trip": "options that survive a round trip through a job file",
}


def test_docs_state_every_geometry_rule_the_kit_checks():
    checks = {name for name in dir(GeometryConformance) if name.startswith("test_")}
    assert checks == set(DOCUMENTED_RULES), "a kit check without its rule in docs/plugins.md (or a stale entry)"
    text = re.sub(r"\s+", " ", DOCS.read_text(encoding="utf-8"))
    missing = [name for name, words in DOCUMENTED_RULES.items() if words not in text]
    assert not missing, f"docs/plugins.md does not state the rules of {missing}"


@pytest.mark.parametrize("rule", ["k·h, k·w", "constant canvas gives constant windows", "`latent.scale_factor`"])
def test_the_pixel_scale_rule_is_spelled_out(rule):
    assert rule in re.sub(r"\s+", " ", DOCS.read_text(encoding="utf-8"))

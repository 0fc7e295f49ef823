"""Model families: the model layer (see :mod:`jointdiff.core.family`)."""

from __future__ import annotations

from jointdiff.core.family import SD_LATENT, Embeddings, GuidanceMode, LatentFormat, ModelFamily

__all__ = ["SD_LATENT", "Embeddings", "GuidanceMode", "LatentFormat", "ModelFamily"]

"""Model families: the model layer (see :mod:`jointdiff.families.base`)."""

from __future__ import annotations

from .base import SD_LATENT, Embeddings, GuidanceMode, LatentFormat, ModelFamily

__all__ = ["SD_LATENT", "Embeddings", "GuidanceMode", "LatentFormat", "ModelFamily"]

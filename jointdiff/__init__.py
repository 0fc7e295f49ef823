"""jointdiff: images of any size and shape from fixed-size diffusion models.

Joint diffusion over overlapping windows (MultiDiffusion, Bar-Tal et al. 2023) with
SyncDiffusion's synchronization (Lee et al., NeurIPS 2023), built from plugins:
geometries, conditioners and synchronizers.
"""

from __future__ import annotations

from .hookspecs import PLUGIN_API_VERSION, hookimpl

__version__ = "0.1.0"

__all__ = [
    "PLUGIN_API_VERSION",
    "hookimpl",
    "JointDiffusion",
    "JointResult",
    "StopJob",
    "InitImage",
    "Job",
    "run_job",
    "load_pipeline",
    "load_model",
    "create",
    "__version__",
]


def __getattr__(name: str):
    # Lazy imports keep `import jointdiff` (and plugin modules importing hookimpl) light.
    if name in ("JointDiffusion", "JointResult", "StopJob"):
        from . import engine

        return getattr(engine, name)
    if name == "InitImage":
        from .init_image import InitImage

        return InitImage
    if name in ("Job", "run_job"):
        from . import job

        return getattr(job, name)
    if name in ("load_pipeline", "load_model"):
        from . import models

        return getattr(models, name)
    if name == "create":
        from .plugins import create

        return create
    raise AttributeError(f"module 'jointdiff' has no attribute {name!r}")

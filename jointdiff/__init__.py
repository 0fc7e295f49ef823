"""jointdiff: images of any size and shape from fixed-size diffusion models.

Joint diffusion over overlapping windows (MultiDiffusion, Bar-Tal et al. 2023) with
SyncDiffusion's synchronization (Lee et al., NeurIPS 2023), built from plugins:
geometries, conditioners and synchronizers.
"""

from __future__ import annotations

from jointdiff.core.hookspecs import PLUGIN_API_VERSION, hookimpl
from jointdiff.utils import moved
from jointdiff.utils.version import VERSION as __version__

moved.install()  # old module paths (jointdiff.geometry, ...) keep working for one release

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
        # lazy: `import jointdiff` stays light (plugins import it for hookimpl)
        from jointdiff.engine import loop as engine

        return getattr(engine, name)
    if name == "InitImage":
        # lazy: `import jointdiff` stays light (plugins import it for hookimpl)
        from jointdiff.image.init_image import InitImage

        return InitImage
    if name in ("Job", "run_job"):
        # lazy: `import jointdiff` stays light (plugins import it for hookimpl)
        from jointdiff.jobs import spec as job

        return getattr(job, name)
    if name in ("load_pipeline", "load_model"):
        # lazy: `import jointdiff` stays light (plugins import it for hookimpl)
        from jointdiff.models import loading as models

        return getattr(models, name)
    if name == "create":
        # lazy: `import jointdiff` stays light (plugins import it for hookimpl)
        from jointdiff.core.registry import create

        return create
    raise AttributeError(f"module 'jointdiff' has no attribute {name!r}")

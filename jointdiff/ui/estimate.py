"""The "Estimate" button: a job's windows, model calls, FLOPs and memory before it runs.

The engine announces its estimate (:mod:`jointdiff.cost.budget`, FLOPs counted on the loaded
networks by :mod:`jointdiff.cost.profiling`) just before it denoises; the announcement stops
the job, as ``jointdiff run --estimate`` does, so nothing is denoised or written.
"""

from __future__ import annotations

from typing import Any

from jointdiff.cost import budget, profiling
from jointdiff.jobs.spec import Job, run_job
from jointdiff.utils.errors import ConfigError


class _Announced(Exception):
    """Ends the job once its estimate is known."""


def estimate_text(job: Job) -> str:
    """The estimate's summary lines, and why the engine's limits would refuse the job, if they would."""
    shown: list[str] = []

    def show(estimate: Any, engine: Any) -> None:
        shown.append(estimate.summary())
        try:
            budget.check(estimate, engine.max_megapixels, engine.memory_limit_gb, engine.geometry.name)
        except ConfigError as refused:
            shown.append(f"this job would be refused: {refused}")
        raise _Announced

    try:
        with profiling.session(on_estimate=show, count=False):
            run_job(job, progress=False)
    except _Announced:
        return "\n".join(shown)
    raise ConfigError("the engine ran without announcing its estimate")

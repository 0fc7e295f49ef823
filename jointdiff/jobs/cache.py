"""A bounded cache of loaded models, so that many jobs on one model load it once.

Loading is most of the cost of a small job: a FLUX-sized model takes minutes to read and
place, its run on a small canvas seconds. :class:`ModelCache` keeps the last few loaded models
(least recently used first out) keyed by everything in a job's ``[model]`` table that changes
the loaded object: id, family, scheduler, prediction type, dtype, device, config, LoRAs (path,
scale, name), offloading and positional ids. Jobs that differ only in prompt, seed, canvas
or plugins share one entry.

Example (from a script)::

    from jointdiff.jobs.cache import ModelCache
    from jointdiff.jobs.spec import Job, run_job

    cache = ModelCache(max_models=1)
    for prompt in ["a desert sky", "a stormy sky"]:
        job = Job.from_dict({..., "conditioners": [{"name": "text", "prompt": prompt}]})
        result = run_job(job, model=cache.get(job.model))   # loaded once
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections import OrderedDict
from typing import Any

from jointdiff.jobs.spec import ModelSpec, load_job_model
from jointdiff.utils.errors import ConfigError


def model_key(spec: ModelSpec) -> str:
    """The cache key of a ``[model]`` table: stable JSON of the fields that change the loaded
    model (all of them: a different device or LoRA scale is a different object)."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


class ModelCache:
    """The ``max_models`` most recently used loaded models (:class:`~jointdiff.core.family.ModelFamily`).

    :meth:`get` returns the cached model of a ``[model]`` table or loads it (evicting the
    least recently used one first, so at most ``max_models`` are held at once). ``loads``
    counts loads, ``load_seconds`` their time; ``last_load_s`` is the time of the load the
    latest :meth:`get` did (0.0 when it was cached). Thread-safe."""

    def __init__(self, max_models: int = 1) -> None:
        if not isinstance(max_models, int) or max_models < 1:
            raise ConfigError(f"--max-models (max_models) = {max_models!r}: must be a positive integer")
        self.max_models = max_models
        self.loads = 0
        self.load_seconds = 0.0
        self.last_load_s = 0.0
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, spec: ModelSpec) -> bool:
        return model_key(spec) in self._models

    def keys(self) -> list[str]:
        """The keys held, least recently used first."""
        return list(self._models)

    def get(self, spec: ModelSpec) -> Any:
        """The loaded model of ``spec``, loaded now when it is not held."""
        key = model_key(spec)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self.last_load_s = 0.0
                return self._models[key]
            while len(self._models) >= self.max_models:
                self._evict()
            start = time.perf_counter()
            model = load_job_model(spec)
            self.last_load_s = time.perf_counter() - start
            self.loads += 1
            self.load_seconds += self.last_load_s
            self._models[key] = model
            return model

    def clear(self) -> None:
        """Drop every model and give their memory back (also after an out-of-memory error)."""
        with self._lock:
            while self._models:
                self._evict()

    def _evict(self) -> None:
        self._models.popitem(last=False)
        release_memory()


def release_memory() -> None:
    """Collect dropped models and return the accelerator's cached blocks to the driver."""
    gc.collect()
    try:
        import torch  # lazy: only to empty CUDA's cache; importing jointdiff.jobs.cache must not need torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

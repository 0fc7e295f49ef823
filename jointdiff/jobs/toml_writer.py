"""Writing a :class:`~jointdiff.jobs.spec.Job` back as TOML (the reader is :mod:`tomllib`)."""

from __future__ import annotations

import json
import math
from typing import Any

TABLE_ORDER = ("model", "geometry", "synchronizer")


def toml_value(value: Any) -> str:
    """One TOML value: strings, booleans, numbers, arrays and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} as TOML")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _table(header: str, table: dict[str, Any]) -> list[str]:
    return [header] + [f"{_key(k)} = {toml_value(v)}" for k, v in table.items() if v is not None] + [""]


def dump_job_toml(job: Any) -> str:
    """The job as a TOML document that :meth:`Job.from_toml` reads back to an equal job."""
    data = job.to_dict()
    lines = [f"{_key(k)} = {toml_value(v)}" for k, v in data.items() if k not in (*TABLE_ORDER, "conditioners")]
    lines.append("")
    for name in TABLE_ORDER:
        lines += _table(f"[{name}]", data[name])
    for conditioner in data["conditioners"]:
        lines += _table("[[conditioners]]", conditioner)
    return "\n".join(lines)

"""The jobs of a batch: job files, folders of them, and manifests (CSV or JSONL tables of
overrides on a base job, one row per output), all validated before anything runs.

A manifest's columns name what a row changes in the base job: a top-level field (``seed``,
``steps``, ``output``), a dotted path into a table (``geometry.width_px``, ``model.id``,
``conditioners.0.prompt``), or a shorthand for the base job's prompt conditioner
(``prompt``, ``negative_prompt``, ``guidance_scale``). An empty CSV cell keeps the base job's
value. A CSV cell is text where the base job's value is text (a prompt stays a prompt even
when it reads ``1984``) and a TOML value elsewhere (``8``, ``true``, ``[1, 2]``). Relative
paths in a row are relative to the manifest's folder. A row without ``output`` writes to the
base job's output name with the row number (``sky.png`` → ``sky-0007.png``).

Every problem (unknown column, bad value, two jobs writing one output) is collected, each
with its file and row, and raised together as :class:`BadJobsError` before any model loads.
"""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from jointdiff.jobs.spec import Job, read_job_file, resolve_paths, tomllib
from jointdiff.utils.errors import ConfigError

JOB_SUFFIXES = (".toml", ".json")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
PROMPT_SHORTHANDS = ("prompt", "negative_prompt", "guidance_scale")


@dataclass
class BatchJob:
    """One job of a batch: the validated job and where it came from (``sky.toml``,
    ``prompts.csv row 3``), for the summary and for messages."""

    job: Job
    where: str


class BadJobsError(ConfigError):
    """Some jobs of a batch are invalid; ``problems`` names every one (file and row)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(f"{len(self.problems)} bad job(s), nothing was run: {self.problems[0]}{more}")


def collect_jobs(sources: Sequence[str | Path], base: str | Path | None = None) -> list[BatchJob]:
    """The jobs of ``sources`` (job files, folders of ``.toml``/``.json`` jobs, manifests on
    the ``base`` job), in order; :class:`BadJobsError` naming every bad file and row."""
    if not sources:
        raise ConfigError("batch: no SOURCE given; name job files, folders of them, or a manifest (.csv, .jsonl)")
    problems: list[str] = []
    jobs: list[BatchJob] = []
    base_data = _read_base(base, sources, problems)
    for source in sources:
        for path in _expand(Path(source), problems):
            if path.suffix.lower() in MANIFEST_SUFFIXES:
                if base_data is not None:
                    jobs.extend(_manifest_jobs(path, base_data, problems))
            else:
                jobs.extend(_file_job(path, problems))
    problems.extend(_duplicate_outputs(jobs))  # outputs and checkpoints
    if problems:
        raise BadJobsError(problems)
    return jobs


def _read_base(base: str | Path | None, sources: Sequence[str | Path], problems: list[str]) -> dict[str, Any] | None:
    """The base job's raw data (its paths resolved), or None (a problem when a manifest needs it)."""
    manifests = [str(s) for s in sources if Path(s).suffix.lower() in MANIFEST_SUFFIXES]
    if base is None:
        if manifests:
            problems.append(f"manifest {manifests[0]!r} needs a base job (--base JOB.toml): its rows are changes to it")
        return None
    try:
        data, folder = read_job_file(base)
        return resolve_paths(data, folder) if folder is not None else data
    except ConfigError as error:
        problems.append(f"base job: {error}")
        return None


def _expand(path: Path, problems: list[str]) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in JOB_SUFFIXES)
        if not found:
            problems.append(f"folder {str(path)!r} holds no job files (.toml, .json)")
        return found
    if not path.exists():
        problems.append(f"{str(path)!r} does not exist")
        return []
    return [path]


def _file_job(path: Path, problems: list[str]) -> list[BatchJob]:
    try:
        return [BatchJob(Job.from_file(path), str(path))]
    except ConfigError as error:
        problems.append(f"{path}: {error}")
        return []


# -- manifests ---------------------------------------------------------------------------


def _manifest_jobs(path: Path, base: dict[str, Any], problems: list[str]) -> list[BatchJob]:
    """One job per row of a manifest; every bad row and column is added to ``problems``."""
    try:
        rows = list(_read_rows(path))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        problems.append(f"manifest {str(path)!r} cannot be read: {error}")
        return []
    if not rows:
        problems.append(f"manifest {str(path)!r} has no rows")
        return []
    width = len(str(len(rows)))
    jobs: list[BatchJob] = []
    for number, (line, row) in enumerate(rows, start=1):
        where = f"{path} row {number} (line {line})"
        if isinstance(row, str):
            problems.append(f"{where}: {row}")
            continue
        try:
            data = apply_row(base, row, from_text=path.suffix.lower() == ".csv")
            if "output" not in row:
                data["output"] = _numbered(data.get("output", "jointdiff.png"), number, width)
            jobs.append(BatchJob(Job.from_dict(resolve_paths(data, path.parent)), where))
        except ConfigError as error:
            problems.append(f"{where}: {error}")
    return jobs


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """``(line, row)`` of a CSV (empty cells left out) or JSONL file; a row that is no
    object comes as the text of its problem."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                extra = row.pop(None, None)  # type: ignore[call-overload]
                if extra:
                    yield reader.line_num, f"{len(extra)} more cells than columns: {extra!r}"
                    continue
                yield reader.line_num, {k.strip(): v for k, v in row.items() if k and v not in (None, "")}
        return
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                yield line, f"invalid JSON: {error}"
                continue
            yield line, row if isinstance(row, dict) else f"a row must be a JSON object, got {type(row).__name__}"


def apply_row(base: dict[str, Any], row: dict[str, Any], *, from_text: bool = False) -> dict[str, Any]:
    """A copy of the raw ``base`` job with a manifest ``row`` applied (columns as described in
    the module docstring; ``from_text``: values are CSV text, typed as described there)."""
    data = copy.deepcopy(base)
    for column, value in row.items():
        keys = _column_keys(column, data)
        parent = _parent(data, keys, column)
        if from_text:
            value = _typed(value, parent.get(keys[-1]) if isinstance(parent, dict) else None)
        if isinstance(parent, list):
            parent[int(keys[-1])] = value
        else:
            parent[keys[-1]] = value
    return data


def _column_keys(column: str, data: dict[str, Any]) -> list[str]:
    if column in PROMPT_SHORTHANDS:
        return ["conditioners", str(_prompt_index(data)), column]
    keys = column.split(".")
    if keys[0] not in Job.model_fields or not all(keys):
        known = sorted([*Job.model_fields, *PROMPT_SHORTHANDS])
        raise ConfigError(
            f"column {column!r} is unknown: give a job field ({', '.join(known)}) or a dotted path such as "
            "'geometry.width_px'"
        )
    return keys


def _prompt_index(data: dict[str, Any]) -> int:
    """The base job's conditioner that holds the prompt (the first with a ``prompt``)."""
    tables = data.get("conditioners") or []
    return next((i for i, t in enumerate(tables) if isinstance(t, dict) and "prompt" in t), 0)


def _parent(data: dict[str, Any], keys: list[str], column: str) -> Any:
    """The table (or list) that holds the last key of ``keys``, creating missing tables."""
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(_no_entry(column, keys[:depth], len(node), key))
            node = node[int(key)]
        elif isinstance(node, dict):
            node = node.setdefault(key, {})
        else:
            raise ConfigError(f"column {column!r}: {'.'.join(keys[:depth])} is a value, not a table")
    if isinstance(node, list) and (not keys[-1].isdigit() or int(keys[-1]) >= len(node)):
        raise ConfigError(_no_entry(column, keys[:-1], len(node), keys[-1]))
    return node


def _no_entry(column: str, keys: list[str], count: int, key: str) -> str:
    return f"column {column!r}: the base job's {'.'.join(keys)} has {count} entries, no {key!r}"


def _typed(text: Any, current: Any) -> Any:
    """A CSV cell: text where the base job holds text, else a TOML value (else text)."""
    if not isinstance(text, str) or isinstance(current, str):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _numbered(output: str, number: int, width: int) -> str:
    path = Path(output)
    return str(path.with_name(f"{path.stem}-{number:0{max(width, 4)}d}{path.suffix}"))


def _duplicate_outputs(jobs: list[BatchJob]) -> list[str]:
    """Two jobs writing one output, or one ``[checkpoint] path`` (each would overwrite the
    other's, or resume from it): each after the first named with the first."""
    problems = []
    for name, path_of in (("output", lambda job: job.output),
                          ("checkpoint path", lambda job: job.checkpoint.path if job.checkpoint is not None else None)):
        first: dict[str, str] = {}
        for item in jobs:
            path = path_of(item.job)
            if path is None:
                continue
            key = str(Path(path).absolute())
            if key in first:
                problems.append(f"{item.where}: {name} {path!r} is also the {name} of {first[key]}")
            else:
                first[key] = item.where
    return problems

"""Forms generated from option schemas: every field of a pydantic options model (a plugin's
``Options``, the job's own fields) becomes one input, typed, bounded and described by the
schema, so a third-party plugin gets its form with no UI code.

A field is a checkbox (``bool``), a number (``int``/``float``, with the schema's bounds), a
dropdown (``Literal``), a text box (``str``), or a JSON text box for anything else (lists,
nested option tables, tuples). Values equal to the default are left out of the job, so a
composed job carries what the user set, like a hand-written TOML file.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from jointdiff.core.options import type_name
from jointdiff.utils.errors import ConfigError

Kind = Literal["bool", "int", "float", "choice", "text", "json"]


@dataclass(frozen=True)
class FormField:
    """One input: ``section`` (``"model"``, ``"job"``, ``"geometry/strip"``, ...) and the
    option ``name``, its input ``kind``, default, choices and bounds, and a one-line ``info``."""

    section: str
    name: str
    kind: Kind
    default: Any
    required: bool
    optional: bool
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    info: str = ""

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


def fields_of(section: str, options: type[pydantic.BaseModel], exclude: frozenset[str] = frozenset()) -> list[FormField]:
    """The form fields of an options model, in its field order."""
    return [_field(section, name, info) for name, info in options.model_fields.items() if name not in exclude]


def _field(section: str, name: str, info: Any) -> FormField:
    annotation, optional = _unwrap_optional(info.annotation)
    required = info.is_required()
    default = None if required else info.get_default(call_default_factory=True)
    kind, choices = _kind(annotation)
    minimum = maximum = None
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = []
    for item in info.metadata:
        minimum = _first(getattr(item, "ge", None), getattr(item, "gt", None), minimum)
        maximum = _first(getattr(item, "le", None), getattr(item, "lt", None), maximum)
        parts += [f"{symbol} {getattr(item, attr)}" for attr, symbol in symbols.items() if getattr(item, attr, None) is not None]
    bounds = ", ".join(parts)
    described = type_name(info.annotation) + (f" [{bounds}]" if bounds else "") + (f": {info.description}" if info.description else "")
    return FormField(section, name, kind, default, required, optional, choices, minimum, maximum, described)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` → ``(X, True)``; other annotations unchanged."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return annotation, False


def _kind(annotation: Any) -> tuple[Kind, tuple[Any, ...]]:
    if typing.get_origin(annotation) is Literal:
        return "choice", typing.get_args(annotation)
    simple: dict[Any, Kind] = {bool: "bool", int: "int", float: "float", str: "text"}
    return simple.get(annotation, "json"), ()


# -- values ----------------------------------------------------------------------------------


def initial(field: FormField) -> Any:
    """What the input shows before anyone types: the default, as the input holds it."""
    return shown(field, field.default)


def shown(field: FormField, value: Any) -> Any:
    """A job value as the input holds it (JSON text for structured fields, ``""`` for None)."""
    if field.kind == "json":
        return "" if value is None else json.dumps(value)
    if field.kind in ("text", "choice") and value is None:
        return ""
    if field.kind in ("int", "float") and field.optional:  # a text box: empty is None
        return "" if value is None else str(value)
    return value


def read(field: FormField, raw: Any) -> tuple[bool, Any]:
    """``(include, value)`` for the job from what the input holds: left out when empty and
    optional, or equal to the default. Bad JSON is a ConfigError naming the option."""
    if raw is None or (isinstance(raw, str) and raw.strip() == "" and field.kind != "text"):
        return field.required, None  # a required field left empty goes to validation, which names it
    if field.kind == "text" and raw == "" and (field.optional or field.default is None):
        return False, None
    value = raw
    if field.kind == "json":
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{owner_label(field)}: option {field.name!r} = {raw!r}: not valid JSON ({error.msg})") from None
    elif field.kind in ("int", "float") and isinstance(raw, str):
        value = _number(field, raw)
    elif field.kind == "int" and isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    if not field.required and _same(value, field.default):
        return False, None
    return True, value


def _number(field: FormField, raw: str) -> int | float | str:
    """The number typed into an optional number's text box (left as typed when it is none:
    validation then names the option)."""
    try:
        return int(raw) if field.kind == "int" else float(raw)
    except ValueError:
        return raw.strip()


def _same(value: Any, default: Any) -> bool:
    try:
        return json.dumps(value, sort_keys=True) == json.dumps(default, sort_keys=True, default=str)
    except TypeError:
        return False


def owner_label(field: FormField) -> str:
    """How errors name the owner of a field: ``'strip'`` for a plugin, ``job`` otherwise."""
    return repr(field.section.split("/", 1)[1]) if "/" in field.section else "job"


# -- errors ----------------------------------------------------------------------------------

_OWNER = re.compile(r"^'?(?P<owner>[\w.-]+)'?: (?:option|unknown option) '(?P<option>[\w.\[\]]+)'")


def error_section(message: str, sections: list[str]) -> str | None:
    """The form section a one-line ConfigError belongs to (``"geometry/strip"``, ``"model"``,
    ``"job"``), from the owner and option it names; None when it names neither."""
    match = _OWNER.match(message)
    if match is None:
        owner = message.split(":", 1)[0].strip("'")
        return next((s for s in sections if s.endswith(f"/{owner}")), None)
    owner, option = match["owner"], match["option"]
    if owner == "job":
        return "model" if option.startswith("model.") else "job"
    return next((s for s in sections if s.endswith(f"/{owner}")), None)

"""Validated plugin options.

Every plugin class has a nested ``Options`` model (pydantic, unknown keys forbidden). A job's
options are validated before any model loads, and errors name the plugin, the option and the
value.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, ClassVar, Mapping

import pydantic

from jointdiff.utils.errors import ConfigError


class PluginOptions(pydantic.BaseModel):
    """Base of every plugin's ``Options``: frozen, no unknown keys, validated on assignment."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


MAX_ECHO_CHARS = 120
"""A bad value is echoed up to this many characters (a whole table is not echoed)."""


def format_validation_error(owner: str, error: pydantic.ValidationError) -> str:
    """One line per problem: ``owner: option 'x' = value: reason``. A missing option is
    said as missing (its input, the whole enclosing table, is not echoed), and an unknown
    option close to a missing one is named as its likely misspelling."""
    items = error.errors()
    missing = [".".join(str(part) for part in item["loc"]) for item in items if item["type"] == "missing"]
    lines = []
    for item in items:
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            guess = difflib.get_close_matches(where, missing, n=1)
            lines.append(f"{owner}: unknown option {where!r}" + (f" (did you mean {guess[0]!r}?)" if guess else ""))
        elif item["type"] == "missing":
            lines.append(f"{owner}: option {where!r} is missing")
        elif not where:  # a check across options: the message names them itself
            lines.append(f"{owner}: {item['msg'].removeprefix('Value error, ')}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            shown = repr(item.get("input"))
            shown = shown if len(shown) <= MAX_ECHO_CHARS else shown[: MAX_ECHO_CHARS - 1] + "…"
            lines.append(f"{owner}: option {where!r} = {shown}: {message}")
    return "; ".join(lines)


def describe_options(options_cls: type[pydantic.BaseModel], indent: str = "") -> list[str]:
    """Human-readable lines, for ``jointdiff plugins`` and errors: ``name: type = default``,
    then the allowed values (bounds, choices) and the field's description; the fields of
    nested option tables (e.g. ``regions``, ``controls``) follow, indented."""
    out = []
    for name, field in options_cls.model_fields.items():
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        line = f"{indent}{name}: {type_name(field.annotation)} = {default}"
        bounds = _bounds(field)
        if bounds:
            line += f"  [{bounds}]"
        if field.description:
            line += f"  -- {field.description}"
        out.append(line)
        for nested in _nested_models(field.annotation):
            out += describe_options(nested, indent + "    ")
    return out


def type_name(annotation: Any) -> str:
    """``int``, ``str | None``, ``list[Region]``, ``'horizontal' | 'vertical'`` (a Literal's
    choices), ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{', '.join(type_name(a) for a in args)}]" if args else base
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _bounds(field: Any) -> str:
    names = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
    parts = []
    for item in field.metadata:
        for attr, symbol in names.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
        if getattr(item, "allow_inf_nan", None) is False:
            parts.append("finite")
    return ", ".join(parts)


def _nested_models(annotation: Any) -> list[type[pydantic.BaseModel]]:
    """Option tables inside ``annotation`` (``list[Region]``, ``ControlSpec | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    found: list[type[pydantic.BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += [m for m in _nested_models(arg) if m not in found]
    return found


class Configurable:
    """Mixin for plugin classes: ``name``, ``Options`` and construction from a mapping."""

    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.options = self.validate_options(options, **kwargs)

    @classmethod
    def validate_options(
        cls, options: PluginOptions | Mapping[str, Any] | None = None, **kwargs: Any
    ) -> PluginOptions:
        if isinstance(options, cls.Options):
            if kwargs:
                options = options.model_copy(update=kwargs)
                return cls.Options.model_validate(options.model_dump())
            return options
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(f"{cls.name}: options must be a mapping or {cls.Options.__name__}, got {options!r}")
        merged = {**dict(options or {}), **kwargs}
        try:
            return cls.Options.model_validate(merged)
        except pydantic.ValidationError as error:
            known = ", ".join(cls.Options.model_fields) or "none"
            raise ConfigError(
                f"{format_validation_error(repr(cls.name), error)} (options of {cls.name!r}: {known})"
            ) from None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items())
        return f"{type(self).__name__}({fields})"

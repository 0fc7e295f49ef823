"""Validated plugin options.

Every plugin class has a nested ``Options`` model (pydantic, unknown keys forbidden). A job's
options are validated before any model loads, and errors name the plugin, the option and the
value.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import pydantic

from .errors import ConfigError


class PluginOptions(pydantic.BaseModel):
    """Base of every plugin's ``Options``: frozen, no unknown keys, validated on assignment."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def format_validation_error(owner: str, error: pydantic.ValidationError) -> str:
    """One line per problem: ``owner: option 'x' = value: reason``."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{owner}: unknown option {where!r}")
        elif not where:  # a check across options: the message names them itself
            lines.append(f"{owner}: {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{owner}: option {where!r} = {item.get('input')!r}: {item['msg']}")
    return "; ".join(lines)


def describe_options(options_cls: type[PluginOptions]) -> list[str]:
    """Human-readable ``name: type = default`` lines, for ``jointdiff plugins`` and errors."""
    out = []
    for name, field in options_cls.model_fields.items():
        annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
        annotation = annotation.replace("typing.", "")
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        out.append(f"{name}: {annotation} = {default}")
    return out


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

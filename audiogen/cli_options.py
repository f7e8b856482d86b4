"""Command-line options generated from option dataclasses, so a flag's type, default and help are declared once.

A command's options are the fields of its dataclass (`SamplingParams`, `RenderOptions`, `TrainOptions` ...):
`add_options` turns each field into a flag (`top_k` -> `--top-k`) with the field's type, default and
`metadata={"help": ..., "choices": ...}`; `from_args` builds the dataclass back from the parsed namespace. A
default changed in the dataclass is the CLI's default too: nothing to keep in sync.

Supported field types: str, int, float (optionally `| None`), bool (`--x/--no-x`), `dict[str, ...]`
(repeatable `--x KEY=VALUE`), `list[str]`/`tuple[str, ...]` (repeatable `--x VALUE`). Any other type must be
excluded by the caller, which then declares that option itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per init field of dataclass `cls` (except `exclude`); `defaults` overrides field defaults."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude or not field.init:
            continue
        default = _default(field) if field.name not in (defaults or {}) else defaults[field.name]  # type: ignore[index]
        kind = _strip_optional(hints[field.name])
        help_text = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        flag = flag_name(field.name)
        origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif kind in (str, int, float):
            shown = "" if default is None or default == "" else f" (default: {default})"
            parser.add_argument(flag, dest=field.name, type=kind, default=default, choices=choices,
                                help=help_text + shown)
        elif origin is dict:
            parser.add_argument(flag, dest=field.name, action="append", default=None, metavar="KEY=VALUE",
                                type=_key_value, help=help_text + " (repeatable)")
        elif origin in (list, tuple):
            parser.add_argument(flag, dest=field.name, action="append", default=None, choices=choices,
                                help=help_text + " (repeatable)")
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: type {kind} has no command-line form; exclude it and "
                            f"declare the option by hand")


def from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """An instance of `cls` from the parsed flags `add_options` declared (`values` set the excluded fields)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in values or not field.init or not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        kind = typing.get_origin(_strip_optional(hints[field.name]))
        if kind is dict:
            value = dict(value or []) if value is not None else _default(field)
        elif kind in (list, tuple):
            value = kind(value) if value is not None else _default(field)
        values[field.name] = value
    return cls(**values)


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _strip_optional(kind: Any) -> Any:
    """`X | None` -> X (an unset flag is the field's default)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(kind) if member is not type(None)]
        if len(members) == 1:
            return members[0]
    return kind


def _key_value(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value), with true/false read as booleans (fsspec options such as anon=true)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, {"true": True, "false": False}.get(value.lower(), value)

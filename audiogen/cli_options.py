"""Command-line options generated from option dataclasses, so a flag's type, default and help are declared once.

A command's options are the fields of its dataclass (`SamplingParams`, `RenderOptions`, `TrainOptions` ...):
`add_options` turns each field into a flag (`top_k` -> `--top-k`) with the field's type, default and
`metadata={"help": ..., "choices": ...}`; `from_args` builds the dataclass back from the parsed namespace. A
default changed in the dataclass is the CLI's default too: nothing to keep in sync.

Supported field types: str, int, float (optionally `| None`), bool (`--x/--no-x`), `dict[str, ...]`
(repeatable `--x KEY=VALUE`, values read as JSON when they parse: `dim=256`, `anon=true`), `list[str]` /
`tuple[str, ...]` (repeatable `--x VALUE`) and fixed tuples such as `tuple[float, float]` (`--x A B`). Repeatable
options take the singular flag (`storage_options` -> `--storage-option KEY=VALUE`) unless another field has that name.
A field without a default is a required flag. Any other type must be excluded by the caller, which then
declares that option itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def flag_name(field: str, repeatable: bool = False, taken: tuple[str, ...] = ()) -> str:
    """`--field-name`; repeatable options take the singular (`--storage-option`) unless another field has it."""
    name = field[:-1] if repeatable and field.endswith("s") and field[:-1] not in taken else field
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per init field of dataclass `cls` (except `exclude`); `defaults` overrides field defaults."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    names = tuple(field.name for field in dataclasses.fields(cls))
    for field in dataclasses.fields(cls):
        if field.name in exclude or not field.init:
            continue
        default = defaults[field.name] if field.name in defaults else _default(field)
        required = field.name not in defaults and _default(field) is dataclasses.MISSING
        kind = _strip_optional(hints[field.name])
        origin, members = typing.get_origin(kind), typing.get_args(kind)
        common = {"dest": field.name, "help": field.metadata.get("help", ""),
                  "choices": field.metadata.get("choices")}
        if kind is bool:
            parser.add_argument(flag_name(field.name), action=argparse.BooleanOptionalAction, default=default,
                                **common)
        elif kind in (str, int, float):
            if default is not None and default is not dataclasses.MISSING and default != "":
                common["help"] += f" (default: {default})"
            parser.add_argument(flag_name(field.name), type=kind, required=required,
                                default=None if required else default, **common)
        elif origin is tuple and members and Ellipsis not in members and len(set(members)) == 1:
            parser.add_argument(flag_name(field.name), type=members[0], nargs=len(members), default=default,
                                metavar=field.name.upper(), **common)
        elif origin is dict:
            common["help"] += " (repeatable)"
            parser.add_argument(flag_name(field.name, True, names), action="append", default=None, metavar="KEY=VALUE",
                                type=_key_value, **common)
        elif origin in (list, tuple):
            common["help"] += " (repeatable)"
            parser.add_argument(flag_name(field.name, True, names), action="append", default=None, **common)
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
        if kind in (dict, list, tuple):
            value = kind(value) if value is not None else _default(field)
        values[field.name] = value
    return cls(**values)


def _default(field: dataclasses.Field[Any]) -> Any:
    """The field's default (a fresh one from its factory), or `dataclasses.MISSING` when it has none."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _strip_optional(kind: Any) -> Any:
    """`X | None` -> X (an unset flag is the field's default)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(kind) if member is not type(None)]
        if len(members) == 1:
            return members[0]
    return kind


def _key_value(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value); the value is JSON when it parses (256, 0.5, true, [1, 2]), else the text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value

"""Option dataclass fields that carry their own help and choices, so a command line is generated from the dataclass
instead of re-declaring it (re-declared defaults drift). Convention: `field(metadata={"help": str, "choices":
tuple})`, `choices` only where the value is one of a fixed set; `option()` writes it, `check_choices` enforces it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import MISSING, field, fields
from typing import Any

from audiogen.errors import InvalidConfigError


def option(default: Any = MISSING, *, help: str, choices: Iterable[Any] | None = None,
           factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with `metadata={"help": help[, "choices": tuple(choices)]}`; no default when neither
    `default` nor `factory` (a `default_factory`, for mutable defaults) is given."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, default_factory=factory or MISSING, metadata=metadata)


def check_choices(instance: Any, prefix: str = "") -> None:
    """Raise `InvalidConfigError` for the first field whose value (when not None) is not among its choices."""
    for item in fields(instance):
        choices, value = item.metadata.get("choices"), getattr(instance, item.name)
        if choices is not None and value is not None and value not in choices:
            raise InvalidConfigError(f"{prefix}{item.name}", f"must be one of {', '.join(map(str, choices))} "
                                                            f"(got {value!r})")

"""Field checks shared by every entry point (sampling parameters, requests, manifest rows, HTTP bodies).

Each returns the normalised value (numpy scalars become Python numbers, integral floats become ints) or raises
`InvalidRequestError` naming the field and the limit, so a bad value reads the same wherever it came in.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from audiogen.errors import InvalidRequestError


def check_number(name: str, value: Any, *, low: float, high: float, limit: str, low_open: bool = False
                 ) -> float | None:
    """A finite number in [low, high] (or (low, high] with `low_open`); None passes through."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidRequestError(name, f"must be a number, got {type(value).__name__}", limit=limit, value=value)
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high or (low_open and number == low):
        raise InvalidRequestError(name, f"{number!r} is out of range", limit=limit, value=number)
    return number


def check_integer(name: str, value: Any, *, low: int, high: int | None, limit: str | None = None) -> int | None:
    """An integer in [low, high] (no upper bound when `high` is None); integral floats are accepted."""
    if value is None:
        return None
    limit = limit or (f"{low}..{high}" if high is not None else f">= {low}")
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidRequestError(name, f"must be an integer, got {value!r}", limit=limit, value=value)
    number = int(value)
    if number < low or (high is not None and number > high):
        raise InvalidRequestError(name, f"{number} is out of range", limit=limit, value=number)
    return number


def check_text(name: str, value: Any, *, required: bool = False) -> str | None:
    """A string without NUL characters; `required` also refuses None and blank text."""
    if value is None:
        if required:
            raise InvalidRequestError(name, "is missing", limit="a non-empty string")
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(name, f"must be a string, got {type(value).__name__}", value=value)
    if "\x00" in value:
        raise InvalidRequestError(name, "contains a NUL character", value=value[:80])
    if required and not value.strip():
        raise InvalidRequestError(name, "is empty", limit="at least one non-space character")
    return value

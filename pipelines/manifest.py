"""Render manifests: read prompt rows, fill job defaults, give every row a stable id and seed, find bad rows.

A manifest is Parquet with a required `prompt` column and optional `id`, `negative_prompt`, `duration`, `seed`,
`temperature`, `top_k`, `top_p`, `guidance_scale` columns. Planning happens on the driver, streaming the files
with pyarrow (a few hundred bytes per row: a million rows plan in seconds), so that row order is known: among
rows sharing an id the first in manifest order (files sorted by name) is rendered and the others are errors.

Only what needs no model is checked here (types, NaN, empty text, non-positive durations); limits that depend
on the model (maximum duration, codebook size) are checked by the engine in the render actors, with the same
error messages as everywhere else.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from pipelines.storage import arrow_filesystem, expand_inputs

PARAMETERS = ("negative_prompt", "duration", "seed", "temperature", "top_k", "top_p", "guidance_scale")
MAX_SEED = 2**63 - 1
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class RowDefaults:
    """Job-level values for columns a manifest leaves out (None = the model's own default)."""

    negative_prompt: str | None = None
    duration: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float | None = None


@dataclass
class PlannedRow:
    id: str
    file_stem: str
    prompt: str
    negative_prompt: str | None
    duration: float | None
    seed: int
    temperature: float | None
    top_k: int | None
    top_p: float | None
    guidance_scale: float | None
    row: int  # position in the manifest (files in name order)
    source: str


@dataclass
class RowError:
    id: str
    row: int
    source: str
    field: str
    error_type: str
    message: str
    row_json: str


class RowInvalid(ValueError):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def stable_id(prompt: str, params: dict[str, Any]) -> str:
    """Id from the generation parameters (job defaults applied), so a rerun maps rows to the same clips."""
    canonical = json.dumps({"prompt": prompt, **params}, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return "r-" + hashlib.sha256(canonical.encode()).hexdigest()[:20]


def seed_for(row_id: str) -> int:
    """The seed of a row without one: derived from its id, so a rerun renders the same clip."""
    return int(hashlib.sha256(f"seed:{row_id}".encode()).hexdigest()[:16], 16) & MAX_SEED


def file_stem(row_id: str) -> str:
    """A file name no id can escape the output prefix with: [A-Za-z0-9._-] only, no leading dot, bounded
    length; ids that had to be changed get a hash suffix so two ids never share a file."""
    safe = _SAFE.sub("_", row_id)[:100].lstrip(".") or "_"
    if safe != row_id:
        safe = f"{safe}-{hashlib.sha256(row_id.encode()).hexdigest()[:12]}"
    return safe


def _text(field: str, value: Any, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise RowInvalid(field, "is missing")
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RowInvalid(field, f"is not valid UTF-8 text ({error.reason} at byte {error.start})") from None
    if not isinstance(value, str):
        raise RowInvalid(field, f"must be text, got {type(value).__name__}")
    if "\x00" in value:
        raise RowInvalid(field, "contains a NUL character")
    if required and not value.strip():
        raise RowInvalid(field, "is empty (a non-empty description is required)")
    return value


def _number(field: str, value: Any, *, integer: bool = False, positive: bool = False) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowInvalid(field, f"must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RowInvalid(field, f"is {value} (must be finite)")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise RowInvalid(field, f"must be an integer, got {value}")
        value = int(value)
    if positive and value <= 0:
        raise RowInvalid(field, f"is {value} (must be > 0)")
    return value


def _row_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowInvalid("id", f"must be text or an integer, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise RowInvalid("id", "is empty")
    return text


def normalize_row(values: dict[str, Any], defaults: RowDefaults) -> tuple[str | None, dict[str, Any]]:
    """(given id or None, prompt + parameters with defaults applied); raises RowInvalid naming the field."""
    given_id = _row_id(values.get("id"))
    prompt = _text("prompt", values.get("prompt"), required=True)
    params: dict[str, Any] = {
        "negative_prompt": _text("negative_prompt", values.get("negative_prompt"), required=False),
        "duration": _number("duration", values.get("duration"), positive=True),
        "seed": _number("seed", values.get("seed"), integer=True),
        "temperature": _number("temperature", values.get("temperature")),
        "top_k": _number("top_k", values.get("top_k"), integer=True),
        "top_p": _number("top_p", values.get("top_p")),
        "guidance_scale": _number("guidance_scale", values.get("guidance_scale")),
    }
    if params["seed"] is not None and not 0 <= params["seed"] <= MAX_SEED:
        raise RowInvalid("seed", f"is {params['seed']} (allowed: 0..{MAX_SEED})")
    for name, default in asdict(defaults).items():
        if params[name] is None:
            params[name] = default
    return given_id, {"prompt": prompt, **params}


@dataclass
class Plan:
    rows: list[PlannedRow]
    errors: list[RowError]
    rows_read: int


def read_manifest(url: str, options: dict[str, Any] | None, defaults: RowDefaults, limit: int | None = None) -> Plan:
    """Plan every row of the manifest(s) at `url` (file, directory/prefix or glob; local or s3://)."""
    files = expand_inputs(url, options)
    filesystem, _ = arrow_filesystem(url, options)
    dataset = pads.dataset(files, format="parquet", filesystem=filesystem)
    if "prompt" not in dataset.schema.names:
        raise ValueError(f"manifest {url} has no 'prompt' column (columns: {dataset.schema.names})")
    columns = [c for c in ("id", "prompt", *PARAMETERS) if c in dataset.schema.names]
    rows: list[PlannedRow] = []
    errors: list[RowError] = []
    seen: dict[str, int] = {}
    index = 0
    for fragment in dataset.get_fragments():
        for batch in fragment.to_batches(columns=columns):
            for values in batch.to_pylist():
                _plan_row(values, index, fragment.path, defaults, rows, errors, seen)
                index += 1
                if limit is not None and index >= limit:
                    return Plan(rows, errors, index)
    return Plan(rows, errors, index)


def _plan_row(values: dict[str, Any], index: int, source: str, defaults: RowDefaults, rows: list[PlannedRow],
              errors: list[RowError], seen: dict[str, int]) -> None:
    try:
        given_id = _row_id(values.get("id"))
    except RowInvalid:
        given_id = None
    try:
        given_id, params = normalize_row(values, defaults)
        seed_given = params["seed"] is not None
        row_id = given_id or stable_id(params["prompt"], {k: v for k, v in params.items() if k != "prompt"})
        if row_id in seen:
            raise RowInvalid("id", f"duplicate id {row_id!r}: row {seen[row_id]} of the manifest has it too and is "
                                   f"the one rendered")
        seen[row_id] = index
        if not seed_given:
            params["seed"] = seed_for(row_id)
        rows.append(PlannedRow(id=row_id, file_stem=file_stem(row_id), row=index, source=source, **params))
    except RowInvalid as error:
        errors.append(RowError(id=given_id or f"row-{index}", row=index, source=source, field=error.field,
                               error_type="InvalidRow", message=str(error),
                               row_json=json.dumps(values, default=repr, ensure_ascii=False)))


def rows_table(rows: list[PlannedRow]) -> pa.Table:
    return pa.Table.from_pylist([asdict(r) for r in rows], schema=ROW_SCHEMA)


def errors_table(errors: list[RowError]) -> pa.Table:
    return pa.Table.from_pylist([asdict(e) for e in errors], schema=ERROR_SCHEMA)


ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("file_stem", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
    ("duration", pa.float64()), ("seed", pa.int64()), ("temperature", pa.float64()), ("top_k", pa.int64()),
    ("top_p", pa.float64()), ("guidance_scale", pa.float64()), ("row", pa.int64()), ("source", pa.string()),
])
ERROR_SCHEMA = pa.schema([
    ("id", pa.string()), ("row", pa.int64()), ("source", pa.string()), ("field", pa.string()),
    ("error_type", pa.string()), ("message", pa.string()), ("row_json", pa.string()),
])

"""Render manifests: prompt rows -> planned rows (stable id and seed, sampling parameters, what to do with the row).

A manifest is Parquet with a required `prompt` column and optional `id`, `duration`, `negative_prompt`, `seed`,
`temperature`, `top_k`, `top_p`, `guidance_scale` columns. Each row becomes a `SamplingParams` (job defaults via
`with_defaults`) plus its duration; a row without an id gets one from its parameters and a row without a seed
gets one from its id, so a rerun maps every row to the same clip. What needs no model is checked here
(`audiogen.validation`); limits that depend on the model (maximum duration, codebook size) are checked by the
engine in the render actors. A bad row becomes an error record in-band (status `invalid`, the field and the
limit in its message): it never stops the stream.

`plan_manifest` is the ordered part: one Ray Data task reads the files in name order, row group by row group,
numbers the rows, normalises them, and marks the rows whose id an earlier row already has (first occurrence
wins) and those already committed by an earlier run (`done`, folded into one counting record per block). Being
one sequential task is what makes "first" and the row numbers exact without a shuffle or a driver pass: the rows
stream on as they are planned, so the first clip renders seconds after the start whatever the manifest's size.
Its state is the ids seen and the ids committed (about 100-150 bytes per row, in the task's worker on the
driver's node, never on the driver); if the task is retried it replays the same blocks, because planning is
deterministic. Normalising costs ~25-40 us per row on one core, so the planner keeps up with any cluster
rendering fewer than ~25,000 clips per second.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from audiogen.errors import InvalidRequestError
from audiogen.sampling_params import FIELDS, MAX_SEED, SamplingParams
from audiogen.validation import check_number, check_text
from pipelines.storage import Storage, arrow_filesystem

MANIFEST_COLUMNS = ("id", "prompt", "duration", *FIELDS)
_SAFE = re.compile(r"[^A-Za-z0-9._-]")

PLAN_SCHEMA = pa.schema([
    ("id", pa.string()), ("file_stem", pa.string()), ("prompt", pa.string()), ("duration", pa.float64()),
    ("negative_prompt", pa.string()), ("seed", pa.int64()), ("temperature", pa.float64()), ("top_k", pa.int64()),
    ("top_p", pa.float64()), ("guidance_scale", pa.float64()),
    ("row", pa.int64()), ("source", pa.string()),  # position in the manifest (files in name order)
    ("status", pa.string()),  # todo | done | invalid (later also rendered | failed)
    ("skipped", pa.int64()),  # a `done` record stands for this many committed rows (see `normalize_table`)
    ("error_field", pa.string()), ("error_type", pa.string()), ("error", pa.string()), ("row_json", pa.string()),
])


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
    return safe if safe == row_id else f"{safe}-{hashlib.sha256(row_id.encode()).hexdigest()[:12]}"


def _row_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidRequestError("id", f"must be text or an integer, got {type(value).__name__}")
    return check_text("id", str(value), required=True)


def normalize_row(values: dict[str, Any], defaults: SamplingParams, duration: float | None = None) -> dict[str, Any]:
    """A manifest row -> its planned fields (id, file_stem, prompt, duration, sampling parameters with `defaults`
    applied and the seed filled); raises `InvalidRequestError` naming the field and the limit."""
    given_id = _row_id(values.get("id"))
    prompt = check_text("prompt", values.get("prompt"), required=True)
    seconds = check_number("duration", values.get("duration"), low=0.0, high=math.inf, low_open=True,
                           limit="duration > 0 s, at most the model's maximum")
    seconds = duration if seconds is None else seconds
    sampling = SamplingParams.from_mapping(values).with_defaults(defaults)
    row_id = given_id or stable_id(prompt, {"duration": seconds, **sampling.to_dict()})
    if sampling.seed is None:
        sampling = sampling.with_defaults(SamplingParams(seed=seed_for(row_id)))
    return {"id": row_id, "file_stem": file_stem(row_id), "prompt": prompt, "duration": seconds,
            **sampling.to_dict(), "status": "todo"}


def normalize_table(table: pa.Table, defaults: SamplingParams, duration: float | None = None, *,
                    first_row: int | None = None, source: str | None = None, first: dict[str, int] | None = None,
                    done: set[str] | frozenset[str] = frozenset()) -> pa.Table:
    """Normalise every row of `table` (PLAN_SCHEMA); bad rows become `invalid` records naming field and limit.
    `first_row` numbers the rows (manifest position) when the caller knows it.

    With `first` (id -> row that holds it, updated here; rows must come in manifest order), a row whose id an
    earlier row holds becomes an `invalid` duplicate, and the rows whose id is committed (`done`) are folded into
    one `done` record that counts them (`skipped`): committed rows need no render actor, only their place in the
    job's counts, so a rerun moves a record per block."""
    planned = []
    skipped = 0
    for offset, values in enumerate(table.select([c for c in MANIFEST_COLUMNS if c in table.column_names])
                                    .to_pylist()):
        row = None if first_row is None else first_row + offset
        try:
            record = normalize_row(values, defaults, duration)
        except InvalidRequestError as error:  # the id is checked first: any other field's error has a valid id
            given_id = None if error.field == "id" else _row_id(values.get("id"))
            record = {"id": given_id or f"row-{row if row is not None else offset}", "status": "invalid",
                      "error_field": error.field, "error_type": "InvalidRow", "error": str(error),
                      "row_json": json.dumps(values, default=repr, ensure_ascii=False)}
        if first is not None and record["status"] == "todo":
            holder = first.setdefault(record["id"], row)
            if holder != row:
                record.update(status="invalid", error_field="id", error_type="DuplicateId",
                              error=f"id: duplicate id {record['id']!r}: row {holder} of the manifest has it too "
                                    f"and is the one rendered")
            elif record["id"] in done:
                skipped += 1
                continue
        planned.append({**record, "row": row, "source": source})
    if skipped:
        planned.append({"status": "done", "skipped": skipped})
    return pa.Table.from_pylist(planned, schema=PLAN_SCHEMA)


def check_manifest(files: list[str], url: str, storage_options: dict[str, Any]) -> None:
    """Fail fast, on the driver, when the first manifest file cannot be read or has no `prompt` column."""
    filesystem, _ = arrow_filesystem(url, storage_options)
    names = pq.read_schema(files[0], filesystem=filesystem).names
    if "prompt" not in names:
        raise ValueError(f"manifest {files[0]} has no 'prompt' column (columns: {names})")


def plan_manifest(_: pa.Table, *, files: list[str], url: str, storage_options: dict[str, Any],
                  defaults: SamplingParams, duration: float | None, output: str, limit: int | None,
                  rows_per_read: int) -> Iterator[pa.Table]:
    """Ray Data generator (the single task of the planning stage): every row of `files` in order, planned;
    rows committed in `output` by an earlier run are marked `done` (read here, never on the driver)."""
    from pipelines.commit import committed_ids  # imported here: commit imports the processor, which imports this

    committed = committed_ids(Storage(output, storage_options))
    filesystem, _ = arrow_filesystem(url, storage_options)
    first: dict[str, int] = {}
    row = 0
    for path in files:
        with pq.ParquetFile(path, filesystem=filesystem) as parquet:
            names = parquet.schema_arrow.names
            if "prompt" not in names:
                raise ValueError(f"manifest file {path} has no 'prompt' column (columns: {names})")
            for batch in parquet.iter_batches(batch_size=rows_per_read,
                                               columns=[c for c in MANIFEST_COLUMNS if c in names]):
                if limit is not None:
                    batch = batch.slice(0, limit - row)
                yield normalize_table(pa.Table.from_batches([batch]), defaults, duration, first_row=row,
                                      source=path, first=first, done=committed)
                row += batch.num_rows
                if limit is not None and row >= limit:
                    return

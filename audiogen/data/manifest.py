"""Audio manifests, the (audio path, caption, span, split) rows that encoding (`pipelines.encode`) and codec
training (`audiogen.codec_training`) read: Parquet or JSONL, local or any fsspec URL. The columns are described in
`pipelines.encode`'s docstring."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

PATH_COLUMNS = ("path", "audio", "uri", "file")
CAPTION_COLUMNS = ("caption", "description", "text", "prompt")


def expand_inputs(url: str, options: dict[str, Any] | None = None, suffix: str = ".parquet") -> list[str]:
    """A file, a directory/prefix (every `suffix` file below it) or a glob -> sorted fsspec paths."""
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(suffix)]
    elif fs.exists(path):
        found = [path]
    else:
        raise FileNotFoundError(f"input {url} does not exist")
    files = sorted(p for p in found if not posixpath.basename(p).startswith(("_", ".")))
    if not files:
        raise FileNotFoundError(f"input {url} matches no {suffix} files")
    return files


def source_id(path: str, caption: str, offset: float, duration: float | None) -> str:
    """Stable id of a manifest row without an `id` column (same file + span + caption -> same id)."""
    key = json.dumps([path, caption, float(offset or 0.0), None if duration is None else float(duration)])
    return "s-" + hashlib.sha256(key.encode()).hexdigest()[:20]


def _pick(table: pa.Table, names: tuple[str, ...], what: str) -> str:
    for name in names:
        if name in table.column_names:
            return name
    raise ValueError(f"manifest has no {what} column (one of {list(names)}); columns: {table.column_names}")


def load_manifest(url: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """A Parquet (`.parquet`, or a directory/prefix of them) or JSONL (`.jsonl`/`.json`/`.ndjson`) manifest ->
    a table with columns id, path, caption, offset, duration, split (ids derived where absent)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    lower = url.lower().split("?", 1)[0]
    if lower.endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz")):
        with fs.open(path, "rb", compression="infer") as handle:
            table = pajson.read_json(handle)
        base = posixpath.dirname(url)
    else:
        files = expand_inputs(url, storage_options, ".parquet")
        tables = []
        for path in files:
            with fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle))
        table = pa.concat_tables(tables, promote_options="default")
        base = posixpath.dirname(url) if lower.endswith(".parquet") else url.rstrip("/")
    path_col = _pick(table, PATH_COLUMNS, "audio path")
    caption_col = _pick(table, CAPTION_COLUMNS, "caption")

    def column(name: str, default: Any) -> list[Any]:
        return table[name].to_pylist() if name in table.column_names else [default] * table.num_rows

    paths = [_resolve_path(str(p), base) if p is not None else "" for p in column(path_col, None)]
    captions = ["" if c is None else str(c) for c in column(caption_col, "")]
    offsets = [float(o) if o is not None else 0.0 for o in column("offset", 0.0)]
    durations = [float(d) if d is not None else None for d in column("duration", None)]
    splits = [None if s is None else str(s) for s in column("split", None)]
    given = column("id", None)
    ids = [str(i) if i is not None else source_id(p, c, o, d)
           for i, p, c, o, d in zip(given, paths, captions, offsets, durations)]
    first: dict[str, int] = {}  # row of each id's first occurrence
    duplicates = [f"{row_id!r} (rows {first[row_id]} and {index})" for index, row_id in enumerate(ids)
                  if first.setdefault(row_id, index) != index]
    if duplicates:
        raise ValueError(f"manifest {url} has duplicate ids: {', '.join(duplicates[:5])}"
                         f"{' ...' if len(duplicates) > 5 else ''}")
    return pa.table({"id": ids, "path": paths, "caption": captions, "offset": pa.array(offsets, pa.float64()),
                     "duration": pa.array(durations, pa.float64()), "split": pa.array(splits, pa.string())})


def _resolve_path(path: str, base: str) -> str:
    if "://" in path or os.path.isabs(path) or not path:
        return path
    return posixpath.join(base, path) if "://" in base else os.path.join(base, path)

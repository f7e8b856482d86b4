"""The commit protocol of `audiogen render`: which rows are done, and the Ray Data sink that commits rendered rows.

A row is committed when its record is in a metadata part. Render actors write the audio first (atomically:
temp file + rename, or one S3 PUT) and only then pass the row on; `RenderSink` writes the rows of each write
task as one metadata part of about `part_rows` rows (plus one errors part for the failed and invalid rows),
named by a hash of the ids it holds. A retried write task has the same rows, so it overwrites its own part:
no row is ever recorded twice. A metadata record therefore implies its audio exists, and a rerun needs no
listing of the audio objects.

Rework after a crash is bounded: audio written whose record was not yet in a part (at most `part_rows` rows
waiting for the sink, plus what Ray Data holds between the stages under its backpressure and the rows in the
actors) is rendered again by the next run, to the same bytes (same seed), and overwritten.

Done ids are read by the planner task (see `pipelines.manifest`), which keeps them in a set: an Arrow dataset scan
of column `id` over the metadata parts, by parallel threads; the driver never sees them. (Ray Data's
`read_parquet` would spread the read over the cluster, but its result must land in the planner anyway, and each of
its tasks needs a worker process: measured 15-25 s more before the first row on the 2-core box.)

Why not `ray.data.checkpoint.CheckpointConfig(id_column=...)`: it filters at the read, on an id column the input
must already have (ours are derived from each row's parameters after normalisation); its record is a second set
of files next to the output, written after a Write operator and deleted on success by default (a rerun of a
finished job would render everything again); its local-file backend needs a filesystem shared by all nodes; and
it requires ids to be unique, where a manifest's duplicates must become error rows. Its filtering idea (committed
ids loaded once, rows filtered in the stream) is what the planner does with our own commit record.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink

from pipelines.processor import RENDER_SCHEMA
from pipelines.storage import Storage, arrow_filesystem

METADATA_SCHEMA = pa.schema([  # a rendered row's id and prompt, then the columns its render added
    ("id", pa.string()), ("file", pa.string()), ("prompt", pa.string()),
    *(f for f in RENDER_SCHEMA if f.name not in ("status", "file", "error_field", "error_type", "error")),
    ("manifest_row", pa.int64()),
])
ERROR_SCHEMA = pa.schema([
    ("id", pa.string()), ("row", pa.int64()), ("source", pa.string()), ("field", pa.string()),
    ("error_type", pa.string()), ("message", pa.string()), ("row_json", pa.string()),
])
STATUSES = ("rendered", "failed", "invalid", "done")


def committed_ids(storage: Storage) -> set[str]:
    """The ids in `storage`'s metadata parts: an Arrow dataset scan of column `id` (parts read by parallel
    threads). It runs in the planner task, which keeps the set, never on the driver."""
    import pyarrow.dataset as pads

    filesystem, path = arrow_filesystem(storage.url("metadata"), storage.options)
    parts = [f"{path}/{name}" for name in storage.list("metadata", ".parquet")]  # not the temp files of a write
    ids: set[str] = set()
    if parts:
        for batch in pads.dataset(parts, format="parquet", filesystem=filesystem).to_batches(columns=["id"]):
            ids.update(batch.column(0).to_pylist())
    return ids


def _select(table: pa.Table, schema: pa.Schema, renamed: dict[str, str]) -> pa.Table:
    """`table`'s columns in `schema`'s order and types (`renamed`: output name -> input name)."""
    return table.select([renamed.get(name, name) for name in schema.names]).rename_columns(schema.names).cast(schema)


class RenderSink(Datasink):
    """Commits rendered rows (metadata parts) and failed/invalid rows (errors parts); counts every status."""

    def __init__(self, output: str, storage_options: dict[str, Any], part_rows: int) -> None:
        self.output = output
        self.storage_options = storage_options
        self.part_rows = part_rows
        self.counts: dict[str, float] = dict.fromkeys((*STATUSES, "audio_seconds"), 0)

    @property
    def min_rows_per_write(self) -> int:
        return self.part_rows

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> dict[str, float]:
        table = pa.concat_tables(list(blocks), promote_options="default")
        storage = Storage(self.output, self.storage_options)
        rendered = table.filter(pc.equal(table["status"], "rendered"))
        errors = table.filter(pc.is_in(table["status"], pa.array(["failed", "invalid"])))
        if rendered.num_rows:
            storage.write_part("metadata", rendered["id"].to_pylist(),
                               _select(rendered, METADATA_SCHEMA, {"manifest_row": "row"}))
        if errors.num_rows:
            storage.write_part("errors", errors["id"].to_pylist(),
                               _select(errors, ERROR_SCHEMA, {"field": "error_field", "message": "error"}))
        counts = {status: pc.sum(pc.equal(table["status"], status)).as_py() or 0 for status in STATUSES}
        counts["done"] = pc.sum(table["skipped"]).as_py() or 0  # `done` records count the rows they stand for
        return {**counts, "audio_seconds": pc.sum(rendered["audio_duration"]).as_py() or 0.0}

    def on_write_complete(self, write_result: Any) -> None:
        for counts in write_result.write_returns:
            for name, value in counts.items():
                self.counts[name] += value

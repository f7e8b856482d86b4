"""`audiogen render`: a Parquet prompt manifest -> audio + metadata, as one streaming Ray Data pipeline.

    plan (pipelines.manifest)   one task reads the manifest files in order: normalised rows, duplicate ids and
                                rows committed by an earlier run marked, bad rows as error records
    render (pipelines.processor) the autoscaling pool of engine actors writes the audio of every `todo` row
    commit (pipelines.commit)   a Ray Data sink writes metadata and errors parts of `part_rows` rows

The driver lists the manifest files, starts the pipeline and adds up the sink's per-part counts: it never holds
rows or ids, so its memory does not grow with the manifest.

Output layout under `--output` (a local directory or `s3://bucket/prefix`):
```
audio/<id>.<wav|flac|ogg>     one file per rendered row (ids sanitised, see pipelines.manifest.file_stem)
metadata/part-<hash>.parquet  the commit record: parameters, seed, sizes, sha256, model, timings per row
errors/part-<hash>.parquet    rows that could not be rendered, with field and message (rewritten by every run)
_SUCCESS                      JSON summary of the last run
```
Exit code of the command: 0 when every row is committed (now or before), 1 when some rows failed (see errors/),
2 for bad arguments or an unreadable manifest.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any

from audiogen.validation import check_integer
from pipelines.job import JobProgress, ensure_ray, on_driver_node, progress_actor_name, write_summary
from pipelines.processor import RenderConfig, RenderWorker, build_audio_processor
from audiogen.data.manifest import expand_inputs
from pipelines.storage import Storage

# Render tasks are the planner's output blocks, which Ray Data cuts by size: about TASK_ROWS_PER_SLOT x slots
# rows of ~ROW_BYTES each. An actor holds 2 tasks, so its failure re-renders at most ~16x its slots in rows,
# while the per-task overhead of Ray Data stays small against the rendering.
TASK_ROWS_PER_SLOT = 8
ROW_BYTES = 256  # a planned row with a short prompt
ROWS_PER_READ = 1024  # rows the planner reads and normalises at a time


@dataclass(kw_only=True)
class RenderOptions(RenderConfig):
    """`audiogen render`'s options: the processor's plus the manifest and the commit."""

    input: str = field(metadata={"help": "Parquet manifest: file, directory/prefix or glob, local or s3://"})
    part_rows: int = field(default=2048, metadata={
        "help": "rows per metadata part: a crash makes the next run re-render at most about this many rows"})
    limit: int | None = field(default=None, metadata={"help": "only the first N manifest rows"})
    progress: bool = field(default=True, metadata={"help": "Ray Data progress bars"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("part_rows", self.part_rows, low=1, high=None)
        check_integer("limit", self.limit, low=0, high=None)


def run_render(options: RenderOptions, *, worker: type[RenderWorker] = RenderWorker) -> dict[str, Any]:
    """Render every not-yet-committed row of the manifest; returns (and writes as `_SUCCESS`) the job summary."""
    import ray

    from pipelines.commit import STATUSES, RenderSink
    from pipelines.manifest import check_manifest, plan_manifest

    started = time.perf_counter()
    processor = build_audio_processor(options, worker=worker)
    files = expand_inputs(options.input, options.storage_options)
    check_manifest(files, options.input, options.storage_options)
    storage = Storage(options.output, options.storage_options)
    ensure_ray(options.progress)
    storage.remove_prefix("errors")  # errors describe the latest run: every row not done is tried again now
    planned = ray.data.from_items([{"manifest": options.input}])
    planned.context.target_max_block_size = TASK_ROWS_PER_SLOT * options.max_batch_slots * ROW_BYTES
    planned = planned.map_batches(
        plan_manifest, batch_size=None, batch_format="pyarrow", num_cpus=0, label_selector=on_driver_node(),
        fn_kwargs={"files": files, "url": options.input, "storage_options": options.storage_options,
                   "defaults": options.sampling, "duration": options.duration, "output": options.output,
                   "limit": options.limit, "rows_per_read": ROWS_PER_READ})
    sink = RenderSink(options.output, options.storage_options, options.part_rows)
    progress = ray.remote(num_cpus=0)(JobProgress).options(
        name=progress_actor_name(options.output), get_if_exists=True, label_selector=on_driver_node()).remote()
    try:
        processor.render(planned).write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    finally:
        ray.kill(progress)
    counts, wall = sink.counts, time.perf_counter() - started
    audio_seconds, rendered = counts["audio_seconds"], int(counts["rendered"])
    summary = {
        "input": options.input, "output": options.output, "model": options.model or "embedded default",
        "rows_read": int(sum(counts[s] for s in STATUSES)),
        "rows_rendered": rendered, "rows_skipped_done": int(counts["done"]),
        "rows_failed": int(counts["failed"] + counts["invalid"]), "rows_invalid": int(counts["invalid"]),
        "audio_hours": round(audio_seconds / 3600, 6), "audio_seconds": round(audio_seconds, 3),
        "wall_seconds": round(wall, 3), "rows_per_second": round(rendered / wall, 4) if wall else 0.0,
        "audio_seconds_per_second": round(audio_seconds / wall, 4) if wall else 0.0,
        "format": options.format, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
    }
    write_summary(storage, "_SUCCESS", summary)
    return summary

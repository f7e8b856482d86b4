"""Batch rendering: Parquet prompt manifests -> Ray Data -> autoscaling pool of engine actors -> storage.

Output layout under `--output` (a local directory or `s3://bucket/prefix`):
```
audio/<id>.<wav|flac|ogg>     one file per rendered row (ids sanitised, see pipelines.manifest.file_stem)
metadata/part-<hash>.parquet  one record per rendered row: parameters, seed, sizes, sha256, model, timings
errors/part-<hash>.parquet    rows that could not be rendered, with the error (rewritten by every run)
_SUCCESS                      JSON summary of the last run
```

Exactly once: a row is done when its metadata record exists and its audio object exists. A run reads the done
ids first and renders only the rest. Audio is written first (atomically), then the metadata part of its batch,
named by a hash of the batch's ids, so a retried batch overwrites its part instead of adding a second one; a
crash between the two leaves audio without metadata, which the next run renders again (same seed, same clip)
and overwrites. Bad rows go to `errors/` and never fail the job.

Each actor owns one engine and receives several Ray Data batches at once, every row submitted as its own engine
request, so continuous batching stays full across batch boundaries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from pipelines.manifest import (Plan, RowDefaults, RowError, errors_table, read_manifest, rows_table)
from pipelines.storage import Storage

log = logging.getLogger(__name__)

METADATA_SCHEMA = pa.schema([
    ("id", pa.string()), ("file", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
    ("duration", pa.float64()), ("seed", pa.int64()), ("temperature", pa.float64()), ("top_k", pa.int64()),
    ("top_p", pa.float64()), ("guidance_scale", pa.float64()), ("sample_rate", pa.int64()),
    ("channels", pa.int64()), ("num_samples", pa.int64()), ("audio_duration", pa.float64()),
    ("format", pa.string()), ("subtype", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string()),
    ("model", pa.string()), ("model_checksum", pa.string()), ("render_seconds", pa.float64()),
    ("actor_id", pa.string()), ("rendered_at", pa.string()), ("manifest_row", pa.int64()),
])
RESULT_SCHEMA = pa.schema([("id", pa.string()), ("status", pa.string()), ("audio_seconds", pa.float64()),
                           ("render_seconds", pa.float64())])


@dataclass
class RenderOptions:
    input: str
    output: str
    model: str | None = None
    format: str = "wav"
    subtype: str | None = None
    defaults: RowDefaults = field(default_factory=RowDefaults)
    storage_options: dict[str, Any] = field(default_factory=dict)
    min_actors: int = 1
    max_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 8
    batches_per_actor: int = 4
    max_batch_slots: int = 16
    dtype: str | None = None
    backend: str | None = None
    limit: int | None = None
    progress: bool = True

    @property
    def extension(self) -> str:
        from audiogen.io import SUPPORTED_FORMATS

        return SUPPORTED_FORMATS[self.format].extension.lstrip(".")


def progress_actor_name(output: str) -> str:
    """One progress actor per output location (two jobs on one cluster never share it)."""
    return "audiogen-render-" + hashlib.sha256(output.encode()).hexdigest()[:16]


def batch_part_name(ids: list[str]) -> str:
    """Deterministic part name: the same batch (a retry) overwrites its own part."""
    return "part-" + hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:24] + ".parquet"


# --------------------------------------------------------------------------------------------- driver side
def done_ids(storage: Storage, extension: str) -> set[str]:
    """Ids whose metadata record exists and whose audio object exists (both halves of a commit)."""
    metadata = storage.read_tables("metadata", columns=["id", "file"])
    if metadata is None:
        return set()
    present = set(storage.list("audio", f".{extension}"))
    return {row_id for row_id, file in zip(metadata["id"].to_pylist(), metadata["file"].to_pylist())
            if file in present}


def run_render(options: RenderOptions) -> dict[str, Any]:
    """Render every not-yet-committed row of the manifest; returns (and writes) the job summary."""
    from audiogen.io import SUPPORTED_FORMATS

    if options.format not in SUPPORTED_FORMATS:
        raise ValueError(f"format {options.format!r} is not supported (choose from {sorted(SUPPORTED_FORMATS)})")
    started = time.perf_counter()
    storage = Storage(options.output, options.storage_options)
    plan = read_manifest(options.input, options.storage_options, options.defaults, options.limit)
    done = done_ids(storage, options.extension)
    todo = [row for row in plan.rows if row.id not in done]
    storage.remove_prefix("errors")  # errors describe the latest run: every not-done row is retried now
    if plan.errors:
        storage.write_table(f"errors/{batch_part_name([e.id for e in plan.errors])}", errors_table(plan.errors))
    log.info("manifest: %d rows, %d already rendered, %d to render, %d invalid", plan.rows_read,
             len(plan.rows) - len(todo), len(todo), len(plan.errors))

    counts = {"rendered": 0, "failed": 0}
    audio_seconds = 0.0
    if todo:
        _ensure_ray()
        progress = RenderProgress.options(name=progress_actor_name(options.output), get_if_exists=True).remote()
        try:
            for batch in _render_dataset(options, todo).iter_batches(batch_size=None, batch_format="pyarrow"):
                statuses = batch["status"].to_pylist()
                counts["rendered"] += statuses.count("rendered")
                counts["failed"] += statuses.count("failed")
                audio_seconds += sum(batch["audio_seconds"].to_pylist())
        finally:
            ray.kill(progress)
    summary = _summary(options, plan, skipped=len(plan.rows) - len(todo), counts=counts,
                       audio_seconds=audio_seconds, wall=time.perf_counter() - started)
    storage.write_bytes("_SUCCESS", json.dumps(summary, indent=2).encode())
    return summary


def _ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})


def _render_dataset(options: RenderOptions, rows: list) -> Any:
    from ray.data import ActorPoolStrategy

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = options.progress
    table = rows_table(rows)
    blocks = [table.slice(start, options.batch_size) for start in range(0, table.num_rows, options.batch_size)]
    return ray.data.from_arrow(blocks).map_batches(
        RenderWorker, batch_size=options.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"options": options},
        compute=ActorPoolStrategy(min_size=options.min_actors, max_size=options.max_actors,
                                  max_tasks_in_flight_per_actor=options.batches_per_actor,
                                  max_concurrent_calls_per_actor=options.batches_per_actor),
        # Ray Data restarts dead actors and retries their batches by default (max_restarts=-1,
        # max_task_retries=-1): a retried batch re-renders the same clips and overwrites its own part.
        num_cpus=options.num_cpus, num_gpus=options.num_gpus or None)


def _summary(options: RenderOptions, plan: Plan, *, skipped: int, counts: dict[str, int], audio_seconds: float,
             wall: float) -> dict[str, Any]:
    return {
        "input": options.input, "output": options.output, "model": options.model or "embedded default",
        "rows_read": plan.rows_read, "rows_rendered": counts["rendered"], "rows_skipped_done": skipped,
        "rows_failed": counts["failed"] + len(plan.errors), "rows_invalid": len(plan.errors),
        "audio_hours": round(audio_seconds / 3600, 6), "audio_seconds": round(audio_seconds, 3),
        "wall_seconds": round(wall, 3), "rows_per_second": round(counts["rendered"] / wall, 4) if wall else 0.0,
        "audio_seconds_per_second": round(audio_seconds / wall, 4) if wall else 0.0,
        "format": options.format, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
    }


# --------------------------------------------------------------------------------------------- actors
@ray.remote(num_cpus=0)
class RenderProgress:
    """Live count of rendered audio seconds across a job's actors, and their handles (operators and the fault
    test use them to find the actors of a running job)."""

    def __init__(self) -> None:
        self.audio_seconds = 0.0
        self.rows = 0
        self.workers: dict[str, Any] = {}

    def register(self, actor_id: str, handle: Any) -> None:
        self.workers[actor_id] = handle

    def add(self, seconds: float) -> None:
        self.audio_seconds += seconds
        self.rows += 1

    def snapshot(self) -> dict[str, Any]:
        return {"audio_seconds": self.audio_seconds, "rows": self.rows, "workers": dict(self.workers)}


class RenderWorker:
    """Ray Data callable class: one engine per actor; each batch's rows become concurrent engine requests."""

    def __init__(self, options: RenderOptions) -> None:
        from audiogen.engine import Engine

        self.options = options
        self.storage = Storage(options.output, options.storage_options)
        self.model = load_render_model(options.model, num_gpus=options.num_gpus, dtype=options.dtype,
                                       backend=options.backend)
        # a batch ends with its last clip: longest first keeps the slots full until then
        self.engine = Engine(self.model, max_batch_slots=options.max_batch_slots,
                             max_queued_requests=1_000_000, admission_order="longest_first")
        self.model_name = self.model.config.name
        self.model_checksum = self.model.checksum()
        context = ray.get_runtime_context()
        self.actor_id = context.get_actor_id() or f"local-{os.getpid()}"
        try:
            self.progress = ray.get_actor(progress_actor_name(options.output))
            self.progress.register.remote(self.actor_id, context.current_actor)
        except ValueError:
            self.progress = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        outcomes = await asyncio.gather(*(self._render(row) for row in rows))
        records = [record for record, _ in outcomes if record is not None]
        errors = [error for _, error in outcomes if error is not None]
        if records:
            table = pa.Table.from_pylist(records, schema=METADATA_SCHEMA)
            await asyncio.to_thread(self.storage.write_table, f"metadata/{batch_part_name([r['id'] for r in records])}",
                                    table)
        if errors:
            await asyncio.to_thread(self.storage.write_table, f"errors/{batch_part_name([e.id for e in errors])}",
                                    errors_table(errors))
        return pa.Table.from_pylist([
            {"id": row["id"], "status": "rendered" if record else "failed",
             "audio_seconds": record["audio_duration"] if record else 0.0,
             "render_seconds": record["render_seconds"] if record else 0.0}
            for row, (record, _) in zip(rows, outcomes)], schema=RESULT_SCHEMA)

    async def _render(self, row: dict[str, Any]) -> tuple[dict[str, Any] | None, RowError | None]:
        from audiogen.engine import GenerationRequest
        from audiogen.errors import InvalidRequestError
        from audiogen.sampling_params import SamplingParams

        started = time.perf_counter()
        request = GenerationRequest(prompt=row["prompt"], duration=row["duration"],
                                    sampling=SamplingParams.from_mapping(row), request_id=row["id"])
        try:
            result = await self.engine.generate(request)
            record = await asyncio.to_thread(self._commit_audio, row, result, time.perf_counter() - started)
        except InvalidRequestError as error:
            return None, self._error(row, error.field, "InvalidRequest", str(error))
        except Exception as error:  # one bad row never fails the job
            log.exception("row %s failed", row["id"])
            return None, self._error(row, "", type(error).__name__, str(error))
        if self.progress is not None:
            self.progress.add.remote(record["audio_duration"])
        return record, None

    def _commit_audio(self, row: dict[str, Any], result: Any, seconds: float) -> dict[str, Any]:
        from audiogen.io import SUPPORTED_FORMATS, encode_audio

        fmt = SUPPORTED_FORMATS[self.options.format]
        subtype = self.options.subtype or fmt.default_subtype
        data = encode_audio(result.audio, result.sample_rate, format=self.options.format, subtype=subtype)
        name = f"{row['file_stem']}.{self.options.extension}"
        self.storage.write_bytes(f"audio/{name}", data)
        used = result.request
        return {
            "id": row["id"], "file": name, "prompt": used.prompt,
            **{**used.sampling.to_dict(), "negative_prompt": used.sampling.negative_prompt or None},
            "duration": used.total_frames / self.model.frame_rate, "sample_rate": result.sample_rate,
            "channels": int(result.audio.shape[0]), "num_samples": int(result.audio.shape[-1]),
            "audio_duration": result.duration, "format": self.options.format, "subtype": subtype,
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "model": self.model_name,
            "model_checksum": self.model_checksum, "render_seconds": round(seconds, 4), "actor_id": self.actor_id,
            "rendered_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "manifest_row": row["row"],
        }

    def _error(self, row: dict[str, Any], field: str, kind: str, message: str) -> RowError:
        return RowError(id=row["id"], row=row["row"], source=row["source"], field=field, error_type=kind,
                        message=message, row_json=json.dumps({k: v for k, v in row.items()}, default=repr))


def load_render_model(model: str | None, *, num_gpus: float = 0.0, dtype: str | None = None,
                      backend: str | None = None):
    """The model for a render actor: a checkpoint or ONNX export directory (local, or s3:// copied to a local
    cache first) or the embedded default. CPU actors leave their cores to the engine thread."""
    import torch

    from audiogen.engine.cpu import reserve_cores_for_engine
    from audiogen.loading import open_model

    device = "cuda" if num_gpus and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        reserve_cores_for_engine()
    return open_model(None if model is None else local_checkpoint(model), backend=backend, device=device,
                      dtype=dtype)


def local_checkpoint(model: str) -> str:
    """A local directory for `model`: itself, or a cached copy of a remote (e.g. s3://) checkpoint directory."""
    storage = Storage(model)
    if storage.local:
        return storage.path
    cache = os.path.join(os.path.expanduser("~/.cache/audiogen/models"), hashlib.sha256(model.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(cache, ".complete")):
        storage.fs.get(storage.path + "/", cache, recursive=True)
        open(os.path.join(cache, ".complete"), "w").close()
    return cache

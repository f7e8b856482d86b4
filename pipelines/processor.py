"""The audio processor: a Ray Data stage that renders prompt rows to audio files, for any Ray Data pipeline.

In the shape of `ray.data.llm.build_processor`: `build_audio_processor(config)` returns `proc` with
`proc(ds) -> ds`. The input needs a `prompt` column (`id`, `duration`, `seed` and the `SamplingParams` columns
are optional); the output keeps every input column and adds the render columns: `status` (rendered | failed |
invalid), `file` (under `<output>/audio/`), the parameters actually used (`seed`, `temperature`, ...),
`sample_rate`, `num_samples`, `sha256`, `model`, ... and `error_field`/`error_type`/`error` for rows that could
not be rendered. Bad rows are records, never exceptions.

    proc = build_audio_processor(RenderConfig(output="s3://bucket/clips", max_actors=8, num_gpus=1))
    proc(ray.data.read_parquet("s3://bucket/prompts/")).write_parquet("s3://bucket/clips/index")

Each actor owns one engine with `max_batch_slots` decoding slots. It is fed batches of `slots` rows; Ray Data runs
up to 4 batches of a task at once in an async actor and each actor takes 2 tasks, so an actor holds 4x-8x its
slots in rows (at least 1.5x even at a task's tail: the engine never waits for the next batch; larger batches
keep Ray Data's per-batch cost, paid under the GIL the engine loop needs, small), every row its own engine
request, admitted longest first (a batch ends with its last clip: long clips start first, short ones fill
the tail). The model is loaded with the first row to render (fetched once per node for remote directories).

Faults: a failed engine step closes the engine; the actor then exits its process, so Ray restarts it and retries
its tasks (rows re-render to the same bytes: the seed is part of the row). Rows are never written as errors because
their engine died.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from audiogen.errors import InvalidRequestError
from audiogen.io import SUPPORTED_FORMATS, encode_audio
from audiogen.options import check_choices, option
from audiogen.sampling_params import SamplingParams
from audiogen.validation import check_integer
from pipelines.job import fetch_model, progress_actor_name
from pipelines.manifest import PLAN_SCHEMA, normalize_table
from pipelines.storage import Storage, storage_options_field

log = logging.getLogger(__name__)

RENDER_SCHEMA = pa.schema([
    ("status", pa.string()), ("file", pa.string()), ("negative_prompt", pa.string()),
    ("duration", pa.float64()), ("seed", pa.int64()), ("temperature", pa.float64()), ("top_k", pa.int64()),
    ("top_p", pa.float64()), ("guidance_scale", pa.float64()), ("sample_rate", pa.int64()),
    ("channels", pa.int64()), ("num_samples", pa.int64()), ("audio_duration", pa.float64()),
    ("format", pa.string()), ("subtype", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string()),
    ("model", pa.string()), ("model_checksum", pa.string()), ("render_seconds", pa.float64()),
    ("actor_id", pa.string()), ("rendered_at", pa.string()),
    ("error_field", pa.string()), ("error_type", pa.string()), ("error", pa.string()),
])
TASKS_PER_ACTOR = 2


@dataclass(kw_only=True)
class RenderConfig:
    """What the render actors need: where the audio goes, the model, the actor pool and the job defaults."""

    output: str = option(help="output directory or s3://bucket/prefix (audio/ goes below it)")
    model: str | None = option(None, help="checkpoint or ONNX export directory, local or s3:// (default: the "
                                          "embedded model)")
    backend: str | None = option(None, choices=("torch", "onnx"),
                                 help="default: onnx for a directory written by `audiogen export-onnx`, else torch")
    dtype: str | None = option(None, choices=("float32", "bfloat16", "float16"), help="model dtype")
    max_batch_slots: int = option(16, help="engine slots per actor; each actor is fed 4-8x this many rows")
    format: str = option("wav", choices=SUPPORTED_FORMATS, help="audio file format")
    subtype: str | None = option(None, help="e.g. PCM_16, PCM_24, FLOAT, VORBIS")
    duration: float | None = option(None, help="job default duration (s) for rows without one")
    sampling: SamplingParams = field(default_factory=SamplingParams)  # job defaults for rows without a value
    storage_options: dict[str, Any] = storage_options_field()
    min_actors: int = option(1, help="render actors the pool keeps")
    max_actors: int = option(1, help="render actors the pool may scale up to")
    num_cpus: float = option(1.0, help="CPUs per render actor")
    num_gpus: float = option(0.0, help="GPUs per render actor (0 = CPU actors)")

    def __post_init__(self) -> None:
        check_choices(self)  # format, backend, dtype
        check_integer("min_actors", self.min_actors, low=1, high=None)
        check_integer("max_actors", self.max_actors, low=self.min_actors, high=None, limit=">= min_actors")
        check_integer("max_batch_slots", self.max_batch_slots, low=1, high=None)


class RenderWorker:
    """Ray Data callable class: one engine per actor; each row of a batch is its own engine request."""

    def __init__(self, config: RenderConfig) -> None:
        import ray

        self.config = config
        self.storage = Storage(config.output, config.storage_options)
        self.model: Any = None
        self.engine: Any = None
        context = ray.get_runtime_context()
        self.actor_id = context.get_actor_id() or f"local-{os.getpid()}"
        try:
            self.progress = ray.get_actor(progress_actor_name(config.output))
            self.progress.register.remote(self.actor_id, os.getpid(), context.get_node_id())
        except ValueError:  # used outside `audiogen render`: no progress actor
            self.progress = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if self.engine is None and any(row["status"] == "todo" for row in rows):
            self._start_engine()  # blocks this actor's event loop: nothing can run before the model anyway
        self._exit_if_engine_dead()
        outcomes = await asyncio.gather(*(self._render(row) for row in rows))
        rendered = [o for o in outcomes if o["status"] == "rendered"]
        if self.progress is not None and rendered:
            self.progress.add.remote(len(rendered), sum(o["audio_duration"] for o in rendered))
        return set_columns(batch, {name: pa.array([o[name] for o in outcomes], RENDER_SCHEMA.field(name).type)
                                   for name in RENDER_SCHEMA.names})

    def _start_engine(self) -> None:
        """Load the model when the first row to render arrives: an actor that only passes rows through (a rerun
        of a committed job) loads none. The model is a checkpoint or ONNX export directory (local, or a remote one
        fetched into the node's model cache) or the embedded default; CPU actors leave their cores to the engine
        thread."""
        import torch

        from audiogen.engine import Engine
        from audiogen.engine.cpu import reserve_cores_for_engine
        from audiogen.loading import open_model

        config = self.config
        device = "cuda" if config.num_gpus and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            reserve_cores_for_engine()
        model = None if config.model is None else fetch_model(config.model, config.storage_options)
        self.model = open_model(model, backend=config.backend, device=device, dtype=config.dtype)
        self.model_checksum = self.model.checksum()
        self.engine = Engine(self.model, max_batch_slots=self.config.max_batch_slots,
                             max_queued_requests=1_000_000, admission_order="longest_first")

    async def _render(self, row: dict[str, Any]) -> dict[str, Any]:
        from audiogen.engine import GenerationRequest

        outcome = {name: row.get(name) for name in RENDER_SCHEMA.names}
        if row["status"] != "todo":  # invalid, or committed by an earlier run: passed through
            return outcome
        started = time.perf_counter()
        request = GenerationRequest(prompt=row["prompt"], duration=row["duration"],
                                    sampling=SamplingParams.from_mapping(row), request_id=row["id"])
        try:
            result = await self.engine.generate(request)
            return await asyncio.to_thread(self._write_audio, outcome, row, result, time.perf_counter() - started)
        except InvalidRequestError as error:
            return {**outcome, "status": "failed", "error_field": error.field, "error_type": "InvalidRequest",
                    "error": str(error)}
        except Exception as error:  # one bad row never fails the job; a dead engine ends the actor
            self._exit_if_engine_dead()
            log.exception("row %s failed", row["id"])
            return {**outcome, "status": "failed", "error_field": "", "error_type": type(error).__name__,
                    "error": str(error)}

    def _write_audio(self, outcome: dict[str, Any], row: dict[str, Any], result: Any, seconds: float
                     ) -> dict[str, Any]:
        """Encode and write one clip (atomically); returns its render columns."""
        spec = SUPPORTED_FORMATS[self.config.format]
        subtype = self.config.subtype or spec.default_subtype
        data = encode_audio(result.audio, result.sample_rate, format=self.config.format, subtype=subtype)
        name = f"{row['file_stem']}{spec.extension}"
        self.storage.write_bytes(f"audio/{name}", data)
        used = result.request.sampling
        return {**outcome, **used.to_dict(), "negative_prompt": used.negative_prompt or None, "status": "rendered",
                "file": name, "duration": result.request.total_frames / self.model.frame_rate,
                "sample_rate": result.sample_rate, "channels": int(result.audio.shape[0]),
                "num_samples": int(result.audio.shape[-1]), "audio_duration": result.duration,
                "format": self.config.format, "subtype": subtype, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "model": self.model.config.name,
                "model_checksum": self.model_checksum, "render_seconds": round(seconds, 4),
                "actor_id": self.actor_id, "rendered_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _exit_if_engine_dead(self) -> None:
        """A dead engine fails every request it holds: leave the process (not the rows) so that Ray restarts
        the actor and retries its tasks on a fresh engine."""
        if self.engine is not None and not (snapshot := self.engine.snapshot()).alive:
            log.error("render actor %s: engine is dead (%s); exiting for Ray to restart it", self.actor_id,
                      snapshot.error)
            logging.shutdown()
            os._exit(1)


def plan_rows(batch: pa.Table, defaults: SamplingParams, duration: float | None) -> pa.Table:
    """Ray Data map: the batch with its rows normalised (`normalize_table`); the caller's other columns are kept
    (`row`/`source`, the manifest position, are the render job's and left alone)."""
    planned = normalize_table(batch, defaults, duration)
    return set_columns(batch, {name: planned[name] for name in PLAN_SCHEMA.names
                               if name not in ("row", "source", "skipped")})


def set_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """`table` with `columns` replacing same-named columns or appended."""
    for name, values in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, values) if index >= 0 else table.append_column(name, values)
    return table


@dataclass
class AudioProcessor:
    """`proc(ds) -> ds`: normalise prompt rows, then render them (see the module docstring)."""

    config: RenderConfig
    worker: type[RenderWorker] = RenderWorker  # a subclass may extend the actor (extra columns, instrumentation)

    def __call__(self, ds: Any) -> Any:
        planned = ds.map_batches(plan_rows, batch_format="pyarrow",
                                 fn_kwargs={"defaults": self.config.sampling, "duration": self.config.duration})
        return self.render(planned)

    def render(self, planned: Any) -> Any:
        """The render stage alone, for rows that are planned already (the PLAN_SCHEMA columns, as `plan_rows` or
        `audiogen render`'s manifest planner make them)."""
        from ray.data import ActorPoolStrategy

        # batches of one engine's worth of rows: with 4 calls per task and 1-2 tasks per actor in flight, the
        # engine has 4x-8x its slots to choose from
        return planned.map_batches(
            self.worker, batch_size=self.config.max_batch_slots, batch_format="pyarrow",
            fn_constructor_kwargs={"config": self.config},
            compute=ActorPoolStrategy(min_size=self.config.min_actors, max_size=self.config.max_actors,
                                      max_tasks_in_flight_per_actor=TASKS_PER_ACTOR,
                                      max_concurrent_calls_per_actor=TASKS_PER_ACTOR),
            # Ray Data restarts dead actors and retries their tasks (max_restarts=-1, max_task_retries=-1)
            num_cpus=self.config.num_cpus, num_gpus=self.config.num_gpus or None)


build_audio_processor = AudioProcessor  # the `ray.data.llm.build_processor` shape: `build_audio_processor(config)`

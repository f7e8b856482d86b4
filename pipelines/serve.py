"""Online serving: the continuous-batching engine behind a FastAPI ingress on Ray Serve.

    serve run serve_config.yaml                 # local Ray; the same file deploys to a cluster
    audiogen serve [--config serve_config.yaml] [--model DIR] [--port 8000] [--max-batch-slots 8] ...

Each replica owns one `audiogen.engine.Engine`; every request the replica is handling is a request in that
engine, so concurrent requests share decoding steps (continuous batching, not `@serve.batch`). Handlers only
validate, await the engine (or iterate its stream) and encode; blocking work (audio decode/encode, codec
encoding of uploads) runs in worker threads so the event loop keeps serving. A client that disconnects cancels
its handler, which cancels its engine request and frees its slot at the next step.

Overload never queues without bound: the engine's queue (`max_queued_requests` app arg) and Serve's
(`max_ongoing_requests` per replica, `max_queued_requests` per proxy) are both bounded, and both answer 503 with
`Retry-After`.

Metrics (`GET /metrics`, Prometheus text) are per replica: every series has a `replica` label, and a scrape through
the Serve proxy reaches one replica. For a cluster view scrape Ray's metrics endpoints, where Ray Serve exports
its built-in per-deployment series (serve_num_http_requests, serve_http_request_latency_ms, ...).
"""

import asyncio
import contextlib
from dataclasses import replace
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from ray import serve
from ray.serve import Application

from audiogen.engine import GenerationRequest
from audiogen.sampling_params import MAX_SEED, SamplingParams
from audiogen.errors import EngineClosedError, InvalidRequestError, QueueFullError, RequestCancelledError
from audiogen.io import SUPPORTED_FORMATS, OggStreamEncoder, encode_audio, pcm_bytes, read_audio, wav_stream_header

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.yaml"
STREAM_FORMATS = ("wav", "ogg", "opus")  # WAV header + PCM, or Ogg pages; FLAC needs a seekable file
MAX_PROMPT_CHARS = 2000  # characters; the model's token limit is checked by the engine
MAX_FORM_FIELDS = 32


# ---------------------------------------------------------------------------------------------------------------
# Settings (application args)
# ---------------------------------------------------------------------------------------------------------------
class ServerSettings(BaseModel):
    """Application args (`args:` in serve_config.yaml, flags of `audiogen serve`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_path: str | None = Field(None, description="checkpoint directory; None = the embedded default model")
    text_encoder: str | None = Field(None, description="override the T5 (local dir or cached HF name)")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... (default: cuda if available)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="LM precision")
    backend: Literal["torch", "onnx"] | None = Field(
        None, description="torch, or onnxruntime (default: onnx for a directory written by `audiogen export-onnx`)")
    max_batch_slots: int = Field(8, ge=1, description="requests decoded together by the replica's engine")
    max_queued_requests: int = Field(16, ge=0, description="engine queue bound; beyond it: 503")
    compile: bool = Field(False, description="torch.compile the decoding step (GPU)")
    cpu_threads: int | None = Field(None, ge=1, description="engine threads on CPU (default: the actor's cores)")
    stream_chunk_frames: int = Field(25, ge=1, description="frames per streamed chunk (50 frames = 1 s)")
    request_timeout_s: float = Field(300.0, gt=0, description="per request, queueing included; then 504")
    retry_after_s: int = Field(2, ge=0, description="Retry-After of 503 answers")
    max_upload_bytes: int = Field(16 * 2**20, ge=1, description="largest multipart body accepted")
    max_upload_seconds: float | None = Field(None, gt=0, description="longest upload (default: max_duration)")


def load_settings(args: dict[str, Any] | ServerSettings | None) -> ServerSettings:
    return args if isinstance(args, ServerSettings) else ServerSettings.model_validate(dict(args or {}))


# ---------------------------------------------------------------------------------------------------------------
# Request schemas
# ---------------------------------------------------------------------------------------------------------------
def _custom(message: str, limit: str) -> PydanticCustomError:
    return PydanticCustomError("invalid", message, {"limit": limit})


def _check_format(value: str) -> str:
    name = str(value).lower()
    if name not in SUPPORTED_FORMATS:
        raise _custom(f"unsupported audio format {value!r}", ", ".join(SUPPORTED_FORMATS))
    return name


class SamplingFields(BaseModel):
    """Fields shared by every endpoint. Ranges are checked against the loaded model by the engine."""

    model_config = ConfigDict(extra="forbid")

    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS,
                                        description="what to steer away from (replaces the null condition)")
    seed: int | None = Field(None, description=f"0..{MAX_SEED}; same seed + params = same audio")
    temperature: float | None = Field(None, description="0 <= temperature <= 100 (0 = greedy)")
    top_k: int | None = Field(None, description="0..card (0 = off)")
    top_p: float | None = Field(None, description="0 <= top_p <= 1 (0 = off)")
    guidance_scale: float | None = Field(None, description="classifier-free guidance, 0..100")
    format: str = Field("wav", description="wav, flac or ogg (opus where libsndfile supports it)")

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        return _check_format(value)

    def sampling(self) -> SamplingParams:
        return SamplingParams.from_mapping(self.model_dump())


class GenerateBody(SamplingFields):
    """`POST /v1/generate`."""

    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS, description="text description of the sound")
    duration: float | None = Field(None, description="seconds; 0 < duration <= the model's max_duration")
    stream: bool = Field(False, description="chunked audio sent while frames are decoded (wav, ogg)")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise _custom("prompt is empty", "at least one non-space character")
        return value




class ContinueBody(SamplingFields):
    """Form fields of `POST /v1/continue` (besides the `audio` file)."""

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="optional text condition")
    extension_seconds: float = Field(5.0, description="seconds to add after the upload")
    keep_original: bool = Field(True, description="return the upload itself + the extension (else resynthesis)")


class InpaintBody(SamplingFields):
    """Form fields of `POST /v1/inpaint` (besides the `audio` file)."""

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="optional text condition")
    mask: list[tuple[float, float]] | list[bool] = Field(
        ..., description="what to regenerate: [[start_s, end_s], ...] spans, or one boolean per codec frame")
    keep_original: bool = Field(True, description="keep the upload outside the mask (else resynthesis)")

    @field_validator("mask", mode="before")
    @classmethod
    def _mask_json(cls, value: Any) -> Any:
        if isinstance(value, str):  # a form field carries JSON text
            try:
                return json.loads(value)
            except ValueError:
                raise _custom("mask is not valid JSON", "[[start_s, end_s], ...] or [true, false, ...]") from None
        return value


# ---------------------------------------------------------------------------------------------------------------
# Errors -> HTTP
# ---------------------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An answer other than 200, with the `{"detail": [{field, message, limit}]}` body."""

    def __init__(self, status: int, details: list[dict[str, Any]], headers: dict[str, str] | None = None) -> None:
        super().__init__(details[0].get("message") if details else str(status))
        self.status = status
        self.details = details
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.details}, status_code=self.status, headers=self.headers)


def _pydantic_limit(error: dict[str, Any]) -> str | None:
    ctx = error.get("ctx") or {}
    if "limit" in ctx:
        return str(ctx["limit"])
    for key, text in (("max_length", "at most {} characters"), ("min_length", "at least {} characters"),
                      ("ge", ">= {}"), ("gt", "> {}"), ("le", "<= {}"), ("lt", "< {}"), ("expected", "one of {}")):
        if key in ctx:
            return text.format(ctx[key])
    kind = str(error.get("type", ""))
    for prefix, text in (("int", "an integer"), ("float", "a number"), ("bool", "true or false"),
                         ("string", "a string"), ("missing", "required"), ("extra", "no such field"),
                         ("json", "a JSON object")):
        if kind.startswith(prefix):
            return text
    return None


def validation_details(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic errors -> [{field, message, limit}] (the field path without the `body` prefix)."""
    details = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        # union members (list[tuple] | list[bool]) add their type names to the path: keep the user's names
        loc = [part for part in loc if not part.startswith(("list[", "tuple["))]
        details.append({"field": ".".join(loc) or "body", "message": error.get("msg", "invalid"),
                        "limit": _pydantic_limit(error)})
    return details


def error_from_exception(error: BaseException, retry_after_s: int) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, InvalidRequestError):
        return ApiError(422, [error.to_dict()])
    if isinstance(error, (ValidationError, RequestValidationError)):
        return ApiError(422, validation_details(list(error.errors())))
    if isinstance(error, QueueFullError):
        return ApiError(503, [{"field": None, "message": str(error), "limit": f"max_queued_requests={error.limit}"}],
                        {"Retry-After": str(retry_after_s)})
    if isinstance(error, (EngineClosedError, RequestCancelledError)):
        return ApiError(503, [{"field": None, "message": str(error), "limit": None}],
                        {"Retry-After": str(retry_after_s)})
    if isinstance(error, TimeoutError):
        return ApiError(504, [{"field": "request_timeout_s", "message": "generation did not finish in time",
                               "limit": None}])
    log.exception("request failed", exc_info=error)
    return ApiError(500, [{"field": None, "message": f"internal error: {type(error).__name__}", "limit": None}])


# ---------------------------------------------------------------------------------------------------------------
# Metrics (one registry per replica process)
# ---------------------------------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class _EngineCollector:
    """Engine counters and gauges, read at scrape time."""

    def __init__(self, engine: Any, replica: str, admission: Callable[[], tuple[int, int, int]] | None = None) -> None:
        self.engine = engine
        self.replica = replica
        self.admission = admission  # () -> (requests in the engine, capacity, refused by admission)

    def collect(self):
        stats, replica = self.engine.stats, self.replica
        events = CounterMetricFamily("audiogen_engine_requests", "Engine requests by event",
                                     labels=["replica", "event"])
        for event in ("submitted", "admitted", "finished", "cancelled", "rejected"):
            events.add_metric([replica, event], getattr(stats, event))
        yield events
        yield _counter("audiogen_audio_seconds_generated", "Seconds of audio generated", replica, stats.audio_seconds)
        yield _counter("audiogen_engine_step_seconds", "Time spent in decoding steps", replica, stats.step_seconds)
        steps = CounterMetricFamily("audiogen_engine_steps", "Decoding steps by the number of active slots",
                                    labels=["replica", "active_slots"])
        for active, count in sorted(dict(stats.occupancy_histogram).items()):
            steps.add_metric([replica, str(active)], count)
        yield steps
        yield _gauge("audiogen_queue_depth", "Requests waiting for a slot", replica, self.engine.queue_depth())
        yield _gauge("audiogen_slots_in_use", "Slots decoding a request now", replica,
                     self.engine.snapshot().busy_slots)
        yield _gauge("audiogen_slots_total", "Decoding slots of the engine", replica, stats.max_slots)
        yield _gauge("audiogen_mean_occupancy", "Average active slots per step since start", replica,
                     stats.mean_occupancy)
        yield _gauge("audiogen_max_occupancy", "Most active slots in one step since start", replica,
                     stats.max_occupancy)
        if self.admission is not None:
            in_engine, capacity, refused = self.admission()
            yield _gauge("audiogen_requests_in_engine", "Requests of this replica in its engine (slots + queue)",
                         replica, in_engine)
            yield _gauge("audiogen_request_capacity", "max_batch_slots + max_queued_requests", replica, capacity)
            yield _counter("audiogen_requests_refused", "Requests answered 503 because the replica was full",
                           replica, refused)


def _counter(name: str, doc: str, replica: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["replica"])
    family.add_metric([replica], value)
    return family


def _gauge(name: str, doc: str, replica: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["replica"])
    family.add_metric([replica], value)
    return family


class ServerMetrics:
    """HTTP series (by endpoint and status), latency and time-to-first-byte histograms, engine series."""

    def __init__(self, replica: str = "local") -> None:
        self.replica = replica
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("audiogen_http_requests", "HTTP requests by endpoint and status",
                                ["replica", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("audiogen_http_request_duration_seconds", "Request latency (to the last byte)",
                                 ["replica", "endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_byte = Histogram("audiogen_time_to_first_audio_seconds",
                                    "Time to the first audio bytes (streamed or whole)", ["replica", "endpoint"],
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self._engine: _EngineCollector | None = None

    def attach_engine(self, engine: Any, admission: Callable[[], tuple[int, int, int]] | None = None) -> None:
        if self._engine is not None:
            self.registry.unregister(self._engine)
        self._engine = _EngineCollector(engine, self.replica, admission)
        self.registry.register(self._engine)

    def observe(self, endpoint: str, status: int | str, started: float, first_audio: float | None = None) -> None:
        now = time.perf_counter()
        self.requests.labels(self.replica, endpoint, str(status)).inc()
        self.latency.labels(self.replica, endpoint).observe(now - started)
        if first_audio is not None:
            self.first_byte.labels(self.replica, endpoint).observe(first_audio - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = ServerMetrics()


# ---------------------------------------------------------------------------------------------------------------
# The FastAPI app
# ---------------------------------------------------------------------------------------------------------------
api = FastAPI(
    title="audiogen", version="0.1.0",
    description="Text-to-audio generation (AudioGen/MusicGen) with a continuous-batching engine. Errors: 422 "
                "`{detail: [{field, message, limit}]}` for bad input, 503 + Retry-After when full, 504 on timeout.")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    METRICS.observe(request.url.path, 422, getattr(request.state, "started", time.perf_counter()))
    return ApiError(422, validation_details(list(error.errors()))).response()


_MULTIPART_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["audio"],
    "properties": {"audio": {"type": "string", "format": "binary", "description": "wav/flac/ogg/... file"},
                   "request": {"type": "string", "description": "optional JSON object of the fields below"}},
    "additionalProperties": {"type": "string", "description": "any field of the schema, as text"}}}}}}


def _audio_headers(engine_model: Any, request_id: str, seed: int, fmt: str) -> dict[str, str]:
    # X-Request-Id: added by Serve's proxy (the same id as `request_id`)
    return {"X-Audiogen-Seed": str(seed),
            "X-Audiogen-Model": engine_model["name"], "X-Audiogen-Model-Sha256": engine_model["checksum"],
            "X-Audiogen-Sample-Rate": str(engine_model["sample_rate"]),
            "Content-Disposition": f'inline; filename="{request_id}{SUPPORTED_FORMATS[fmt].extension}"'}


class AudioGenService:
    """One replica: one model, one engine, every request of the replica in it (deployed as `AudioGenServer`).

    A plain importable class, so that Ray pickles it by reference and the replica runs this module's code with
    this module's globals (a decorated class would be pickled by value, its globals frozen at decoration)."""

    def __init__(self, settings: dict[str, Any] | ServerSettings | None = None) -> None:
        import torch

        from audiogen.engine.cpu import reserve_cores_for_engine

        self.settings = load_settings(settings)
        device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(device).type == "cpu":
            reserve_cores_for_engine(self.settings.cpu_threads)
        self.model = self._load_model(device)
        slots, queued = self.settings.max_batch_slots, self.settings.max_queued_requests
        # `_admit` bounds what this replica has in the engine (slots + queue) and answers 503 beyond it, before a
        # request is built; the engine's own queue bound (which does not count requests free slots will take)
        # is the same limit, as a backstop.
        self.engine = self.model.start_engine(
            max_batch_slots=slots, max_queued_requests=queued, compile=self.settings.compile,
            stream_chunk_frames=self.settings.stream_chunk_frames)
        self.capacity, self.in_engine, self.admission_rejected = slots + queued, 0, 0
        meta = self.model.metadata()
        self.info = {"name": meta["name"], "checksum": meta["checksum"], "sample_rate": meta["sample_rate"]}
        self.meta = meta
        try:
            replica = serve.get_replica_context().replica_tag
        except Exception:  # constructed outside Serve (unit use)
            replica = "local"
        METRICS.replica = replica
        METRICS.attach_engine(self.engine, lambda: (self.in_engine, self.capacity, self.admission_rejected))
        log.info("audiogen replica %s ready: %s on %s, %d slots", replica, meta["name"], device,
                 self.settings.max_batch_slots)

    def _load_model(self, device: str):
        from audiogen.loading import open_model

        s = self.settings
        return open_model(s.model_path, backend=s.backend, text_encoder=s.text_encoder, device=device, dtype=s.dtype)

    # ------------------------------------------------------------------ lifecycle
    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine loop died is replaced."""
        snapshot = self.engine.snapshot()
        if not snapshot.alive:
            raise RuntimeError(f"the engine is not running: {snapshot.error or 'shut down'}")

    def __del__(self) -> None:
        """Graceful shutdown (Serve waits for in-flight requests first): stop the engine threads."""
        model = getattr(self, "model", None)
        if model is not None:
            model.close()

    # ------------------------------------------------------------------ endpoints
    @api.get("/healthz", summary="Liveness: 200 while the engine loop runs")
    async def healthz(self) -> JSONResponse:
        try:
            self.check_health()
        except RuntimeError as error:
            return JSONResponse({"status": "unhealthy", "reason": str(error)}, status_code=503)
        return JSONResponse({"status": "ok", "queue_depth": self.engine.queue_depth(),
                             "slots_in_use": self.engine.snapshot().busy_slots})

    @api.get("/v1/models", summary="The loaded model: sample rate, limits, defaults")
    async def models(self) -> JSONResponse:
        m, s = self.meta, self.settings
        limits = {"max_duration": m["max_duration"], "min_duration": 1 / m["frame_rate"],
                  "max_prompt_tokens": m["max_text_tokens"], "max_prompt_chars": MAX_PROMPT_CHARS,
                  "max_seed": MAX_SEED, "temperature": [0, 100], "top_k": [0, m["card"]], "top_p": [0, 1],
                  "guidance_scale": [0, 100], "formats": list(SUPPORTED_FORMATS), "stream_formats":
                      [f for f in STREAM_FORMATS if f in SUPPORTED_FORMATS],
                  "max_upload_bytes": s.max_upload_bytes, "max_upload_seconds": self._max_upload_seconds(),
                  "max_batch_slots": s.max_batch_slots, "max_queued_requests": s.max_queued_requests,
                  "request_timeout_s": s.request_timeout_s}
        model = {"id": m["name"], "checksum": m["checksum"], "sample_rate": m["sample_rate"],
                 "frame_rate": m["frame_rate"], "channels": m["channels"], "source": m["source"],
                 "device": m["device"], "dtype": m["dtype"], "defaults": m["defaults"], "limits": limits}
        return JSONResponse({"data": [model]}, headers={"Cache-Control": "no-store"})

    @api.get("/metrics", summary="Prometheus metrics of this replica", response_class=PlainTextResponse)
    async def metrics(self) -> Response:
        return Response(METRICS.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/stats", summary="Engine counters of this replica (JSON)")
    async def stats(self) -> JSONResponse:
        return JSONResponse({**self.engine.stats.as_dict(), "queue_depth": self.engine.queue_depth(),
                             "slots_in_use": self.engine.snapshot().busy_slots, "in_engine": self.in_engine,
                             "capacity": self.capacity, "admission_rejected": self.admission_rejected})

    @api.post("/v1/generate", summary="Text to audio (whole file, or streamed with stream=true)",
              responses={200: {"content": {f.mime_type: {} for f in SUPPORTED_FORMATS.values()}}})
    async def generate(self, body: GenerateBody, request: Request) -> Response:
        started = time.perf_counter()
        request_id = _request_id(request)
        try:
            sampling = body.sampling()
        except InvalidRequestError as error:
            response = error_from_exception(error, self.settings.retry_after_s).response()
            METRICS.observe("/v1/generate", response.status_code, started)
            return response
        seed = secrets.randbits(63) if sampling.seed is None else sampling.seed  # known before streaming starts
        engine_request = GenerationRequest(prompt=body.prompt, duration=body.duration,
                                           sampling=replace(sampling, seed=seed), request_id=request_id)
        if body.stream:
            return await self._stream(engine_request, body.format, request_id, started)

        async def work() -> Response:
            with self._admit():
                result = await self.engine.generate(engine_request)
            data = await asyncio.to_thread(_encode, result.audio, result.sample_rate, body.format)
            return Response(data, media_type=SUPPORTED_FORMATS[body.format].mime_type,
                            headers={**_audio_headers(self.info, request_id, result.seed, body.format),
                                     "X-Audiogen-Duration": f"{result.duration:.3f}"})

        return await self._answer("/v1/generate", started, work)

    @api.post("/v1/continue", summary="Extend an uploaded recording (multipart: audio + fields)",
              openapi_extra=_MULTIPART_DOC)
    async def continue_(self, request: Request) -> Response:
        started = time.perf_counter()

        async def work() -> Response:
            fields, data = await self._read_upload(request)
            body = ContinueBody.model_validate(fields)
            with self._admit():  # before decoding and encoding: a full replica spends nothing on the upload
                audio, rate = await asyncio.to_thread(self._decode_upload, data)
                edit = await asyncio.to_thread(
                    self.model.continuation_request, audio, rate, body.prompt,
                    extension_seconds=body.extension_seconds, request_id=_request_id(request), sampling=body.sampling())
                result = await self.engine.generate(edit.request)
            return await self._finish_edit(edit, result, body.keep_original, body.format)

        return await self._answer("/v1/continue", started, work)

    @api.post("/v1/inpaint", summary="Regenerate masked spans of an uploaded recording (multipart)",
              openapi_extra=_MULTIPART_DOC)
    async def inpaint(self, request: Request) -> Response:
        started = time.perf_counter()

        async def work() -> Response:
            fields, data = await self._read_upload(request)
            body = InpaintBody.model_validate(fields)
            with self._admit():
                audio, rate = await asyncio.to_thread(self._decode_upload, data)
                mask = _sample_mask(body.mask, audio.shape[-1], rate, self.model.sample_rate,
                                    self.model.codec.hop_length)
                edit = await asyncio.to_thread(self.model.inpaint_request, audio, rate, mask, body.prompt,
                                               request_id=_request_id(request), sampling=body.sampling())
                result = await self.engine.generate(edit.request)
            return await self._finish_edit(edit, result, body.keep_original, body.format)

        return await self._answer("/v1/inpaint", started, work)

    # ------------------------------------------------------------------ helpers
    async def _answer(self, endpoint: str, started: float, work: Callable[[], Awaitable[Response]]) -> Response:
        """Run a handler body under the request timeout; map errors to JSON answers; record metrics. A
        cancelled handler (client gone) cancels its engine request on the way out."""
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                response = await work()
        except asyncio.CancelledError:
            METRICS.observe(endpoint, "cancelled", started)
            raise
        except Exception as error:
            response = error_from_exception(error, self.settings.retry_after_s).response()
        METRICS.observe(endpoint, response.status_code, started,
                        time.perf_counter() if response.status_code == 200 else None)
        return response

    def _take_place(self) -> Callable[[], None]:
        """One of the replica's `max_batch_slots + max_queued_requests` places in the engine, or QueueFullError
        (503). Returns its (idempotent) release. Handlers all run on the replica's event loop thread, so plain
        counters suffice."""
        if self.in_engine >= self.capacity:
            self.admission_rejected += 1
            raise QueueFullError(self.settings.max_queued_requests)
        self.in_engine += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.in_engine -= 1

        return release

    @contextlib.contextmanager
    def _admit(self) -> Iterator[None]:
        release = self._take_place()
        try:
            yield
        finally:
            release()

    async def _finish_edit(self, edit: Any, result: Any, keep_original: bool, fmt: str) -> Response:
        audio = await asyncio.to_thread(edit.finish, result.audio, keep_original=keep_original)
        data = await asyncio.to_thread(_encode, audio, result.sample_rate, fmt)
        return Response(data, media_type=SUPPORTED_FORMATS[fmt].mime_type,
                        headers={**_audio_headers(self.info, result.request_id, result.seed, fmt),
                                 "X-Audiogen-Duration": f"{audio.shape[-1] / result.sample_rate:.3f}"})

    async def _admitted_stream(self, request: GenerationRequest) -> AsyncIterator[np.ndarray]:
        """`engine.stream` holding one of the replica's places. Closing it cancels the engine request (unless
        it finished) and frees the place; so does dropping it unclosed (asyncio finalizes started async
        generators), e.g. when a client leaves before the response body is iterated."""
        release = self._take_place()
        try:
            async with contextlib.aclosing(self.engine.stream(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            release()

    async def _stream(self, engine_request: Any, fmt: str, request_id: str, started: float) -> Response:
        """Submit, wait for the first chunk (so bad input / a full queue is still a JSON error), then stream."""
        endpoint = "/v1/generate"
        if fmt not in STREAM_FORMATS:
            error = ApiError(422, [{"field": "format", "message": f"{fmt} cannot be streamed",
                                    "limit": ", ".join(f for f in STREAM_FORMATS if f in SUPPORTED_FORMATS)}])
            METRICS.observe(endpoint, 422, started)
            return error.response()
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        chunks = self._admitted_stream(engine_request)
        try:
            async with asyncio.timeout_at(deadline):
                first = await anext(chunks)
        except asyncio.CancelledError:
            await chunks.aclose()
            METRICS.observe(endpoint, "cancelled", started)
            raise
        except Exception as error:
            await chunks.aclose()
            response = error_from_exception(error, self.settings.retry_after_s).response()
            METRICS.observe(endpoint, response.status_code, started)
            return response
        first_audio = time.perf_counter()
        channels, rate = first.shape[0], self.info["sample_rate"]

        async def next_chunk() -> np.ndarray | None:
            async with asyncio.timeout_at(deadline):  # never across a yield: the timeout cancels this task
                return await anext(chunks, None)

        async def body() -> AsyncIterator[bytes]:
            status: int | str = 200
            try:
                if fmt == "wav":
                    yield wav_stream_header(rate, channels) + pcm_bytes(first)
                    while (chunk := await next_chunk()) is not None:
                        yield pcm_bytes(chunk)
                else:
                    encoder = OggStreamEncoder(rate, channels, fmt)
                    yield encoder.feed(first)
                    while (chunk := await next_chunk()) is not None:
                        if data := encoder.feed(chunk):
                            yield data
                    yield encoder.close()
            except (asyncio.CancelledError, GeneratorExit):
                status = "cancelled"
                raise
            except TimeoutError:
                status = 504  # the headers are sent: the stream ends early
            except Exception:
                log.exception("stream %s failed", request_id)
                status = 500
            finally:
                await chunks.aclose()  # cancels the engine request unless it finished; frees the place
                METRICS.observe(endpoint, status, started, first_audio)

        media = SUPPORTED_FORMATS[fmt].mime_type
        headers = {**_audio_headers(self.info, request_id, engine_request.sampling.seed, fmt),
                   "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type=media, headers=headers)

    def _max_upload_seconds(self) -> float:
        return self.settings.max_upload_seconds or self.meta["max_duration"]

    async def _read_upload(self, request: Request) -> tuple[dict[str, Any], bytes]:
        """Read a bounded multipart body -> (fields, audio bytes). Oversized bodies are refused while reading."""
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        limit = self.settings.max_upload_bytes
        too_large = ApiError(422, [{"field": "audio", "message": "upload is too large",
                                    "limit": f"at most {limit} bytes"}])
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
            raise too_large
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(422, [{"field": "body", "message": "expected a multipart/form-data upload",
                                  "limit": "multipart/form-data with an `audio` file"}])
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit + 64 * 1024:  # form fields and boundaries on top of the file
                raise too_large
            parts.append(part)
        body = b"".join(parts)

        async def replay() -> AsyncIterator[bytes]:
            yield body

        try:
            form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=MAX_FORM_FIELDS).parse()
        except MultiPartException as error:
            raise ApiError(422, [{"field": "body", "message": f"bad multipart body: {error.message}",
                                  "limit": f"one file, at most {MAX_FORM_FIELDS} fields"}]) from error
        fields: dict[str, Any] = {}
        audio: bytes | None = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "audio":
                    raise ApiError(422, [{"field": key, "message": "unexpected file", "limit": "one file: audio"}])
                audio = await value.read()
            elif key == "request":
                try:
                    parsed = json.loads(value)
                except ValueError:
                    parsed = None
                if not isinstance(parsed, dict):
                    raise ApiError(422, [{"field": "request", "message": "is not a JSON object",
                                          "limit": "a JSON object of the endpoint's fields"}])
                fields = {**parsed, **fields}
            else:
                fields[key] = value
        await form.close()
        if audio is None:
            raise ApiError(422, [{"field": "audio", "message": "no audio file uploaded",
                                  "limit": "a multipart file field named audio"}])
        if len(audio) > limit:
            raise too_large
        return fields, audio

    def _decode_upload(self, data: bytes) -> tuple[np.ndarray, int]:
        return read_audio(data, max_seconds=self._max_upload_seconds())


AudioGenServer = serve.deployment(
    name="AudioGenServer",
    max_ongoing_requests=32,
    max_queued_requests=64,
    backpressure_config={"retry_after_s": 2},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=30,
    ray_actor_options={"num_cpus": 1},
)(serve.ingress(api)(AudioGenService))


def _request_id(request: Request) -> str:
    """Serve's id of this request (the client's X-Request-Id, or one the proxy made up; the proxy also puts it in
    the response's X-Request-Id), so that access logs, engine requests and clients agree."""
    try:
        from ray.serve.context import _get_serve_request_context

        given = _get_serve_request_context().request_id
    except Exception:
        given = ""
    given = given or request.headers.get("x-request-id", "")
    return given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex


def _encode(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    return encode_audio(audio, sample_rate, fmt)


def _sample_mask(mask: list[Any], samples: int, rate: int, model_rate: int, hop: int) -> np.ndarray:
    """The API's mask (spans in seconds, or one boolean per codec frame) -> one boolean per uploaded sample."""
    duration = samples / rate
    if mask and all(isinstance(item, bool) for item in mask):
        frames = math.ceil(math.floor(samples * model_rate / rate) / hop) or 1
        if len(mask) != frames:
            raise InvalidRequestError("mask", f"has {len(mask)} frame flags for {duration:.3f} s of audio",
                                      limit=f"one entry per codec frame ({frames})")
        frame_rate = model_rate / hop
        spans = [(i / frame_rate, (i + 1) / frame_rate) for i, flag in enumerate(mask) if flag]
    else:
        spans = [tuple(span) for span in mask]
        for index, (start, end) in enumerate(spans):
            if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end <= duration + 1e-6):
                raise InvalidRequestError(f"mask[{index}]", f"span [{start}, {end}] does not fit the audio",
                                          limit=f"0 <= start < end <= {duration:.3f} s")
    if not spans:
        raise InvalidRequestError("mask", "selects nothing to regenerate", limit="at least one span or True frame")
    times = np.arange(samples) / rate
    selected = np.zeros(samples, dtype=bool)
    for start, end in spans:
        selected |= (times >= start) & (times < end)
    if not selected.any():
        raise InvalidRequestError("mask", "selects no sample of the audio", limit="spans covering a sample")
    return selected


# ---------------------------------------------------------------------------------------------------------------
# Applications and local runs
# ---------------------------------------------------------------------------------------------------------------
DEPLOYMENT_OPTIONS = ("num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests",
                      "max_queued_requests", "backpressure_config", "health_check_period_s",
                      "health_check_timeout_s", "graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s",
                      "user_config", "max_replicas_per_node", "placement_group_bundles",
                      "placement_group_strategy", "logging_config")


def make_app(settings: dict[str, Any] | ServerSettings | None = None,
             deployment_options: dict[str, Any] | None = None) -> Application:
    """The Serve application: settings are the replica's args, `deployment_options` override the decorator's."""
    settings = load_settings(settings)
    options = {k: v for k, v in (deployment_options or {}).items() if k != "name"}
    unknown = set(options) - set(DEPLOYMENT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown deployment options: {sorted(unknown)}")
    deployment = AudioGenServer.options(**options) if options else AudioGenServer
    return deployment.bind(settings.model_dump())


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for `serve run` / serve_config.yaml (`import_path: pipelines.serve:build_app`)."""
    return make_app(args)


def unbatched_app(args: dict[str, Any] | None = None, deployment_options: dict[str, Any] | None = None
                  ) -> Application:
    """The baseline of benchmarks/serve_load.py: one request per replica call, no batching."""
    settings = {**(args or {}), "max_batch_slots": 1, "max_queued_requests": 0}
    return make_app(settings, {**(deployment_options or {}), "max_ongoing_requests": 1})


def load_config(path: str | Path = DEFAULT_CONFIG, *, args: dict[str, Any] | None = None,
                deployment_options: dict[str, Any] | None = None, http_options: dict[str, Any] | None = None
                ) -> tuple[dict[str, Any], Application, dict[str, Any]]:
    """Read serve_config.yaml (its first application), apply overrides -> (http_options, app, run kwargs)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(path).read_text())
    ServeDeploySchema.model_validate(raw)  # the same validation `serve run`/`serve deploy` applies
    application = raw["applications"][0]
    if application.get("import_path") != "pipelines.serve:build_app":
        raise ValueError(f"{path}: expected import_path pipelines.serve:build_app, "
                         f"got {application.get('import_path')}")
    options = dict((application.get("deployments") or [{}])[0])
    for key, value in (deployment_options or {}).items():  # dicts (ray_actor_options ...) are merged
        both = isinstance(value, dict) and isinstance(options.get(key), dict)
        options[key] = {**options[key], **value} if both else value
    if "num_replicas" in (deployment_options or {}):
        options.pop("autoscaling_config", None)
    app = make_app({**(application.get("args") or {}), **(args or {})}, options)
    http = {**(raw.get("http_options") or {}), **(http_options or {})}
    run = {"name": application.get("name", "audiogen"), "route_prefix": application.get("route_prefix", "/")}
    return http, app, run


def run_local(config: str | Path | None = DEFAULT_CONFIG, *, args: dict[str, Any] | None = None,
              deployment_options: dict[str, Any] | None = None, http_options: dict[str, Any] | None = None,
              blocking: bool = True) -> None:
    """Start Ray (local unless RAY_ADDRESS says otherwise) and Serve, deploy, and block until Ctrl-C."""
    import ray

    if config is not None:
        http, app, run = load_config(config, args=args, deployment_options=deployment_options,
                                     http_options=http_options)
    else:
        http, app = dict(http_options or {}), make_app(args, deployment_options)
        run = {"name": "audiogen", "route_prefix": "/"}
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options=http)
    serve.run(app, blocking=False, **run)
    host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)
    print(f"audiogen serving on http://{host}:{port} (docs at /docs); Ctrl-C stops", flush=True)
    if not blocking:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()

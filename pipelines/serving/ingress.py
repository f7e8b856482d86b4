"""`AudioGenIngress`: the HTTP API (FastAPI), a light deployment in front of the engine replicas.

It answers `/healthz`, `/readyz`, `/v1/models`, `/v1/stats` and `/metrics` itself (from its own state, the
`EngineBoard` and Ray's metrics export), so they are never queued behind generation: its `max_ongoing_requests`
is far above what generation can hold in it (`pipelines.serving.app` checks). Generation requests are read
(bounded), validated here (bad input never reaches an engine replica) and forwarded through a DeploymentHandle
with the model id as `multiplexed_model_id`; a full handle refuses at once (503 + Retry-After). Every error has
the JSON shape of `api`'s description below, made by the exception handlers.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.context import _get_serve_request_context
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from audiogen.errors import InvalidRequestError

from pipelines.serving.metrics import AUDIO_ROUTES, HttpMetrics, node_metrics_url, scrape
from pipelines.serving.replica import resolve_model
from pipelines.serving.schemas import ApiError, ContinueBody, GenerateBody, InpaintBody, api_error, busy, detail
from pipelines.serving.settings import AppSettings
from pipelines.serving.uploads import parse_multipart

T = TypeVar("T")
MAX_JSON_BODY = 64 * 1024  # bytes; a prompt is at most 2000 characters
MULTIPART_OVERHEAD = 64 * 1024  # form fields and boundaries on top of the file

api = FastAPI(
    title="audiogen", version="0.2.0",
    description="Text-to-audio generation (AudioGen/MusicGen) with a continuous-batching engine. Errors: "
                "`{detail: [{field, message, limit}]}`: 422 bad input, 413 body too large, 503 + Retry-After when "
                "full, 504 on timeout.")
api.add_middleware(HttpMetrics, routes=frozenset({"/healthz", "/readyz", "/metrics", "/v1/models", "/v1/stats"})
                   | AUDIO_ROUTES)


@api.exception_handler(Exception)
@api.exception_handler(ValidationError)
@api.exception_handler(InvalidRequestError)
@api.exception_handler(ApiError)
async def _error_answer(request: Request, error: Exception) -> JSONResponse:
    """Every refused request's answer (Serve installs its own handler for BackPressureError: see `_forward`)."""
    return api_error(error, AppSettings().retry_after_s).response()


# OpenAPI of the bodies the handlers read themselves (bounded read, then `model_validate_json` or the multipart parser)
_GENERATE_DOC = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": GenerateBody.model_json_schema()}}}}
_MULTIPART_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["audio"],
    "properties": {"audio": {"type": "string", "format": "binary", "description": "wav/flac/ogg/... file"},
                   "request": {"type": "string", "description": "optional JSON object of the fields below"}},
    "additionalProperties": {"type": "string", "description": "any field of the schema, as text"}}}}}}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 beyond `limit` bytes: by Content-Length before reading, else while
    reading (so a huge or endless body never sits in memory)."""
    too_large = ApiError(413, [detail("body", "request body is too large", f"at most {limit} bytes")])
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


def request_id(request: Request) -> str:
    """Serve's id of this request (the client's X-Request-Id, or one the proxy made up; the proxy also puts it in
    the response's X-Request-Id), so that access logs, engine requests and clients agree."""
    given = _get_serve_request_context().request_id or request.headers.get("x-request-id", "")
    return given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex


class AudioGenIngress:
    """The HTTP ingress (deployed by `pipelines.serving.app`; its routes are `api`'s, see the end of the module)."""

    def __init__(self, args: dict[str, Any], engine: DeploymentHandle, board: DeploymentHandle) -> None:
        self.settings = AppSettings.from_args(args)
        self.models = self.settings.model_table()
        self.engine = engine
        self.board = board
        self._metrics_url: str | None = None

    @api.get("/healthz", summary="Liveness of the HTTP layer: answered at once, whatever the load")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: 200 while at least one engine replica reports a live engine")
    async def readyz(self) -> dict[str, Any]:
        view = await self._view()
        ready = [replica for replica, models in view.items() if any(m["snapshot"]["alive"] for m in models.values())]
        if not ready:
            raise busy("no engine replica is ready", self.settings.retry_after_s)
        return {"status": "ready", "replicas": len(ready)}

    @api.get("/v1/models", summary="The models served: ids, and for loaded ones rates, defaults and limits")
    async def list_models(self) -> JSONResponse:
        loaded = {model_id: m["info"] for models in (await self._view()).values() for model_id, m in models.items()}
        data = [{"id": model_id, "loaded": model_id in loaded, **loaded.get(model_id, {})} for model_id in self.models]
        return JSONResponse({"data": data}, headers={"Cache-Control": "no-store"})

    @api.get("/v1/stats", summary="Engine snapshots by replica and model, and their totals (JSON)")
    async def stats(self) -> dict[str, Any]:
        view = await self._view()
        snapshots = [m["snapshot"] for models in view.values() for m in models.values()]
        totals = {key: sum(s[key] for s in snapshots) for key in ("busy_slots", "queue_depth", "steps",
                                                                   "audio_seconds")}
        return {"replicas": {replica: {model_id: m["snapshot"] for model_id, m in models.items()}
                             for replica, models in view.items()}, "totals": totals}

    @api.get("/metrics", summary="Prometheus text: this node's audiogen and Serve series (Ray's metrics export)",
             response_class=PlainTextResponse)
    async def metrics(self) -> Response:
        try:
            if self._metrics_url is None:
                self._metrics_url = await asyncio.to_thread(node_metrics_url)
            text = await asyncio.to_thread(scrape, self._metrics_url)
        except OSError as error:
            raise busy(f"Ray's metrics export is not reachable: {error}", self.settings.retry_after_s) from None
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.post("/v1/generate", summary="Text to audio (whole file, or streamed with stream=true)",
              openapi_extra=_GENERATE_DOC,
              responses={200: {"content": {"audio/wav": {}, "audio/flac": {}, "audio/ogg": {}}}})
    async def generate(self, request: Request) -> Response:
        body = self._routed(GenerateBody.model_validate_json(await read_body(request, MAX_JSON_BODY)))
        handle = self.engine.options(multiplexed_model_id=body.model)
        if body.stream:
            return await self._stream(handle.options(stream=True).stream.remote(body, request_id(request)))
        return (await self._forward(handle.generate.remote(body, request_id(request)))).response()

    @api.post("/v1/continue", summary="Extend an uploaded recording (multipart: audio + fields)",
              openapi_extra=_MULTIPART_DOC)
    async def continue_audio(self, request: Request) -> Response:
        return await self._edit(request, ContinueBody, "continue_audio")

    @api.post("/v1/inpaint", summary="Regenerate masked spans of an uploaded recording (multipart)",
              openapi_extra=_MULTIPART_DOC)
    async def inpaint(self, request: Request) -> Response:
        return await self._edit(request, InpaintBody, "inpaint")

    async def _edit(self, request: Request, schema: type[ContinueBody | InpaintBody], method: str) -> Response:
        data = await read_body(request, self.settings.max_upload_bytes + MULTIPART_OVERHEAD)
        fields, audio = await asyncio.to_thread(parse_multipart, request.headers, data)
        body = self._routed(schema.model_validate(fields))
        call = getattr(self.engine.options(multiplexed_model_id=body.model), method)
        return (await self._forward(call.remote(body, audio, request_id(request)))).response()

    def _routed(self, body: T) -> T:
        """`body` with its model id resolved (`resolve_model`: refused here when unknown); the body and the
        serve_multiplexed_model_id header may not name two models."""
        named, header = body.model, serve.get_multiplexed_model_id()  # type: ignore[attr-defined]
        if named and header and named != header:
            raise InvalidRequestError("model", f"the body names {named!r}, the header {header!r}",
                                      limit="one model per request")
        return body.model_copy(update={"model": resolve_model(named, self.models)})  # type: ignore[attr-defined]

    async def _forward(self, call: Awaitable[T]) -> T:
        """Await an engine call; full engine replicas (Serve's bound) become our 503 + Retry-After answer."""
        try:
            return await call
        except (BackPressureError, DeploymentUnavailableError) as error:
            raise busy(f"the engine replicas are full: {error}", self.settings.retry_after_s,
                       "max_ongoing_requests + max_queued_requests of AudioGenEngine") from None

    async def _view(self) -> dict[str, dict[str, Any]]:
        try:
            return await asyncio.wait_for(self.board.view.remote(), 5.0)
        except Exception as error:
            raise busy(f"engine state is not available: {error}", self.settings.retry_after_s) from None

    async def _stream(self, chunks: DeploymentResponseGenerator) -> Response:
        """Wait for the stream's head (so a refused or invalid request is still a JSON answer), then relay the
        audio; a client that leaves cancels the engine replica's generator, which frees the slot."""
        try:
            head = await self._forward(anext(chunks))
        except BaseException:
            chunks.cancel()
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                async for data in chunks:
                    yield data
            finally:
                chunks.cancel()

        return StreamingResponse(body(), media_type=head.media_type,
                                 headers={**head.headers, "Cache-Control": "no-store", "X-Accel-Buffering": "no"})


# Decorated at import: Serve pickles the wrapper by its name, so the replica, importing this module, must find the
# same wrapper (and routes) under it.
AudioGenIngress = serve.ingress(api)(AudioGenIngress)  # type: ignore[misc]

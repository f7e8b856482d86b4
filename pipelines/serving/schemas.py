"""The HTTP API's request bodies, results and error answers, shared by the ingress and the engine replicas.

Sampling fields are generated from `audiogen.sampling_params.SamplingParams` (types and descriptions from its
dataclass fields) and validated by constructing it, so ranges, defaults and messages exist once. Every way a body
can be wrong ends as a pydantic error, and `validation_details` turns those into the API's 422 body
`{"detail": [{field, message, limit}]}`: a `SamplingParams` `InvalidRequestError` keeps its field and limit.
Floats are finite (`allow_inf_nan=False`): Python's JSON parser accepts NaN and Infinity, the API does not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from audiogen.errors import EngineClosedError, InvalidRequestError, QueueFullError, RequestCancelledError
from audiogen.io import SUPPORTED_FORMATS
from audiogen.sampling_params import SamplingParams

from pipelines.serving.settings import DEFAULT_MODEL_ID

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000  # characters; the model's token limit is checked by the engine
STREAM_FORMATS = tuple(f for f in ("wav", "ogg", "opus") if f in SUPPORTED_FORMATS)  # FLAC needs a seekable file
AudioFormatName = Literal[tuple(SUPPORTED_FORMATS)]  # type: ignore[valid-type]


class _Body(BaseModel):
    """Fields every endpoint takes; the sampling fields are added from `SamplingParams` below."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())

    model: str | None = Field(None, max_length=200, description=f"model id (GET /v1/models; default: "
                              f"`{DEFAULT_MODEL_ID}`, or the serve_multiplexed_model_id header)")
    format: AudioFormatName = Field("wav", description="audio format of the answer")

    def sampling(self) -> SamplingParams:
        return SamplingParams.from_mapping(self.model_dump())

    @model_validator(mode="after")
    def _valid_sampling(self) -> "_Body":
        self.sampling()  # raises InvalidRequestError naming the field (see validation_details)
        return self


_SAMPLING_HINTS = typing.get_type_hints(SamplingParams)
SamplingFields = create_model("SamplingFields", __base__=_Body, **{
    f.name: (_SAMPLING_HINTS[f.name], Field(f.default, description=f.metadata.get("help")))
    for f in dataclasses.fields(SamplingParams)})


class GenerateBody(SamplingFields):  # type: ignore[misc, valid-type]
    """`POST /v1/generate`."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="text description of the sound")
    duration: float | None = Field(None, description="seconds; 0 < duration <= the model's max_duration")
    stream: bool = Field(False, description=f"chunked audio sent while frames are decoded ({', '.join(STREAM_FORMATS)})")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise InvalidRequestError("prompt", "is empty", limit="at least one non-space character")
        return value

    @model_validator(mode="after")
    def _streamable(self) -> "GenerateBody":
        if self.stream and self.format not in STREAM_FORMATS:
            raise InvalidRequestError("format", f"{self.format} cannot be streamed", limit=", ".join(STREAM_FORMATS))
        return self


class ContinueBody(SamplingFields):  # type: ignore[misc, valid-type]
    """Form fields of `POST /v1/continue` (besides the `audio` file)."""

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="optional text condition")
    extension_seconds: float = Field(5.0, description="seconds to add after the upload")
    keep_original: bool = Field(True, description="return the upload itself + the extension (else resynthesis)")


class InpaintBody(SamplingFields):  # type: ignore[misc, valid-type]
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
                raise InvalidRequestError("mask", "is not valid JSON",
                                          limit="[[start_s, end_s], ...] or [true, false, ...]") from None
        return value


# Results: what engine replicas return to the ingress and to DeploymentHandle callers
@dataclass(frozen=True)
class Clip:
    """A finished clip, encoded: the HTTP answer's body, content type and `X-Audiogen-*` headers."""

    data: bytes
    media_type: str
    headers: dict[str, str]

    def response(self) -> Response:
        return Response(self.data, media_type=self.media_type, headers=self.headers)


@dataclass(frozen=True)
class StreamHead:
    """The first item of a streamed answer (then bytes): sent once the first audio exists, so that every error
    before it is still a JSON answer."""

    media_type: str
    headers: dict[str, str]


class ApiError(Exception):
    """An answer other than 200 with the `{"detail": [{field, message, limit}]}` body. Engine replicas raise it
    (it pickles across Ray); DeploymentHandle callers catch it and read `status` and `details`."""

    def __init__(self, status: int, details: list[dict[str, Any]], headers: dict[str, str] | None = None) -> None:
        super().__init__(status, details, headers)
        self.status = status
        self.details = details
        self.headers = headers or {}

    def __str__(self) -> str:
        return f"{self.status}: " + "; ".join(str(d.get("message")) for d in self.details)

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.details}, status_code=self.status, headers=self.headers)


def detail(field: str | None, message: str, limit: str | None = None) -> dict[str, Any]:
    return {"field": field, "message": message, "limit": limit}


def busy(message: str, retry_after_s: int, limit: str | None = None) -> ApiError:
    """503 + Retry-After: full, or not able to serve right now."""
    return ApiError(503, [detail(None, message, limit)], {"Retry-After": str(retry_after_s)})


_TYPE_LIMITS = (("int", "an integer"), ("float", "a number"), ("finite", "a finite number"),
                ("bool", "true or false"), ("string", "a string"), ("missing", "required"),
                ("extra", "no such field"), ("json", "a JSON object"), ("model", "a JSON object"),
                ("dict", "a JSON object"), ("list", "a JSON array"))


def _limit(error: dict[str, Any]) -> str | None:
    ctx = error.get("ctx") or {}
    for key, text in (("max_length", "at most {} characters"), ("min_length", "at least {} characters"),
                      ("ge", ">= {}"), ("gt", "> {}"), ("le", "<= {}"), ("lt", "< {}"), ("expected", "one of {}")):
        if key in ctx:
            return text.format(ctx[key])
    kind = str(error.get("type", ""))
    return next((text for prefix, text in _TYPE_LIMITS if kind.startswith(prefix)), None)


def validation_details(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic errors -> [{field, message, limit}]: the field path without FastAPI's `body` prefix; an
    `InvalidRequestError` raised by a validator (SamplingParams, prompt, mask ...) keeps its own field and limit."""
    details = []
    for error in errors:
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRequestError):
            details.append(detail(cause.field, str(cause), cause.limit))
            continue
        # union members (list[tuple] | list[bool]) add their type names to the path: keep the user's names
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        loc = [part for part in loc if not part.startswith(("list[", "tuple["))]
        details.append(detail(".".join(loc) or "body", error.get("msg", "invalid"), _limit(error)))
    return details


def api_error(error: BaseException, retry_after_s: int) -> ApiError:
    """Any failure of a request -> the answer it gets (unexpected ones are logged and become 500)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, InvalidRequestError):
        return ApiError(422, [detail(error.field, str(error), error.limit)])
    if isinstance(error, ValidationError):
        return ApiError(422, validation_details(list(error.errors())))
    if isinstance(error, QueueFullError):
        return busy(str(error), retry_after_s, f"max_queued_requests={error.limit}")
    if isinstance(error, (EngineClosedError, RequestCancelledError)):
        return busy(str(error), retry_after_s)
    if isinstance(error, TimeoutError):
        return ApiError(504, [detail("request_timeout_s", "generation did not finish in time")])
    log.error("request failed", exc_info=error)
    return ApiError(500, [detail(None, f"internal error: {type(error).__name__}")])

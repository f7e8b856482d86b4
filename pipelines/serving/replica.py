"""`AudioGenEngine`: an engine replica, serving the models requests name (multiplexed by id), one engine each.

Every request a replica holds for a model is a request in that model's engine, so concurrent requests share
decoding steps (continuous batching, not `@serve.batch`). The ingress calls these methods through a
DeploymentHandle, and so can Python callers and batch jobs (README, "Online serving"). Results are encoded audio
(`Clip`; `stream` yields a `StreamHead`, then bytes); failures raise `ApiError` carrying the HTTP status and
`{field, message, limit}` details. Decoding uploads, building masks, codec encoding and audio encoding (Ogg
pages included) run in worker threads, so the event loop keeps answering while they run.

Bounds are `pipelines.serving.app`'s. A model unloaded to make room for another (least recently used, beyond
`max_models_per_replica`) stops its engine: its in-flight requests get 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from audiogen.engine import Engine, EngineSnapshot, GenerationRequest, GenerationResult
from audiogen.engine.cpu import reserve_cores_for_engine
from audiogen.errors import InvalidRequestError, QueueFullError
from audiogen.io import SUPPORTED_FORMATS, OggStreamEncoder, encode_audio, pcm_bytes, read_audio, wav_stream_header
from audiogen.loading import open_model
from audiogen.model import AudioEdit, AudioGen
from audiogen.sampling_params import MAX_GUIDANCE, MAX_SEED, MAX_TEMPERATURE

from pipelines.serving.autoscaling import LOAD_KEY
from pipelines.serving.board import REPORT_PERIOD_S
from pipelines.serving.metrics import EngineMetrics
from pipelines.serving.schemas import (MAX_PROMPT_CHARS, STREAM_FORMATS, Clip, ContinueBody, GenerateBody,
                                       InpaintBody, StreamHead, api_error)
from pipelines.serving.settings import DEFAULT_MODEL_ID, AppSettings
from pipelines.serving.uploads import sample_mask

log = logging.getLogger(__name__)
T = TypeVar("T")


def resolve_model(named: str | None, known: Iterable[str]) -> str:
    """A request's model id: the one it names, else the serve_multiplexed_model_id header's, else the default;
    unknown ids are refused (422 naming `model`)."""
    model_id = named or serve.get_multiplexed_model_id() or DEFAULT_MODEL_ID
    if model_id not in known:
        raise InvalidRequestError("model", f"unknown model {model_id!r}", limit=", ".join(sorted(known)))
    return model_id


def engine_load(snapshots: Iterable[EngineSnapshot]) -> dict[str, float]:
    """The autoscaling signal of a replica: requests in its engines (decoding or waiting for a slot)."""
    return {LOAD_KEY: float(sum(snapshot.in_flight for snapshot in snapshots))}


@dataclass
class LoadedModel:
    """A model a replica serves: its engine and its `/v1/models` description. Serve calls `__del__` when it
    unloads the model (least recently used); that stops the engine."""

    id: str
    model: AudioGen
    engine: Engine
    info: dict[str, Any]
    closed: bool = False

    def prepare_edit(self, body: ContinueBody | InpaintBody, upload: bytes, request_id: str | None) -> AudioEdit:
        """Decode the upload, build the mask, encode the codes (blocking: run in a worker thread)."""
        audio, rate = read_audio(upload, max_seconds=self.info["limits"]["max_upload_seconds"])
        if isinstance(body, InpaintBody):
            mask = sample_mask(body.mask, audio.shape[-1], rate, self.model.sample_rate, self.model.codec.hop_length)
            return self.model.inpaint_request(audio, rate, mask, body.prompt, sampling=body.sampling(),
                                              request_id=request_id)
        return self.model.continuation_request(audio, rate, body.prompt, extension_seconds=body.extension_seconds,
                                               sampling=body.sampling(), request_id=request_id)

    def headers(self, request_id: str, seed: int, fmt: str) -> dict[str, str]:
        # X-Request-Id: added by Serve's proxy (the id the engine request carries)
        return {"X-Audiogen-Seed": str(seed), "X-Audiogen-Model": self.id,
                "X-Audiogen-Model-Sha256": self.info["checksum"], "X-Audiogen-Sample-Rate": str(self.info["sample_rate"]),
                "Content-Disposition": f'inline; filename="{request_id}{SUPPORTED_FORMATS[fmt].extension}"'}

    def clip(self, data: bytes, fmt: str, result: GenerationResult, seconds: float) -> Clip:
        return Clip(data, SUPPORTED_FORMATS[fmt].mime_type,
                    {**self.headers(result.request_id, result.seed, fmt), "X-Audiogen-Duration": f"{seconds:.3f}"})

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.model.close()

    __del__ = close


def describe(model_id: str, model: AudioGen, settings: AppSettings) -> dict[str, Any]:
    """A model's `/v1/models` entry: identity, rates, defaults and every limit a request meets."""
    m = model.metadata()
    limits = {"max_duration": m["max_duration"], "min_duration": 1 / m["frame_rate"],
              "max_prompt_tokens": m["max_text_tokens"], "max_prompt_chars": MAX_PROMPT_CHARS, "max_seed": MAX_SEED,
              "temperature": [0, MAX_TEMPERATURE], "top_k": [0, m["card"]], "top_p": [0, 1],
              "guidance_scale": [0, MAX_GUIDANCE], "formats": list(SUPPORTED_FORMATS),
              "stream_formats": list(STREAM_FORMATS), "max_upload_bytes": settings.max_upload_bytes,
              "max_upload_seconds": settings.max_upload_seconds or m["max_duration"],
              "max_batch_slots": settings.max_batch_slots, "queue_per_engine": settings.queue_per_engine,
              "request_timeout_s": settings.request_timeout_s}
    return {"id": model_id, "name": m["name"], "checksum": m["checksum"], "sample_rate": m["sample_rate"],
            "frame_rate": m["frame_rate"], "channels": m["channels"], "source": m["source"], "device": m["device"],
            "dtype": m["dtype"], "defaults": m["defaults"], "limits": limits}


class AudioGenEngine:
    """An engine replica (deployed by `pipelines.serving.app`). A plain importable class, so that Ray pickles it
    by reference and the replica runs this module's code."""

    async def __init__(self, args: dict[str, Any], board: DeploymentHandle) -> None:
        self.settings = AppSettings.from_args(args)
        self.table = self.settings.model_table()
        self.device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(self.device).type == "cpu":
            reserve_cores_for_engine(self.settings.cpu_threads)
        self.loaded: dict[str, LoadedModel] = {}
        self.metrics = EngineMetrics()
        self._board = board
        self._replica = serve.get_replica_context().replica_tag

        async def load(model_id: str) -> LoadedModel:
            self.loaded[model_id] = await asyncio.to_thread(self._open, model_id)
            return self.loaded[model_id]

        self._model = serve.multiplexed(max_num_models_per_replica=self.settings.max_models_per_replica)(load)
        await self._model(DEFAULT_MODEL_ID)  # ready before the replica takes traffic
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    def _open(self, model_id: str) -> LoadedModel:
        s = self.settings
        model = open_model(self.table[model_id], backend=s.backend, text_encoder=s.text_encoder, device=self.device,
                           dtype=s.dtype)
        engine = model.start_engine(max_batch_slots=s.max_batch_slots, max_queued_requests=s.queue_per_engine,
                                    compile=s.compile, stream_chunk_frames=s.stream_chunk_frames)
        info = describe(model_id, model, s)
        log.info("replica %s loaded model %s (%s) on %s", self._replica, model_id, info["name"], self.device)
        return LoadedModel(model_id, model, engine, info)

    # ------------------------------------------------------------------ the handle API
    async def generate(self, body: GenerateBody | dict[str, Any], request_id: str | None = None) -> Clip:
        """One clip, whole (`body.stream` is ignored: call `stream` to stream)."""
        async def work() -> Clip:
            request, loaded, fmt = await self._request(body, request_id)
            result = await loaded.engine.generate(request)
            data = await asyncio.to_thread(encode_audio, result.audio, result.sample_rate, fmt)
            return loaded.clip(data, fmt, result, result.duration)

        return await self._answer(work())

    async def stream(self, body: GenerateBody | dict[str, Any], request_id: str | None = None
                     ) -> AsyncIterator[StreamHead | bytes]:
        """A `StreamHead` once the first audio exists (every error before it is an `ApiError`), then the encoded
        audio as the engine decodes it (WAV header + PCM, or Ogg pages). Closing the stream, or its caller
        going away, cancels the engine request and frees its slot at the next step."""
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        request, loaded, fmt = await self._answer(self._request(body, request_id, draw_seed=True))
        async with contextlib.aclosing(loaded.engine.stream(request)) as chunks:
            first = await self._answer(anext(chunks), deadline)
            yield StreamHead(SUPPORTED_FORMATS[fmt].mime_type,
                             loaded.headers(request.request_id, request.sampling.seed, fmt))
            rate, channels = loaded.info["sample_rate"], first.shape[0]
            ogg = OggStreamEncoder(rate, channels, fmt) if fmt != "wav" else None
            if ogg is None:  # WAV: a header without a length, then plain PCM
                yield wav_stream_header(rate, channels)
            chunk: np.ndarray | None = first
            while chunk is not None:
                if data := await asyncio.to_thread(ogg.feed if ogg else pcm_bytes, chunk):
                    yield data
                async with asyncio.timeout_at(deadline):  # never across a yield: the timeout cancels this task
                    chunk = await anext(chunks, None)
            if ogg and (data := await asyncio.to_thread(ogg.close)):
                yield data

    async def continue_audio(self, body: ContinueBody | dict[str, Any], audio: bytes,
                             request_id: str | None = None) -> Clip:
        """Extend an uploaded recording (`audio`: the file's bytes, any format libsndfile reads)."""
        return await self._answer(self._edit(ContinueBody, body, audio, request_id))

    async def inpaint(self, body: InpaintBody | dict[str, Any], audio: bytes, request_id: str | None = None) -> Clip:
        """Regenerate the masked parts of an uploaded recording."""
        return await self._answer(self._edit(InpaintBody, body, audio, request_id))

    async def state(self) -> dict[str, Any]:
        """Model id -> {"snapshot": its engine's snapshot, "info": its description} of this replica."""
        return {model_id: {"snapshot": dataclasses.asdict(snapshot), "info": self.loaded[model_id].info}
                for model_id, snapshot in self._snapshots().items()}

    # ------------------------------------------------------------------ Serve hooks
    async def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine died (a failed step) is replaced."""
        for model_id, snapshot in self._snapshots().items():
            if not snapshot.alive:
                raise RuntimeError(f"the engine of model {model_id} is not running: {snapshot.error}")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (see `pipelines.serving.autoscaling`)."""
        return engine_load(self._snapshots().values())

    def __del__(self) -> None:
        """Graceful shutdown (Serve waits for in-flight requests first): stop the engines' threads."""
        if getattr(self, "_reporter", None) is not None:
            self._reporter.cancel()
        for loaded in getattr(self, "loaded", {}).values():
            loaded.close()

    # ------------------------------------------------------------------ helpers
    async def _request(self, body: GenerateBody | dict[str, Any], request_id: str | None, draw_seed: bool = False
                       ) -> tuple[GenerationRequest, LoadedModel, str]:
        body = GenerateBody.model_validate(body)
        loaded = await self._model(resolve_model(body.model, self.table))
        sampling = body.sampling()
        if draw_seed and sampling.seed is None:  # a stream's headers name the seed before the result exists
            sampling = replace(sampling, seed=secrets.randbits(63))
        request = GenerationRequest(prompt=body.prompt, duration=body.duration, sampling=sampling,
                                    request_id=request_id or secrets.token_hex(16))
        return request, loaded, body.format

    async def _edit(self, schema: type[ContinueBody | InpaintBody], body: Any, upload: bytes,
                    request_id: str | None) -> Clip:
        body = schema.model_validate(body)
        loaded = await self._model(resolve_model(body.model, self.table))
        snapshot = loaded.engine.snapshot()
        if snapshot.in_flight >= snapshot.capacity:  # 503 before spending anything on the upload (submit is the bound)
            raise QueueFullError(snapshot.max_queued)
        edit = await asyncio.to_thread(loaded.prepare_edit, body, upload, request_id)
        result = await loaded.engine.generate(edit.request)

        def finish() -> tuple[bytes, float]:
            audio = edit.finish(result.audio, keep_original=body.keep_original)
            return encode_audio(audio, result.sample_rate, body.format), audio.shape[-1] / result.sample_rate

        data, seconds = await asyncio.to_thread(finish)
        return loaded.clip(data, body.format, result, seconds)

    async def _answer(self, work: Awaitable[T], deadline: float | None = None) -> T:
        """`work` under the request timeout, its failures as `ApiError` (which pickles back to the caller)."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                return await work
        except Exception as error:
            raise api_error(error, self.settings.retry_after_s) from None

    def _snapshots(self) -> dict[str, EngineSnapshot]:
        """Snapshots of the engines of the models still loaded (unloaded ones are dropped here)."""
        self.loaded = {model_id: loaded for model_id, loaded in self.loaded.items() if not loaded.closed}
        return {model_id: loaded.engine.snapshot() for model_id, loaded in self.loaded.items()}

    async def _report_forever(self) -> None:
        """Post this replica's state to the `EngineBoard` and set its metrics, every `REPORT_PERIOD_S`."""
        while True:
            for model_id, snapshot in self._snapshots().items():
                self.metrics.publish(model_id, snapshot)
            try:
                await asyncio.wait_for(self._board.report.remote(self._replica, await self.state()), 5.0)
            except Exception as error:  # the board restarting: the next report goes through
                log.warning("could not report to the engine board: %s", error)
            await asyncio.sleep(REPORT_PERIOD_S)

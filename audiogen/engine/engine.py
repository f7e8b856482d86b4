"""The continuous-batching generation engine: the one place where audio is generated.

Each iteration admits queued requests into free slots (text encoded once, in a batch; cross-attention
keys/values stored once; known prefixes prefilled), runs one decoding step for every active slot, then retires
finished slots (their codes go to the audio decoder) and refills them at the next iteration.
Requests with different durations, seeds and sampling parameters share every step, so a short clip never waits
for a long one and a new request never waits for a batch to drain (static batching does both).

`AudioGen.generate*` goes through `run` (stepping in the caller's thread); the batch renderer and the HTTP
server through `generate`/`stream` (a background loop thread).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent import futures
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from audiogen.engine.audio import AudioDecoder
from audiogen.engine.cpu import engine_threads
from audiogen.engine.handle import GenerationResult, RequestHandle
from audiogen.engine.memory import check_memory_budget
from audiogen.engine.request import GenerationRequest, resolve_request
from audiogen.engine.runner import SlotBatch
from audiogen.engine.stats import EngineSnapshot, EngineStats
from audiogen.errors import EngineClosedError, InvalidConfigError, QueueFullError

if TYPE_CHECKING:
    from audiogen.model import AudioGen

log = logging.getLogger(__name__)

ADMISSION_ORDERS = ("arrival", "longest_first")


class Engine:
    """Iteration-level batching over a fixed set of decoding slots, on the model's device and dtype.

    max_batch_slots: requests decoded at once (each uses two cache rows for classifier-free guidance).
    max_steps_per_slot: KV-cache positions per slot; at least the model's window + delay tail.
    max_queued_requests: bound of the waiting queue; `submit` raises `QueueFullError` beyond it.
    compile: run the LM step through `torch.compile` (GPU).
    stream_chunk_frames / stream_context_frames / stream_lookahead_frames: streaming granularity and overlap.
    decode_audio: False returns codes only (for callers that decode elsewhere).
    cpu_threads: intra-op threads of the engine's loop thread on CPU (default: see `audiogen.engine.cpu`).
    admission_order: which queued requests take free slots. "arrival" (first come, first served) is fair to
    online traffic. "longest_first" admits the longest queued clip first: for offline work (a render batch,
    a list of prompts) whose end is the last clip's end, it leaves only short clips for the tail, so slots stay
    full until the end (the longest-processing-time rule for makespan); a short clip may wait behind longer
    ones, which is why online serving does not use it.

    Two ways to drive the steps, one scheduler: `run(requests)` steps in the calling thread until its requests
    are done (the synchronous API, like vLLM's `LLM` beside `AsyncLLM`: no second thread competes for the CPU
    cores); `submit`/`generate`/`stream` start a background loop thread on first use (servers, async callers).
    Whoever steps holds `_step_lock`, so both can be used on one engine. A step that raises kills the engine:
    it is marked closed, everything it holds fails with the error, `submit` raises `EngineClosedError` and
    `snapshot().alive` is False, so a server or batch worker can restart instead of hanging.
    """

    def __init__(self, model: "AudioGen", *, max_batch_slots: int = 16, max_steps_per_slot: int | None = None,
                 compile: bool = False, max_queued_requests: int = 1024, decode_audio: bool = True,
                 stream_chunk_frames: int = 25, stream_context_frames: int = 50, stream_lookahead_frames: int = 4,
                 memory_fraction: float = 0.9, cpu_threads: int | None = None,
                 admission_order: str = "arrival") -> None:
        config = model.config
        if admission_order not in ADMISSION_ORDERS:
            raise InvalidConfigError("admission_order", f"must be one of {ADMISSION_ORDERS} (got {admission_order!r})")
        if max_batch_slots < 1:
            raise InvalidConfigError("max_batch_slots", f"must be >= 1 (got {max_batch_slots})")
        steps = config.max_steps if max_steps_per_slot is None else max_steps_per_slot
        if steps < config.max_steps:
            raise InvalidConfigError(
                "max_steps_per_slot", f"must be >= window_frames + max_delay = {config.max_steps} (got {steps})")
        if compile and model.backend != "torch":
            raise InvalidConfigError("compile", f"applies to the torch backend (the {model.backend} backend's graphs "
                                                f"are optimised by its own runtime)")
        if max_queued_requests < 0:
            raise InvalidConfigError("max_queued_requests", f"must be >= 0 (got {max_queued_requests})")
        self.model = model
        self.config = config
        self.device = model.device
        check_memory_budget(config, slots=max_batch_slots, steps=steps, device=self.device, dtype=model.dtype,
                            fraction=memory_fraction)
        self.batch = SlotBatch(model.lm, max_slots=max_batch_slots, max_frames=config.max_frames,
                               device=self.device, dtype=model.dtype, compile=compile)
        self.max_queued = max_queued_requests
        self.admission_order = admission_order
        self.decode_audio = decode_audio
        self.stream_chunk = stream_chunk_frames
        self.stream_context = stream_context_frames
        self.stream_lookahead = stream_lookahead_frames
        self.cpu_threads = cpu_threads or engine_threads()
        self.stats = EngineStats()
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._wake = threading.Condition()
        self._step_lock = threading.Lock()
        self._closing = False  # no new requests: shut down, or a step failed
        self._shut_down = False
        self._failure: BaseException | None = None
        self._audio = AudioDecoder(model.decode_codes, model.codec.hop_length, threaded=self.device.type != "cpu")
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public API
    def submit(self, request: GenerationRequest, *, on_chunk: Any = None) -> RequestHandle:
        """Validate and enqueue a request for the background loop (started on first use); returns at once.
        `on_chunk(audio | None)` receives streamed chunks from the audio thread (None ends the stream)."""
        handle = self._enqueue(request, on_chunk)
        with self._wake:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._loop, name="audiogen-engine", daemon=True)
                self._thread.start()
        return handle

    def run(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate `requests` together and return their results in order, stepping in the calling thread
        (unless the background loop runs, which then does the stepping). On error or interrupt, the requests
        not yet finished are cancelled."""
        handles: list[RequestHandle] = []
        try:
            for request in requests:
                handles.append(self._enqueue(request, None))
            with self._cpu_threads():
                while self._thread is None and not all(handle.done() for handle in handles):
                    with self._step_lock:  # else the loop thread steps; the caller only waits
                        if self._closing or not self._has_work():
                            break
                        self._iterate_guarded()
            # what is left finishes elsewhere: a threaded (GPU) audio decoder, or `shutdown` failing it
            futures.wait([handle.future for handle in handles])
            return [handle.result() for handle in handles]
        except BaseException:
            for handle in handles:
                self.cancel(handle)
            raise

    def cancel(self, handle: RequestHandle) -> None:
        """Cancel a request: dropped from the queue, or its slot freed at the next step."""
        handle.cancel()
        with self._wake:
            if handle in self._queue:
                self._queue.remove(handle)
                self.stats.cancelled += 1
                handle.fail_cancelled()
            self._wake.notify()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Await one clip; cancelling the awaiting task cancels the request."""
        handle = self.submit(request)
        try:
            return await asyncio.wrap_future(handle.future)
        except asyncio.CancelledError:
            self.cancel(handle)
            raise

    async def stream(self, request: GenerationRequest) -> AsyncIterator[np.ndarray]:
        """Yield audio chunks [channels, samples] as frames settle; leaving the loop early cancels."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        handle = self.submit(request, on_chunk=lambda chunk: loop.call_soon_threadsafe(chunks.put_nowait, chunk))
        try:
            while (chunk := await chunks.get()) is not None:
                yield chunk
            handle.result(timeout=0)  # re-raise a failure that ended the stream
        finally:
            if not handle.done():
                self.cancel(handle)

    def snapshot(self) -> EngineSnapshot:
        """Load and liveness at this instant (health checks, metrics, autoscaling signals)."""
        with self._wake:
            return EngineSnapshot(
                alive=not self._closing, busy_slots=self.batch.active, max_slots=self.batch.max_slots,
                queue_depth=len(self._queue), max_queued=self.max_queued,
                error=None if self._failure is None else f"{type(self._failure).__name__}: {self._failure}",
                mean_occupancy=self.stats.mean_occupancy, steps=self.stats.steps,
                audio_seconds=self.stats.audio_seconds)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the loop; queued and running requests fail with `EngineClosedError`. No thread is left behind."""
        with self._wake:
            if self._shut_down:
                return
            self._shut_down = self._closing = True
            self._wake.notify_all()
        thread = self._thread
        if thread is None:  # nobody else will fail what is left
            with self._step_lock:
                self._fail_all(self._closed_error())
        elif wait and thread is not threading.current_thread():
            thread.join()
        self._audio.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ admission
    def _enqueue(self, request: GenerationRequest, on_chunk: Any) -> RequestHandle:
        resolved = resolve_request(request, self.config)
        self.model.text.token_ids([resolved.prompt], field="prompt")
        if resolved.sampling.negative_prompt:
            self.model.text.token_ids([resolved.sampling.negative_prompt], field="negative_prompt")
        handle = RequestHandle(resolved, on_chunk)
        with self._wake:
            if self._closing:
                raise self._closed_error()
            # requests waiting for a slot that is already free are not "queued": the next step admits them
            if len(self._queue) >= self.max_queued + self.batch.free:
                self.stats.rejected += 1
                raise QueueFullError(self.max_queued)
            self._queue.append(handle)
            self._wake.notify()
        return handle

    def _closed_error(self) -> EngineClosedError:
        if self._failure is None:
            return EngineClosedError("engine is shut down")
        error = EngineClosedError(f"engine stopped after a failed step: {type(self._failure).__name__}: "
                                  f"{self._failure}")
        error.__cause__ = self._failure
        return error

    # ------------------------------------------------------------------ driving the steps
    @contextlib.contextmanager
    def _cpu_threads(self) -> Iterator[None]:
        """The engine's CPU thread count for the stepping thread (per-thread in OpenMP), restored afterwards: a
        caller that reserved its cores for a loop thread still steps with all of them."""
        previous = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def _loop(self) -> None:
        with self._cpu_threads():
            while True:
                with self._wake:
                    self._wake.wait_for(lambda: self._has_work() or self._closing)
                    if self._closing:
                        break
                with self._step_lock:
                    if not self._iterate_guarded():
                        return
            with self._step_lock:
                self._fail_all(self._closed_error())

    def _has_work(self) -> bool:
        return bool(self._queue) or self.batch.active > 0

    def _iterate_guarded(self) -> bool:
        """One iteration; a failure kills the engine (False) instead of a silent loop death or a hang."""
        try:
            self._iterate()
            return True
        except Exception as error:
            log.exception("engine step failed; the engine is closed")
            with self._wake:
                self._closing = True
                self._failure = error
            self._fail_all(error)
            return False

    def _iterate(self) -> None:
        with self._wake:
            admitted = self._take_queued(min(self.batch.free, len(self._queue)))
        if admitted:
            self._admit(admitted)
        self._drop_cancelled()
        if self.batch.active == 0:
            return
        started = time.perf_counter()
        finished = self.batch.step()
        self.stats.record_step(self.batch.active, time.perf_counter() - started)
        done = [slot for slot in finished if self.batch.finish_window(slot)]
        self._stream_settled(done)
        for slot in sorted(done, reverse=True):
            self._complete(slot)
        if not self._audio.threaded:
            self._audio.drain()

    def _take_queued(self, count: int) -> list[RequestHandle]:
        """Remove and return the `count` queued requests to admit now, in `admission_order` (caller holds the lock)."""
        if self.admission_order == "arrival" or count >= len(self._queue):
            return [self._queue.popleft() for _ in range(count)]
        # nlargest == sorted(reverse=True)[:count], stable (ties by arrival), without sorting the whole queue
        chosen = heapq.nlargest(count, self._queue, key=lambda handle: handle.request.total_frames)
        for handle in chosen:
            self._queue.remove(handle)
        return chosen

    def _admit(self, handles: list[RequestHandle]) -> None:
        try:
            text, mask = self.model.text([part for handle in handles
                                          for part in (handle.request.prompt, handle.request.sampling.negative_prompt)])
        except Exception as error:  # e.g. a tokenizer failure: fail these requests, keep the engine
            for handle in handles:
                handle.fail(error)
            return
        now = time.perf_counter()
        self.batch.admit(handles, [h.request for h in handles], text, mask)
        for handle in handles:
            handle.timings.admitted = now

    def _drop_cancelled(self) -> None:
        # from the last slot down: a release moves the last active slot into the freed one
        for slot in reversed([slot for slot, handle in enumerate(self.batch.owners) if handle.cancelled]):
            handle = self.batch.owners[slot]
            self.batch.release(slot)
            self.stats.cancelled += 1
            handle.fail_cancelled()

    def _stream_settled(self, done: list[int]) -> None:
        for slot, handle in enumerate(self.batch.owners):
            if handle.on_chunk is None or not self.decode_audio:
                continue
            settled = self.batch.settled_frames(slot)  # the whole clip once it is done
            end = settled if slot in done else settled - self.stream_lookahead
            if end - handle.streamed_frames < (1 if slot in done else self.stream_chunk):
                continue
            start = max(0, handle.streamed_frames - self.stream_context)
            codes = self.batch.clip_codes(slot, frames=settled, start=start)
            self._audio.chunk(handle, codes, handle.streamed_frames - start, end - handle.streamed_frames)
            handle.streamed_frames = end

    def _complete(self, slot: int) -> None:
        handle: RequestHandle = self.batch.owners[slot]
        codes = self.batch.clip_codes(slot)
        self.batch.release(slot)
        self.stats.audio_seconds += codes.shape[1] / self.config.frame_rate

        def finish(audio: np.ndarray | None) -> None:
            handle.finish(GenerationResult(handle.request, codes, audio, self.config.sample_rate, handle.timings))

        if self.decode_audio:
            self._audio.complete(handle, codes, finish)
        else:
            finish(None)

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            waiting = list(self._queue)
            self._queue.clear()
        for handle in waiting + list(self.batch.owners):
            handle.fail(error)
        self.batch.owners.clear()

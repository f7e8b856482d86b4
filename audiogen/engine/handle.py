"""Request handles and results: what `Engine.submit` returns and what a finished request resolves to."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from audiogen.engine.request import ResolvedRequest
from audiogen.errors import RequestCancelledError


@dataclass
class Timings:
    """Monotonic timestamps (seconds) of a request's life, for latency metrics."""

    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    finished: float | None = None


@dataclass
class GenerationResult:
    """A finished clip: its codes, its audio (None when the engine does not decode), and how it was made."""

    request: ResolvedRequest
    codes: torch.Tensor  # [K, frames] on the CPU
    audio: np.ndarray | None  # float32 [channels, samples]
    sample_rate: int
    timings: Timings

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def seed(self) -> int:
        return self.request.sampling.seed

    @property
    def duration(self) -> float:
        return 0.0 if self.audio is None else self.audio.shape[-1] / self.sample_rate


class RequestHandle:
    """A submitted request. `result()` blocks; `cancel()` frees its slot at the next engine step."""

    def __init__(self, request: ResolvedRequest, on_chunk: Callable[[np.ndarray | None], None] | None = None) -> None:
        self.request = request
        self.future: Future[GenerationResult] = Future()
        self.timings = Timings()
        self.on_chunk = on_chunk
        self.streamed_frames = 0
        self.cancelled = False  # set by any thread, read by the stepping and audio threads

    def cancel(self) -> None:
        self.cancelled = True

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self.future.result(timeout)

    # ------------------------------------------------------------------ used by the engine threads
    def finish(self, result: GenerationResult) -> None:
        self._settle(self.future.set_result, result)

    def fail(self, error: BaseException) -> None:
        self._settle(self.future.set_exception, error)

    def fail_cancelled(self) -> None:
        self.fail(RequestCancelledError(f"request {self.request.request_id} was cancelled"))

    def _settle(self, settle: Callable[[Any], None], outcome: Any) -> None:
        """Resolve the future once (a late failure after the result is ignored) and end the stream."""
        self.timings.finished = time.perf_counter()
        if not self.future.done():
            settle(outcome)
        if self.on_chunk is not None:
            self.on_chunk(None)
            self.on_chunk = None

"""Codes -> waveform off the decoding loop: finished clips in batches, streamed chunks in order.

On a GPU the codec runs on its own thread, so the LM keeps stepping while audio is decoded (the two overlap on
the device). On a CPU both would compete for the same cores, and two threads each running OpenMP-parallel
kernels oversubscribe them badly (measured: decodes 10x and steps 3x slower), so there the engine loop drains
the decoder between steps instead (`threaded=False`, `drain()`). Either way one FIFO keeps every request's
chunks in order and its final result after its last chunk.

Streaming decodes overlapping windows: each chunk is decoded with `context_frames` of codes before it (the
decoder's LSTM and convolutions need history) and emitted only up to `lookahead_frames` before the last settled
frame (its convolutions look ahead a few frames), so chunk edges match a whole-clip decode closely.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from audiogen.engine.handle import RequestHandle


@dataclass
class _Job:
    handle: RequestHandle
    codes: torch.Tensor  # [K, frames]
    skip_frames: int = 0  # leading context frames whose samples are not emitted
    emit_frames: int | None = None  # frames whose samples are emitted (chunks only)
    final: Callable[[np.ndarray | None], None] | None = None  # set for the job that completes the request


class AudioDecoder:
    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], hop_length: int, *, threaded: bool,
                 max_batch: int = 16) -> None:
        self._decode = decode
        self._hop = hop_length
        self._max_batch = max_batch
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._streamed: dict[int, list[np.ndarray]] = {}
        self.threaded = threaded
        if threaded:
            self._thread = threading.Thread(target=self._run, name="audiogen-audio", daemon=True)
            self._thread.start()

    def chunk(self, handle: RequestHandle, codes: torch.Tensor, skip_frames: int, emit_frames: int) -> None:
        """Decode `codes` and stream the samples of frames [skip, skip + emit) to the handle."""
        self._jobs.put(_Job(handle, codes, skip_frames, emit_frames))

    def complete(self, handle: RequestHandle, codes: torch.Tensor,
                 finish: Callable[[np.ndarray | None], None]) -> None:
        """Decode a finished clip (or, for a streamed one, join its chunks) and call `finish(audio)`."""
        self._jobs.put(_Job(handle, codes, final=finish))

    def drain(self) -> None:
        """Process every queued job on the calling thread (the engine loop, when not threaded)."""
        self._run(block=False)

    def close(self) -> None:
        if not self.threaded:
            self.drain()
            return
        self._jobs.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker
    def _run(self, block: bool = True) -> None:
        """Process jobs until the `None` that `close` sends (or, unless `block`, until the queue is empty)."""
        backlog: list[_Job] = []
        while block or backlog or not self._jobs.empty():
            job = backlog.pop(0) if backlog else self._jobs.get(block)
            if job is None:
                return
            self._process(job, backlog)

    def _process(self, job: _Job, backlog: list[_Job]) -> None:
        batch = [job]
        try:
            if job.final is None:
                self._stream(job)
            elif id(job.handle) in self._streamed:
                job.final(np.concatenate(self._streamed.pop(id(job.handle)), axis=-1))
            else:
                batch = self._gather_finals(job, backlog)
                live = [final for final in batch if not final.handle.cancelled]
                for final in batch:
                    if final.handle.cancelled:
                        final.handle.fail_cancelled()
                if live:
                    audio = self._decode(torch.stack([final.codes for final in live])).cpu().numpy()
                    for final, clip in zip(live, audio):
                        final.final(np.ascontiguousarray(clip, dtype=np.float32))
        except Exception as error:
            # a decode failure fails every request of its batch (a result already set stays), never the worker
            for failed in batch:
                failed.handle.fail(error)

    def _gather_finals(self, first: _Job, backlog: list[_Job]) -> list[_Job]:
        """Batch the final jobs queued right behind `first` whose clips have the same length (decoding padded
        clips together would change their last frames, so only equal lengths share a batch)."""
        batch = [first]
        while len(batch) < self._max_batch:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            same = (job is not None and job.final is not None and id(job.handle) not in self._streamed
                    and job.codes.shape == first.codes.shape)
            if not same:
                backlog.append(job)
                break
            batch.append(job)
        return batch

    def _stream(self, job: _Job) -> None:
        if job.handle.cancelled:
            return
        audio = self._decode(job.codes[None])[0].cpu().numpy()
        start = job.skip_frames * self._hop
        stop = start + (job.emit_frames or 0) * self._hop
        samples = np.ascontiguousarray(audio[:, start:stop], dtype=np.float32)
        self._streamed.setdefault(id(job.handle), []).append(samples)
        if job.handle.on_chunk is not None:
            job.handle.on_chunk(samples)

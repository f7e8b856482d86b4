"""The continuous-batching engine: parity whatever the batch, reproducibility, admission, cancellation."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from audiogen import AudioGen, GenerationRequest, QueueFullError, RequestCancelledError, SamplingParams
from audiogen.engine import Engine
from audiogen.errors import EngineClosedError, InvalidConfigError, ResourceLimitError
from tests.test_hf_parity import _hf_greedy


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    model = AudioGen.from_pretrained(hf_dir[0], device="cpu")
    yield model
    model.close()


def _mixed_requests(count, seed=100):
    rng = np.random.default_rng(seed)
    return [GenerationRequest(
        prompt=f"noise {i} high beep", duration=float(rng.uniform(0.1, 1.2)),
        sampling=SamplingParams(seed=i, temperature=float(rng.choice([0.7, 1.0, 1.3])),
                                top_k=int(rng.choice([0, 5, 20])), top_p=float(rng.choice([0.0, 0.0, 0.9])),
                                guidance_scale=float(rng.choice([1.0, 3.0]))))
            for i in range(count)]


def test_greedy_codes_equal_transformers_whatever_the_batch_and_join_time(hf_model, hf_dir):
    ref_codes, _ = _hf_greedy(hf_dir[1], hf_model.text.tokenizer, "a dog barking in the rain", 40)
    target = GenerationRequest(prompt="a dog barking in the rain", duration=40 / 50,
                               sampling=SamplingParams(temperature=0.0))
    with Engine(hf_model, max_batch_slots=4) as engine:
        background = [engine.submit(r) for r in _mixed_requests(6)]
        while engine.stats.steps < 7:  # join mid-run, with other slots at other positions
            time.sleep(0.001)
        late = engine.submit(target)
        more = [engine.submit(r) for r in _mixed_requests(3, seed=5)]
        assert torch.equal(late.result(timeout=120).codes, ref_codes)
        for handle in background + more:
            handle.result(timeout=120)
        assert engine.stats.max_occupancy == 4


def test_seeded_sampling_reproducible_across_batch_compositions(tiny):
    target = GenerationRequest(prompt="a siren rising", duration=1.0,
                               sampling=SamplingParams(seed=1234, temperature=1.0, top_k=0, top_p=0.95,
                                                       guidance_scale=3.0))
    with Engine(tiny, max_batch_slots=1) as alone:
        solo = alone.submit(target).result(timeout=60)
    with Engine(tiny, max_batch_slots=5) as busy:
        handles = [busy.submit(r) for r in _mixed_requests(3, seed=9)]
        while busy.stats.steps < 3:
            time.sleep(0.001)
        crowded = busy.submit(target)
        handles += [busy.submit(r) for r in _mixed_requests(4, seed=11)]
        again = crowded.result(timeout=60)
        for handle in handles:
            handle.result(timeout=60)
    assert torch.equal(solo.codes, again.codes)
    assert np.allclose(solo.audio, again.audio, atol=1e-6)
    different = GenerationRequest(prompt="a siren rising", duration=1.0,
                                  sampling=SamplingParams(seed=1235, top_k=0, top_p=0.95))
    with Engine(tiny, max_batch_slots=1) as engine:
        assert not torch.equal(engine.submit(different).result(timeout=60).codes, solo.codes)


def test_cancellation_frees_the_slot(tiny):
    with Engine(tiny, max_batch_slots=2) as engine:
        long = engine.submit(GenerationRequest(prompt="long", duration=6.0, sampling=SamplingParams(seed=1)))
        while long.timings.admitted is None:
            time.sleep(0.001)
        assert engine.batch.active == 1
        engine.cancel(long)
        with pytest.raises(RequestCancelledError):
            long.result(timeout=30)
        deadline = time.time() + 10
        while engine.batch.active and time.time() < deadline:
            time.sleep(0.001)
        assert engine.batch.active == 0
        assert engine.stats.cancelled == 1
        # the freed slot serves new work
        assert engine.submit(GenerationRequest(prompt="after", duration=0.2,
                                               sampling=SamplingParams(seed=2))).result(timeout=30).codes.shape[1] == 10


def test_queue_full_is_a_clear_error(tiny):
    with Engine(tiny, max_batch_slots=1, max_queued_requests=1) as engine:
        running = engine.submit(GenerationRequest(prompt="a", duration=6.0, sampling=SamplingParams(seed=1)))
        while running.timings.admitted is None:
            time.sleep(0.001)
        queued = engine.submit(GenerationRequest(prompt="b", duration=0.1, sampling=SamplingParams(seed=2)))
        with pytest.raises(QueueFullError, match="max_queued_requests=1"):
            engine.submit(GenerationRequest(prompt="c", duration=0.1, sampling=SamplingParams(seed=3)))
        assert engine.stats.rejected == 1
        engine.cancel(running)
        assert queued.result(timeout=30).codes.shape[1] == 5


def test_request_arriving_while_others_run_is_admitted_before_they_finish(tiny):
    with Engine(tiny, max_batch_slots=4) as engine:
        long = [engine.submit(GenerationRequest(prompt="rain", duration=4.0,
                                                sampling=SamplingParams(seed=i))) for i in range(2)]
        while engine.stats.steps < 20:
            time.sleep(0.001)
        short = engine.submit(GenerationRequest(prompt="click", duration=0.2, sampling=SamplingParams(seed=9)))
        short_result = short.result(timeout=60)
        assert not any(h.done() for h in long)
        assert short_result.timings.admitted < min(h.result(timeout=60).timings.finished for h in long)


@pytest.mark.parametrize("order, expected", [("arrival", [0.4, 2.0, 1.0]), ("longest_first", [2.0, 1.0, 0.4])])
def test_admission_order_picks_which_queued_request_takes_a_free_slot(tiny, order, expected):
    with Engine(tiny, max_batch_slots=1, admission_order=order) as engine:
        blocker = engine.submit(GenerationRequest(prompt="rain", duration=3.0, sampling=SamplingParams(seed=0)))
        while engine.stats.steps < 2:
            time.sleep(0.001)
        queued = [engine.submit(GenerationRequest(prompt="beep", duration=d,
                                                  sampling=SamplingParams(seed=1))) for d in (0.4, 2.0, 1.0)]
        assert not blocker.done()
        results = [h.result(timeout=60) for h in queued]
    admitted = sorted(results, key=lambda r: r.timings.admitted)
    assert [r.codes.shape[1] / 50 for r in admitted] == expected


def test_async_generate_and_stream(tiny):
    async def main(engine):
        result = await engine.generate(GenerationRequest(prompt="beep", duration=0.5, sampling=SamplingParams(seed=3)))
        chunks = [c async for c in engine.stream(GenerationRequest(prompt="beep", duration=2.0,
                                                                   sampling=SamplingParams(seed=3)))]
        return result, chunks

    with Engine(tiny, max_batch_slots=2, stream_chunk_frames=10) as engine:
        result, chunks = asyncio.run(main(engine))
    assert result.audio.shape == (1, 25 * 320)
    streamed = np.concatenate(chunks, axis=-1)
    assert len(chunks) >= 5 and streamed.shape == (1, 100 * 320)
    with Engine(tiny, max_batch_slots=1) as engine:
        full = engine.submit(GenerationRequest(prompt="beep", duration=2.0,
                                               sampling=SamplingParams(seed=3))).result(timeout=60).audio
    # chunks decoded with context/lookahead join into (nearly) the whole-clip decode
    assert np.abs(streamed - full).max() < 0.05 * max(np.abs(full).max(), 1e-3)


def test_first_stream_chunk_arrives_long_before_the_clip_ends(tiny):
    with Engine(tiny, max_batch_slots=1, stream_chunk_frames=10) as engine:
        arrivals = []
        done = threading.Event()

        def on_chunk(chunk):
            if chunk is None:
                done.set()
            else:
                arrivals.append(engine.stats.steps)

        engine.submit(GenerationRequest(prompt="rain", duration=3.0,
                                        sampling=SamplingParams(seed=4)), on_chunk=on_chunk)
        assert done.wait(60)
    assert arrivals[0] < 40 < 150 <= arrivals[-1] + 10


def test_shutdown_fails_pending_requests_and_leaves_no_threads(tiny):
    before = {t.name for t in threading.enumerate()}
    engine = Engine(tiny, max_batch_slots=1)
    handles = [engine.submit(GenerationRequest(prompt="x", duration=6.0,
                                               sampling=SamplingParams(seed=i))) for i in range(3)]
    engine.shutdown()
    for handle in handles:
        with pytest.raises(Exception):
            handle.result(timeout=5)
    after = {t.name for t in threading.enumerate()}
    assert not {n for n in after - before if n.startswith("audiogen")}


def test_engine_argument_and_memory_checks(tiny):
    with pytest.raises(InvalidConfigError, match="max_steps_per_slot"):
        Engine(tiny, max_steps_per_slot=10)
    with pytest.raises(InvalidConfigError, match="max_batch_slots"):
        Engine(tiny, max_batch_slots=0)
    with pytest.raises(InvalidConfigError, match="admission_order.*longest_first"):
        Engine(tiny, admission_order="shortest")
    with pytest.raises(ResourceLimitError, match="max_batch_slots=.*GiB"):
        Engine(tiny, max_batch_slots=10**9)


@pytest.mark.slow
def test_compiled_step_gives_the_same_codes():
    from audiogen.scratch import random_model as tiny_model

    eager, compiled = tiny_model(seed=3), tiny_model(seed=3)
    request = GenerationRequest(prompt="a bell", duration=0.4, sampling=SamplingParams(seed=2, top_k=0, top_p=0.9))
    try:
        with Engine(eager, max_batch_slots=2) as engine:
            expected = engine.submit(request).result(timeout=120).codes
        with Engine(compiled, max_batch_slots=2, compile=True) as engine:
            assert torch.equal(engine.submit(request).result(timeout=600).codes, expected)
    finally:
        eager.close()
        compiled.close()


def test_run_steps_in_the_calling_thread_and_matches_the_background_loop(tiny):
    requests = _mixed_requests(6)
    with Engine(tiny, max_batch_slots=3) as engine:
        results = engine.run(requests)
        assert not [t for t in threading.enumerate() if t.name == "audiogen-engine"]  # no second OpenMP team
        looped = [engine.submit(request).result(timeout=120) for request in requests]
    for ran, background in zip(results, looped):
        assert torch.equal(ran.codes, background.codes)


def test_a_failed_step_closes_the_engine_instead_of_hanging(tiny, monkeypatch):
    engine = Engine(tiny, max_batch_slots=2)
    try:
        running = engine.submit(GenerationRequest(prompt="x", duration=1.0, sampling=SamplingParams(seed=1)))
        running.result(timeout=60)
        assert engine.snapshot().alive

        def broken_step() -> list[int]:
            raise RuntimeError("device lost")

        monkeypatch.setattr(engine.batch, "step", broken_step)
        doomed = engine.submit(GenerationRequest(prompt="y", duration=1.0, sampling=SamplingParams(seed=2)))
        with pytest.raises(RuntimeError, match="device lost"):
            doomed.result(timeout=30)
        snapshot = engine.snapshot()
        assert not snapshot.alive and "device lost" in snapshot.error
        assert snapshot.busy_slots == 0 and snapshot.queue_depth == 0
        with pytest.raises(EngineClosedError, match="device lost"):
            engine.submit(GenerationRequest(prompt="z", duration=0.2))
        with pytest.raises(EngineClosedError):
            engine.run([GenerationRequest(prompt="z", duration=0.2)])
    finally:
        engine.shutdown()


def test_snapshot_reports_busy_slots_and_queue(tiny):
    with Engine(tiny, max_batch_slots=1, max_queued_requests=3) as engine:
        empty = engine.snapshot()
        assert (empty.alive, empty.busy_slots, empty.queue_depth, empty.capacity) == (True, 0, 0, 4)
        handles = [engine.submit(GenerationRequest(prompt="rain", duration=4.0, sampling=SamplingParams(seed=i)))
                   for i in range(3)]
        deadline = time.monotonic() + 60
        while engine.snapshot().busy_slots < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = engine.snapshot()
        assert busy.busy_slots == 1 and busy.queue_depth == 2 and busy.in_flight == 3
        for handle in handles:
            engine.cancel(handle)


def test_a_failed_batched_decode_fails_every_request_of_the_batch():
    """Finished clips of equal length are decoded together: when that decode raises, each of them must fail
    (a request left unresolved would hang `Engine.run` and every awaiting caller)."""
    from audiogen.config import AudioGenConfig
    from audiogen.engine.audio import AudioDecoder
    from audiogen.engine.handle import RequestHandle
    from audiogen.engine.request import resolve_request

    def broken(codes):
        raise RuntimeError(f"decoder failed on {codes.shape[0]} clips")

    config = AudioGenConfig.preset("tiny")
    decoder = AudioDecoder(broken, config.hop_length, threaded=False)
    handles = [RequestHandle(resolve_request(GenerationRequest(prompt="x", duration=0.2), config)) for _ in range(3)]
    for handle in handles:
        decoder.complete(handle, torch.zeros(config.num_codebooks, 10, dtype=torch.long), lambda audio: None)
    decoder.drain()
    for handle in handles:
        with pytest.raises(RuntimeError, match="decoder failed on 3 clips"):
            handle.result(timeout=0)

"""The HTTP API (pipelines/serve.py) against a locally running Serve app on 127.0.0.1.

One app per module: a tiny model saved to disk (max_duration raised to 60 s so that a clip outlives a round trip
through the proxy), small engine and Serve queues so that overload is cheap to reach.
"""

from __future__ import annotations

import asyncio
import io
import json
import time

import numpy as np
import pytest
import soundfile as sf

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")

from pipelines.serve import (
    DEFAULT_CONFIG,
    InpaintBody,
    ServerSettings,
    _sample_mask,
    error_from_exception,
    load_config,
    validation_details,
)

SLOTS = 4
ENGINE_QUEUE = 2
SAMPLE_RATE = 16000


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    from audiogen.testing import tiny_model

    directory = tmp_path_factory.mktemp("serve_model")
    with tiny_model(seed=0, max_duration=60.0) as model:
        model.save_pretrained(directory)
    port = _free_port()
    http, app, run = load_config(
        args={"model_path": str(directory), "max_batch_slots": SLOTS, "max_queued_requests": ENGINE_QUEUE,
              "stream_chunk_frames": 10, "request_timeout_s": 60, "retry_after_s": 1, "cpu_threads": 1,
              "max_upload_bytes": 512 * 1024, "max_upload_seconds": 10},
        deployment_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 8,
                            "max_queued_requests": 8, "health_check_period_s": 2},
        http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    serve.start(http_options=http)
    serve.run(app, name="audiogen-test", route_prefix=run["route_prefix"])
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as client:
        deadline = time.monotonic() + 60
        while client.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.2)
    yield base
    serve.delete("audiogen-test")
    serve.shutdown()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def _stats(client) -> dict:
    response = client.get("/v1/stats")
    assert response.status_code == 200
    return response.json()


def _metrics(client) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "replica"))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def _wait_idle(client, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(client)
        if stats["slots_in_use"] == 0 and stats["queue_depth"] == 0 and stats["in_engine"] == 0:
            return stats
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        time.sleep(0.05)


def _wav(seconds: float, rate: int = 22050, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    audio = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([audio] * channels, axis=1), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _check_audio_headers(response, seed: int | None = None) -> None:
    assert response.headers["x-audiogen-sample-rate"] == str(SAMPLE_RATE)
    assert response.headers["x-audiogen-model"] == "audiogen"
    assert len(response.headers["x-audiogen-model-sha256"]) == 64
    assert response.headers["x-request-id"]
    if seed is not None:
        assert response.headers["x-audiogen-seed"] == str(seed)


# --------------------------------------------------------------------------------------------------------------
# without Serve
# --------------------------------------------------------------------------------------------------------------
def test_serve_config_file_is_valid_and_complete():
    import yaml

    http, _, run = load_config()
    assert run == {"name": "audiogen", "route_prefix": "/"}
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    deployment = raw["applications"][0]["deployments"][0]
    for key in ("autoscaling_config", "ray_actor_options", "max_ongoing_requests", "max_queued_requests",
                "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s"):
        assert key in deployment
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(deployment["autoscaling_config"])
    assert {"num_cpus", "num_gpus"} <= set(deployment["ray_actor_options"])
    ServerSettings.model_validate(raw["applications"][0]["args"])
    assert http["host"] == "127.0.0.1"


def test_inpaint_masks_to_samples():
    spans = _sample_mask([(0.25, 0.5)], 16000, 16000, 16000, 320)
    assert spans.sum() == 4000 and spans[4000] and not spans[8000]
    frames = _sample_mask([False] * 10 + [True] * 5 + [False] * 35, 16000, 16000, 16000, 320)
    assert np.flatnonzero(frames)[[0, -1]].tolist() == [3200, 4799]
    with pytest.raises(ValueError, match="mask"):
        _sample_mask([True] * 49, 16000, 16000, 16000, 320)
    with pytest.raises(ValueError, match=r"mask\[0\]"):
        _sample_mask([(0.5, 2.0)], 16000, 16000, 16000, 320)
    assert InpaintBody.model_validate({"mask": "[[0, 1]]"}).mask == [(0.0, 1.0)]


def test_error_mapping():
    from pydantic import ValidationError

    from audiogen.errors import QueueFullError

    with pytest.raises(ValidationError) as caught:
        InpaintBody.model_validate({"mask": "[[0, 1]]", "top_k": 2.5, "format": "mp3"})
    fields = {d["field"]: d for d in validation_details(caught.value.errors())}
    assert set(fields) == {"top_k", "format"} and "wav" in fields["format"]["limit"]
    busy = error_from_exception(QueueFullError(3), retry_after_s=7)
    assert busy.status == 503 and busy.headers["Retry-After"] == "7"
    assert error_from_exception(TimeoutError(), 1).status == 504


def test_cli_serve_passes_flags_over_the_config(monkeypatch, tmp_path):
    import pipelines.serve
    from audiogen.cli import main

    calls = []
    monkeypatch.setattr(pipelines.serve, "run_local", lambda config, **kw: calls.append((config, kw)))
    monkeypatch.chdir(tmp_path)  # no ./serve_config.yaml here: flags only
    assert main(["serve", "--port", "8123", "--max-batch-slots", "4", "--num-gpus", "1", "--replicas", "2"]) == 0
    config, kw = calls[-1]
    assert config is None
    assert kw["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert kw["args"] == {"max_batch_slots": 4}
    assert kw["deployment_options"] == {"num_replicas": 2, "ray_actor_options": {"num_gpus": 1.0}}
    assert main(["serve", "--config", str(DEFAULT_CONFIG), "--model", "/m"]) == 0
    assert calls[-1][0] == str(DEFAULT_CONFIG) and calls[-1][1]["args"] == {"model_path": "/m"}
    http, app, _ = load_config(DEFAULT_CONFIG, deployment_options={"ray_actor_options": {"num_gpus": 1}})
    assert app is not None and http["port"] == 8000


# --------------------------------------------------------------------------------------------------------------
# against the running app
# --------------------------------------------------------------------------------------------------------------
def test_health_models_docs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    model = client.get("/v1/models").json()["data"][0]
    assert model["sample_rate"] == SAMPLE_RATE and model["limits"]["max_duration"] == 60.0
    assert model["limits"]["max_batch_slots"] == SLOTS and model["limits"]["max_prompt_tokens"] == 32
    assert {"wav", "flac", "ogg"} <= set(model["limits"]["formats"])
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/generate", "/v1/continue", "/v1/inpaint", "/v1/models", "/healthz", "/metrics"} <= set(paths)


@pytest.mark.parametrize("fmt,mime", [("wav", "audio/wav"), ("flac", "audio/flac"), ("ogg", "audio/ogg")])
def test_generate_each_format(client, fmt, mime):
    body = {"prompt": "a dog barking", "duration": 0.5, "seed": 11, "format": fmt, "temperature": 1.0,
            "top_k": 10, "top_p": 0.0, "guidance_scale": 3.0, "negative_prompt": "rain"}
    response = client.post("/v1/generate", json=body, headers={"X-Request-Id": f"req-{fmt}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == mime
    _check_audio_headers(response, seed=11)
    assert response.headers["x-request-id"] == f"req-{fmt}"
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == SAMPLE_RATE and abs(len(audio) - 8000) <= 320
    if fmt == "wav":  # same seed and parameters: the same clip
        again = client.post("/v1/generate", json=body)
        assert again.content == response.content


def test_generate_without_seed_reports_the_seed_used(client):
    response = client.post("/v1/generate", json={"prompt": "beep", "duration": 0.2})
    assert response.status_code == 200
    seed = int(response.headers["x-audiogen-seed"])
    again = client.post("/v1/generate", json={"prompt": "beep", "duration": 0.2, "seed": seed})
    assert again.content == response.content


@pytest.mark.slow
def test_stream_wav_first_chunk_before_last_frame(client):
    before = _wait_idle(client)
    seconds = 30.0
    started = time.perf_counter()
    with client.stream("POST", "/v1/generate",
                       json={"prompt": "rain on a roof", "duration": seconds, "seed": 5, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/wav"
        assert "content-length" not in response.headers
        _check_audio_headers(response, seed=5)
        chunks = response.iter_raw()
        first = next(chunks)
        first_at = time.perf_counter() - started
        # the first audio arrived while the clip is still being generated
        during = _stats(client)
        assert during["slots_in_use"] == 1 and during["finished"] == before["finished"], during
        data = first + b"".join(chunks)
        total_at = time.perf_counter() - started
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert len(data) == 44 + int(seconds * SAMPLE_RATE) * 2
    assert first_at < total_at / 2, (first_at, total_at)
    # the streamed samples are the clip the non-streaming call returns
    whole = client.post("/v1/generate", json={"prompt": "rain on a roof", "duration": seconds, "seed": 5})
    audio, _ = sf.read(io.BytesIO(whole.content), dtype="int16")
    streamed = np.frombuffer(data[44:], dtype="<i2").astype(np.int32)
    assert streamed.shape == audio.shape  # streamed windows overlap: close to, not bit-equal with, one decode
    assert np.abs(streamed - audio).max() <= 0.05 * max(np.abs(audio).max(), 30)


def test_stream_ogg(client):
    with client.stream("POST", "/v1/generate",
                       json={"prompt": "a siren", "duration": 2.0, "seed": 1, "stream": True, "format": "ogg"}
                       ) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "audio/ogg"
        data = response.read()
    assert data[:4] == b"OggS"
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == SAMPLE_RATE and abs(len(audio) - 2 * SAMPLE_RATE) <= 320


def test_continue(client):
    upload = _wav(1.0, rate=22050)  # resampled to the model's 16 kHz
    response = client.post("/v1/continue", files={"audio": ("in.wav", upload, "audio/wav")},
                           data={"prompt": "a dog barking", "extension_seconds": "0.5",
                                 "request": json.dumps({"seed": 3, "format": "flac"})})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/flac"
    _check_audio_headers(response, seed=3)
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == SAMPLE_RATE and abs(len(audio) - int(1.5 * SAMPLE_RATE)) <= 320
    # keep_original: the upload itself comes back in front of the extension
    original, _ = sf.read(io.BytesIO(upload), dtype="float32")
    from audiogen.io import resample

    expected = resample(original[None], 22050, SAMPLE_RATE)[0]
    assert np.abs(audio[:15000] - expected[:15000]).max() < 1e-3


def test_inpaint(client):
    upload = _wav(1.5, rate=SAMPLE_RATE, channels=2)  # downmixed to the model's mono
    for mask in ([[0.5, 1.0]], [False] * 25 + [True] * 25 + [False] * 25):
        response = client.post("/v1/inpaint", files={"audio": ("in.wav", upload, "audio/wav")},
                               data={"mask": json.dumps(mask), "seed": "9", "prompt": "a bell"})
        assert response.status_code == 200, response.text
        _check_audio_headers(response, seed=9)
        audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
        assert rate == SAMPLE_RATE and len(audio) == int(1.5 * SAMPLE_RATE)
        original, _ = sf.read(io.BytesIO(upload), dtype="float32")
        kept = original.mean(axis=1)[:7000]  # before the gap (and its crossfade): the upload itself
        assert np.abs(audio[:7000] - kept).max() < 1e-3


GENERATE_422 = [
    ({"duration": 1}, "prompt", "required"),
    ({"prompt": "   "}, "prompt", "non-space"),
    ({"prompt": "x" * 2001}, "prompt", "2000"),
    ({"prompt": " ".join(["dog"] * 40)}, "prompt", "32 tokens"),
    ({"prompt": "a", "duration": 0}, "duration", "60"),
    ({"prompt": "a", "duration": -2}, "duration", "60"),
    ({"prompt": "a", "duration": 61}, "duration", "60"),
    ({"prompt": "a", "duration": "long"}, "duration", "number"),
    ({"prompt": "a", "temperature": -1}, "temperature", "100"),
    ({"prompt": "a", "top_k": -1}, "top_k", "0.."),
    ({"prompt": "a", "top_k": 2.5}, "top_k", "integer"),
    ({"prompt": "a", "top_p": 1.5}, "top_p", "top_p <= 1"),
    ({"prompt": "a", "guidance_scale": 1000}, "guidance_scale", "100"),
    ({"prompt": "a", "seed": -1}, "seed", "0.."),
    ({"prompt": "a", "format": "mp3"}, "format", "wav"),
    ({"prompt": "a", "format": "flac", "stream": True}, "format", "wav"),
    ({"prompt": "a", "durations": 1}, "durations", "no such field"),
]


@pytest.mark.parametrize("body,field,limit", GENERATE_422, ids=[f"{c[1]}-{i}" for i, c in enumerate(GENERATE_422)])
def test_generate_validation(client, body, field, limit):
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["field"] == field, detail
    assert limit in (detail["limit"] or ""), detail
    assert detail["message"]


def test_generate_invalid_json(client):
    response = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["field"]


UPLOAD_422 = [
    ("/v1/continue", b"this is not audio", {"extension_seconds": "0.5"}, "audio", None),
    ("/v1/continue", b"\0" * (600 * 1024), {}, "audio", "bytes"),
    ("/v1/continue", "long", {"extension_seconds": "0.5"}, "audio", "10 s"),
    ("/v1/continue", "short", {"extension_seconds": "100"}, "extension_seconds", "extension_seconds <="),
    ("/v1/continue", "short", {"top_p": "2"}, "top_p", "1"),
    ("/v1/continue", None, {"extension_seconds": "0.5"}, "audio", "audio"),
    ("/v1/continue", "short", {"request": "[1, 2]"}, "request", "JSON object"),
    ("/v1/inpaint", "short", {"mask": "[[0.5, 3.0]]"}, "mask[0]", "1.000 s"),
    ("/v1/inpaint", "short", {"mask": json.dumps([True] * 10)}, "mask", "50"),
    ("/v1/inpaint", "short", {"mask": "[]"}, "mask", "at least one"),
    ("/v1/inpaint", "short", {"mask": "nope"}, "mask", "start_s"),
    ("/v1/inpaint", "short", {}, "mask", "required"),
    ("/v1/inpaint", "short", {"mask": "[[0, 0.5]]", "format": "mp3"}, "format", "wav"),
]


@pytest.mark.parametrize("path,audio,fields,field,limit", UPLOAD_422,
                         ids=[f"{c[0][4:]}-{c[3]}-{i}" for i, c in enumerate(UPLOAD_422)])
def test_upload_validation(client, path, audio, fields, field, limit):
    data = {"short": _wav(1.0, rate=SAMPLE_RATE), "long": _wav(11.0, rate=8000)}.get(audio, audio)
    # no audio: still multipart (a plain field sent as a part without a filename)
    files = {"audio": ("in.wav", data, "audio/wav")} if data is not None else {"seed": (None, "1")}
    response = client.post(path, files=files, data=fields)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["field"] == field, detail
    if limit is not None:
        assert limit in (detail["limit"] or ""), detail


async def _post_many(base: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/generate", json=body) for body in bodies))


@pytest.mark.slow
def test_concurrent_requests_share_engine_steps(server, client):
    _wait_idle(client)
    before = _metrics(client)
    bodies = [{"prompt": f"sound {i}", "duration": 3.0, "seed": i} for i in range(SLOTS)]
    responses = asyncio.run(_post_many(server, bodies))
    assert [r.status_code for r in responses] == [200] * SLOTS, [(r.status_code, r.text[:200]) for r in responses]
    after = _metrics(client)

    def batched_steps(metrics: dict) -> float:
        return sum(value for (name, labels), value in metrics.items()
                   if name == "audiogen_engine_steps_total" and int(dict(labels)["active_slots"]) > 1)

    assert batched_steps(after) > batched_steps(before)  # steps that decoded several requests at once
    assert after[("audiogen_max_occupancy", ())] > 1
    assert after[("audiogen_mean_occupancy", ())] > 1 or after[("audiogen_max_occupancy", ())] >= SLOTS
    assert after[("audiogen_audio_seconds_generated_total", ())] >= \
        before[("audiogen_audio_seconds_generated_total", ())] + SLOTS * 3.0 - 0.1
    ok = ("audiogen_http_requests_total", (("endpoint", "/v1/generate"), ("status", "200")))
    assert after[ok] >= before.get(ok, 0) + SLOTS
    assert after[("audiogen_http_request_duration_seconds_count", (("endpoint", "/v1/generate"),))] > 0
    for gauge in ("audiogen_queue_depth", "audiogen_slots_in_use", "audiogen_slots_total",
                  "audiogen_requests_in_engine", "audiogen_request_capacity"):
        assert (gauge, ()) in after, gauge
    assert after[("audiogen_request_capacity", ())] == SLOTS + ENGINE_QUEUE


@pytest.mark.slow
def test_overload_answers_503_with_retry_after(server, client):
    _wait_idle(client)
    capacity = SLOTS + ENGINE_QUEUE

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            # fill the replica: every slot busy and the engine queue full, with clips that take a while
            holders = [asyncio.create_task(http.post("/v1/generate", json={"prompt": "hold", "duration": 60.0,
                                                                              "seed": i}))
                       for i in range(capacity)]
            deadline = time.monotonic() + 30
            while (stats := (await http.get("/v1/stats")).json())["in_engine"] < capacity:
                assert time.monotonic() < deadline, (stats, [h for h in holders if h.done()])
                await asyncio.sleep(0.05)
            one_more = await http.post("/v1/generate", json={"prompt": "one more", "duration": 0.2})
            burst = await asyncio.gather(*(http.post("/v1/generate", json={"prompt": "burst", "duration": 0.2})
                                           for _ in range(12)))
            health = await http.get("/healthz")
            for holder in holders:  # the holders give up: their requests are cancelled
                holder.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
        return one_more, burst, health

    one_more, burst, health = asyncio.run(scenario())
    # the replica's own bound: a JSON 503 naming the limit, with Retry-After
    assert one_more.status_code == 503, one_more.text
    assert one_more.headers["retry-after"] == "1"
    detail = one_more.json()["detail"][0]
    assert "queue is full" in detail["message"] and detail["limit"] == f"max_queued_requests={ENGINE_QUEUE}"
    # a burst on a full replica: refused by the replica or by Serve's bounded proxy queue, never queued unboundedly
    assert [r.status_code for r in burst] == [503] * len(burst), [(r.status_code, r.text[:80]) for r in burst]
    assert all(r.headers.get("retry-after", "").isdigit() for r in burst)
    assert health.status_code == 200
    stats = _wait_idle(client)
    assert stats["admission_rejected"] >= 1 and stats["in_engine"] == 0
    assert client.post("/v1/generate", json={"prompt": "after", "duration": 0.2}).status_code == 200


@pytest.mark.slow
def test_disconnect_cancels_and_frees_the_slot(server, client):
    before = _wait_idle(client)
    # a streaming client that goes away after the first chunk
    with httpx.Client(base_url=server, timeout=60) as other:
        with other.stream("POST", "/v1/generate",
                          json={"prompt": "long", "duration": 60.0, "seed": 1, "stream": True}) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()  # (a dropped iterator closes the response: keep it)
            next(chunks)
            assert (stats := _stats(client))["slots_in_use"] == 1, stats
    started = time.monotonic()
    after = _wait_idle(client, timeout=10)
    assert time.monotonic() - started < 5  # far sooner than the clip would take to finish
    assert after["cancelled"] == before["cancelled"] + 1 and after["finished"] == before["finished"]
    # a non-streaming client that gives up (times out) while its clip is generated
    with httpx.Client(base_url=server, timeout=httpx.Timeout(60, read=0.5)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/generate", json={"prompt": "long", "duration": 60.0, "seed": 2})
    final = _wait_idle(client, timeout=10)
    assert final["cancelled"] == before["cancelled"] + 2 and final["finished"] == before["finished"]
    metrics = _metrics(client)
    assert metrics[("audiogen_http_requests_total", (("endpoint", "/v1/generate"), ("status", "cancelled")))] >= 2
    assert metrics[("audiogen_requests_in_engine", ())] == 0 and metrics[("audiogen_slots_in_use", ())] == 0

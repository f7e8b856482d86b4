"""The Serve application (pipelines/serving/) against a locally running app on 127.0.0.1, and its parts.

One app per module: two tiny models saved to disk (`default` seed 0, `other` seed 1; max_duration raised to 300 s
so that a held clip outlives every test step, even on a fast machine), one engine replica with 2 slots + 1 engine queue place
(max_ongoing_requests 3) and 2 places in Serve's queue, so that filling every place is cheap and deterministic.
Every wait is bounded; latency bounds are generous (this runs on busy 2-core machines).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time

import numpy as np
import pytest
import soundfile as sf
import yaml

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")

from audiogen.engine import EngineSnapshot
from audiogen.errors import InvalidRequestError, QueueFullError
from pipelines.serving.app import DEFAULT_CONFIG, DEPLOYMENTS, ENGINE, INGRESS, ServeConfig, make_app
from pipelines.serving.autoscaling import LOAD_KEY, engine_load_policy
from pipelines.serving.replica import engine_load
from pipelines.serving.schemas import GenerateBody, InpaintBody, api_error, validation_details
from pipelines.serving.settings import AppSettings, LaunchOptions
from pipelines.serving.uploads import sample_mask

APP = "audiogen-test"
SLOTS, ENGINE_QUEUE, SERVE_QUEUE = 2, 1, 2
CAPACITY = SLOTS + ENGINE_QUEUE + SERVE_QUEUE  # requests the app holds before answering 503
SAMPLE_RATE = 16000
HOLD = {"prompt": "hold", "duration": 300.0}  # a clip that outlives any test step (cancelled by its client)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(check, timeout: float, what: str):
    """Poll `check()` until it returns something truthy (returned), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)
    return value


@pytest.fixture(scope="module")
def checksums(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Model id -> (directory, checksum) of the two tiny models."""
    from audiogen.scratch import random_model as tiny_model

    saved = {}
    for model_id, seed in (("default", 0), ("other", 1)):
        directory = tmp_path_factory.mktemp(f"serve_{model_id}")
        with tiny_model(seed=seed, max_duration=300.0) as model:
            model.save_pretrained(directory)
            saved[model_id] = (str(directory), model.checksum())
    return saved


@pytest.fixture(scope="module")
def server(ray_local, checksums):
    from ray import serve

    port = _free_port()
    args = {"model": checksums["default"][0], "models": {"other": checksums["other"][0]},
            "max_batch_slots": SLOTS, "queue_per_engine": ENGINE_QUEUE, "stream_chunk_frames": 10,
            "request_timeout_s": 60, "retry_after_s": 1, "cpu_threads": 1, "max_upload_bytes": 512 * 1024,
            "max_upload_seconds": 10}
    engine = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": SLOTS + ENGINE_QUEUE,
              "max_queued_requests": SERVE_QUEUE, "health_check_period_s": 2}
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    serve.run(make_app(args, {ENGINE: engine}), name=APP, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=30) as client:
        _wait_for(lambda: client.get("/readyz").status_code == 200, 60, "readiness")
    yield base
    serve.delete(APP)
    serve.shutdown()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def _totals(client) -> dict:
    response = client.get("/v1/stats")
    assert response.status_code == 200, response.text
    return response.json()["totals"]


def _wait_idle(client, timeout: float = 30.0) -> dict:
    """Engine counters once no request is decoding or queued (the board's view lags up to half a second)."""
    time.sleep(0.6)
    return _wait_for(lambda: (t := _totals(client))["busy_slots"] == 0 and t["queue_depth"] == 0 and t, timeout,
                     "idle engines")


def _wav(seconds: float, rate: int = 22050, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    audio = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([audio] * channels, axis=1), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _check_audio_headers(response, checksums, model: str = "default", seed: int | None = None) -> None:
    assert response.headers["x-audiogen-sample-rate"] == str(SAMPLE_RATE)
    assert response.headers["x-audiogen-model"] == model
    assert response.headers["x-audiogen-model-sha256"] == checksums[model][1]
    assert response.headers["x-request-id"]
    if seed is not None:
        assert response.headers["x-audiogen-seed"] == str(seed)


# --------------------------------------------------------------------------------------------------------------
# without Serve
# --------------------------------------------------------------------------------------------------------------
def test_config_file_code_defaults_and_cli_defaults_agree():
    import argparse

    from audiogen.cli_options import add_options

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    application = raw["applications"][0]
    listed = {d.pop("name"): d for d in application["deployments"]}
    assert listed == DEPLOYMENTS  # every deployment option, as the code sets it without a file
    assert AppSettings.from_args(application["args"]) == AppSettings()
    assert set(application["args"]) == {f.name for f in dataclasses.fields(AppSettings)}
    config = ServeConfig.read()
    assert config.launch_options() == dataclasses.asdict(LaunchOptions())
    assert config.http["host"] == "127.0.0.1" and (config.name, config.route_prefix) == ("audiogen", "/")
    parser = argparse.ArgumentParser()
    add_options(parser, LaunchOptions)  # the flags' defaults are the file's values
    defaults = vars(parser.parse_args([]))
    assert defaults == config.launch_options()
    for name, deployment in listed.items():
        assert deployment["max_queued_requests"] >= 0, name  # Serve's default (-1) would be unbounded


def test_cli_serve_flags_override_the_config(monkeypatch, tmp_path):
    import pipelines.serving.app
    from audiogen.cli import main

    calls = []
    monkeypatch.setattr(pipelines.serving.app, "run_local", calls.append)
    monkeypatch.chdir(tmp_path)  # no ./serve_config.yaml here: the built-in defaults (the same values)
    assert main(["serve", "--port", "8123", "--max-batch-slots", "4", "--num-gpus", "1", "--replicas", "2",
                 "--max-queued-requests", "3", "--models", "music=/m2"]) == 0
    config = calls[-1]
    assert config.http["port"] == 8123 and config.http["host"] == "127.0.0.1"
    assert config.args == {**AppSettings().as_args(), "max_batch_slots": 4, "models": {"music": "/m2"}}
    engine = config.deployments[ENGINE]
    assert engine["num_replicas"] == 2 and "autoscaling_config" not in engine and engine["max_queued_requests"] == 3
    assert engine["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert main(["serve"]) == 0 and calls[-1].deployments == DEPLOYMENTS  # bounded without a file
    custom = tmp_path / "custom.yaml"
    custom.write_text(DEFAULT_CONFIG.read_text().replace("max_batch_slots: 8 ", "max_batch_slots: 5 ")
                      .replace("port: 8000", "port: 9000"))
    assert main(["serve", "--config", str(custom), "--model", "/m"]) == 0
    assert calls[-1].args["max_batch_slots"] == 5 and calls[-1].args["model"] == "/m"
    assert calls[-1].http["port"] == 9000
    assert main(["serve", "--config", str(custom), "--max-batch-slots", "8", "--port", "8000"]) == 0
    assert calls[-1].args["max_batch_slots"] == 8 and calls[-1].http["port"] == 8000  # a default given explicitly
    assert main(["serve", "--max-batch-slots", "0"]) == 2  # refused, naming the option


def test_app_refuses_unbounded_or_starving_layouts():
    with pytest.raises(ValueError, match="AudioGenIngress.max_ongoing_requests must be >="):
        make_app({}, {ENGINE: {"num_replicas": 20}})
    with pytest.raises(ValueError, match="max_queued_requests must be bounded"):
        make_app({}, {ENGINE: {"max_queued_requests": -1}, INGRESS: {"max_ongoing_requests": 10**6}})
    with pytest.raises(InvalidRequestError, match="max_batch_slot"):
        make_app({"max_batch_slot": 2})


def test_autoscaling_follows_engine_load():
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    snapshot = EngineSnapshot(alive=True, busy_slots=8, max_slots=8, queue_depth=5, max_queued=16, error=None,
                              mean_occupancy=7.5, steps=100, audio_seconds=10.0)
    assert engine_load([snapshot, dataclasses.replace(snapshot, busy_slots=2, queue_depth=0)]) == {LOAD_KEY: 15.0}

    def context(loads: dict[str, float] | None, queued: float, requests: float) -> AutoscalingContext:
        return AutoscalingContext(
            deployment_id=None, deployment_name=ENGINE, app_name=APP, current_num_replicas=2, target_num_replicas=2,
            running_replicas=[], total_num_requests=requests, total_queued_requests=queued,
            aggregated_metrics={LOAD_KEY: loads} if loads is not None else {}, raw_metrics={},
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=10, policy_state={},
            last_scale_up_time=None, last_scale_down_time=None, current_time=0.0,
            config=AutoscalingConfig(target_ongoing_requests=8, max_replicas=10))

    assert engine_load_policy(context({"r1": 16.0, "r2": 12.0}, queued=4, requests=6))[0] == 4.0  # (28 + 4) / 8
    assert engine_load_policy(context({"r1": 0.0, "r2": 0.0}, queued=0, requests=0))[0] == 0.0
    assert engine_load_policy(context(None, queued=0, requests=24))[0] == 3.0  # no engine report yet


def test_inpaint_masks_to_samples():
    spans = sample_mask([(0.25, 0.5)], 16000, 16000, 16000, 320)
    assert spans.sum() == 4000 and spans[4000] and not spans[8000]
    frames = sample_mask([False] * 10 + [True] * 5 + [False] * 35, 16000, 16000, 16000, 320)
    assert np.flatnonzero(frames)[[0, -1]].tolist() == [3200, 4799]
    with pytest.raises(InvalidRequestError, match="mask"):
        sample_mask([True] * 49, 16000, 16000, 16000, 320)
    with pytest.raises(InvalidRequestError, match=r"mask\[0\]"):
        sample_mask([(0.5, 2.0)], 16000, 16000, 16000, 320)
    assert InpaintBody.model_validate({"mask": "[[0, 1]]"}).mask == [(0.0, 1.0)]


def test_error_mapping():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        InpaintBody.model_validate({"mask": "[[0, 1]]", "top_k": 2.5, "format": "mp3"})
    fields = {d["field"]: d for d in validation_details(caught.value.errors())}
    assert set(fields) == {"top_k", "format"} and "wav" in fields["format"]["limit"]
    with pytest.raises(ValidationError) as caught:  # a SamplingParams check keeps its field and limit
        GenerateBody.model_validate({"prompt": "a", "top_p": 1.5})
    assert validation_details(caught.value.errors())[0]["field"] == "top_p"
    busy = api_error(QueueFullError(3), retry_after_s=7)
    assert busy.status == 503 and busy.headers["Retry-After"] == "7"
    assert api_error(TimeoutError(), 1).status == 504
    assert api_error(InvalidRequestError("seed", "bad", limit="0..9"), 1).details[0]["limit"] == "0..9"


# --------------------------------------------------------------------------------------------------------------
# against the running app
# --------------------------------------------------------------------------------------------------------------
def test_health_readiness_models_docs(client, checksums):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "replicas": 1}
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(models) == {"default", "other"} and models["default"]["loaded"]
    default = models["default"]
    assert default["checksum"] == checksums["default"][1] and default["sample_rate"] == SAMPLE_RATE
    assert default["limits"]["max_duration"] == 300.0 and default["limits"]["max_batch_slots"] == SLOTS
    assert default["limits"]["max_prompt_tokens"] == 32 and {"wav", "flac", "ogg"} <= set(default["limits"]["formats"])
    assert client.get("/docs").status_code == 200
    openapi = client.get("/openapi.json").json()
    paths = openapi["paths"]
    assert {"/v1/generate", "/v1/continue", "/v1/inpaint", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(paths)
    fields = paths["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "reproduce a clip exactly" in fields["seed"]["description"]  # from SamplingParams' field metadata


@pytest.mark.parametrize("fmt,mime", [("wav", "audio/wav"), ("flac", "audio/flac"), ("ogg", "audio/ogg")])
def test_generate_each_format(client, checksums, fmt, mime):
    body = {"prompt": "a dog barking", "duration": 0.5, "seed": 11, "format": fmt, "temperature": 1.0,
            "top_k": 10, "top_p": 0.0, "guidance_scale": 3.0, "negative_prompt": "rain"}
    response = client.post("/v1/generate", json=body, headers={"X-Request-Id": f"req-{fmt}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == mime
    _check_audio_headers(response, checksums, seed=11)
    assert response.headers["x-request-id"] == f"req-{fmt}"
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == SAMPLE_RATE and abs(len(audio) - 8000) <= 320
    if fmt == "wav":  # same seed and parameters: the same clip; no seed: the one drawn is reported
        assert client.post("/v1/generate", json=body).content == response.content
        drawn = client.post("/v1/generate", json={"prompt": "beep", "duration": 0.2})
        again = client.post("/v1/generate", json={"prompt": "beep", "duration": 0.2,
                                                  "seed": int(drawn.headers["x-audiogen-seed"])})
        assert again.content == drawn.content


def test_models_are_chosen_per_request(client, checksums):
    body = {"prompt": "a bell", "duration": 0.4, "seed": 3}
    default = client.post("/v1/generate", json=body)
    other = client.post("/v1/generate", json={**body, "model": "other"})
    by_header = client.post("/v1/generate", json=body, headers={"serve_multiplexed_model_id": "other"})
    assert [r.status_code for r in (default, other, by_header)] == [200, 200, 200]
    _check_audio_headers(default, checksums, "default")
    _check_audio_headers(other, checksums, "other")
    _check_audio_headers(by_header, checksums, "other")
    assert other.content == by_header.content != default.content
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert _wait_for(lambda: {m["id"]: m for m in client.get("/v1/models").json()["data"]}["other"]["loaded"], 10,
                     "the other model's description") and models["other"]["id"] == "other"
    for extra, headers, limit in (({"model": "nope"}, {}, "default, other"),
                                  ({"model": "default"}, {"serve_multiplexed_model_id": "other"}, "one model")):
        response = client.post("/v1/generate", json={**body, **extra}, headers=headers)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["field"] == "model" and limit in response.json()["detail"][0]["limit"]


def test_deployment_handle_api(server, checksums):
    """Python callers and batch jobs call the engine deployment without HTTP; its load is the autoscaling signal."""
    from ray import serve

    from pipelines.serving.schemas import ApiError, Clip, StreamHead

    handle = serve.get_deployment_handle(ENGINE, app_name=APP)
    clip = handle.options(multiplexed_model_id="other").generate.remote(
        {"prompt": "rain", "duration": 0.3, "seed": 1, "model": "other"}).result(timeout_s=60)
    assert isinstance(clip, Clip) and clip.headers["X-Audiogen-Model-Sha256"] == checksums["other"][1]
    assert sf.read(io.BytesIO(clip.data))[1] == SAMPLE_RATE
    with pytest.raises(ApiError) as refused:
        handle.generate.remote({"prompt": "rain", "duration": 1000.0}).result(timeout_s=60)
    assert refused.value.status == 422 and refused.value.details[0]["field"] == "duration"

    async def held_load() -> dict[str, float]:
        stream = handle.options(stream=True).stream.remote(HOLD)
        try:
            assert isinstance(await asyncio.wait_for(anext(stream), 60), StreamHead)
            return await asyncio.wait_for(handle.record_autoscaling_stats.remote(), 60)
        finally:
            stream.cancel()

    assert asyncio.run(held_load()) == {LOAD_KEY: 1.0}  # the held clip, in its engine
    with httpx.Client(base_url=server, timeout=60) as client:
        _wait_idle(client)


@pytest.mark.slow
def test_stream_wav_first_chunk_before_last_frame(client, checksums):
    before = _wait_idle(client)
    seconds = 30.0
    started = time.perf_counter()
    with client.stream("POST", "/v1/generate",
                       json={"prompt": "rain on a roof", "duration": seconds, "seed": 5, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/wav"
        assert "content-length" not in response.headers
        _check_audio_headers(response, checksums, seed=5)
        chunks = response.iter_raw()
        first = next(chunks)
        first_at = time.perf_counter() - started
        data = first + b"".join(chunks)
        total_at = time.perf_counter() - started
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert len(data) == 44 + int(seconds * SAMPLE_RATE) * 2
    assert first_at < total_at / 2, (first_at, total_at)  # the first audio came while the clip was generated
    assert _wait_idle(client)["audio_seconds"] >= before["audio_seconds"] + seconds - 0.1
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


def test_continue(client, checksums):
    upload = _wav(1.0, rate=22050)  # resampled to the model's 16 kHz
    response = client.post("/v1/continue", files={"audio": ("in.wav", upload, "audio/wav")},
                           data={"prompt": "a dog barking", "extension_seconds": "0.5",
                                 "request": json.dumps({"seed": 3, "format": "flac"})})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/flac"
    _check_audio_headers(response, checksums, seed=3)
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == SAMPLE_RATE and abs(len(audio) - int(1.5 * SAMPLE_RATE)) <= 320
    # keep_original: the upload itself comes back in front of the extension
    original, _ = sf.read(io.BytesIO(upload), dtype="float32")
    from audiogen.io import resample

    expected = resample(original[None], 22050, SAMPLE_RATE)[0]
    assert np.abs(audio[:15000] - expected[:15000]).max() < 1e-3


def test_inpaint(client, checksums):
    upload = _wav(1.5, rate=SAMPLE_RATE, channels=2)  # downmixed to the model's mono
    for mask in ([[0.5, 1.0]], [False] * 25 + [True] * 25 + [False] * 25):
        response = client.post("/v1/inpaint", files={"audio": ("in.wav", upload, "audio/wav")},
                               data={"mask": json.dumps(mask), "seed": "9", "prompt": "a bell", "model": "other"})
        assert response.status_code == 200, response.text
        _check_audio_headers(response, checksums, "other", seed=9)
        audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
        assert rate == SAMPLE_RATE and len(audio) == int(1.5 * SAMPLE_RATE)
        original, _ = sf.read(io.BytesIO(upload), dtype="float32")
        kept = original.mean(axis=1)[:7000]  # before the gap (and its crossfade): the upload itself
        assert np.abs(audio[:7000] - kept).max() < 1e-3


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


# (raw body, status, field, text the limit contains): every malformed body gets a 4xx naming the field
MALFORMED = [
    (b"{not json", 422, "body", "JSON object"),
    (b"", 422, "body", "JSON object"),
    (b'{"prompt": "x", "duration": NaN}', 422, "duration", "finite"),
    (b'{"prompt": "x", "duration": Infinity}', 422, "duration", "finite"),
    (b'{"prompt": "x", "temperature": -Infinity}', 422, "temperature", "finite"),
    (b'{"prompt": "x", "seed": NaN}', 422, "seed", "finite"),
    (b"[1, 2]", 422, "body", "JSON object"),
    (b'"a dog"', 422, "body", "JSON object"),
    (b"null", 422, "body", "JSON object"),
    (b"42", 422, "body", "JSON object"),
    (_json({"duration": 1}), 422, "prompt", "required"),
    (_json({"prompt": 7}), 422, "prompt", "string"),
    (_json({"prompt": ["a"]}), 422, "prompt", "string"),
    (_json({"prompt": "   "}), 422, "prompt", "non-space"),
    (_json({"prompt": "x" * 2001}), 422, "prompt", "2000"),
    (_json({"prompt": "x" * 100_000}), 413, "body", "65536 bytes"),
    (_json({"prompt": " ".join(["dog"] * 40)}), 422, "prompt", "32 tokens"),
    (_json({"prompt": "a", "duration": 0}), 422, "duration", "300"),
    (_json({"prompt": "a", "duration": -2}), 422, "duration", "300"),
    (_json({"prompt": "a", "duration": 301}), 422, "duration", "300"),
    (_json({"prompt": "a", "duration": "long"}), 422, "duration", "number"),
    (_json({"prompt": "a", "temperature": -1}), 422, "temperature", "100"),
    (_json({"prompt": "a", "top_k": -1}), 422, "top_k", "0.."),
    (_json({"prompt": "a", "top_k": 2.5}), 422, "top_k", "integer"),
    (_json({"prompt": "a", "top_k": 1000}), 422, "top_k", "0..64"),
    (_json({"prompt": "a", "top_p": 1.5}), 422, "top_p", "top_p <= 1"),
    (_json({"prompt": "a", "guidance_scale": 1000}), 422, "guidance_scale", "100"),
    (_json({"prompt": "a", "seed": -1}), 422, "seed", "0.."),
    (_json({"prompt": "a", "seed": 2**64}), 422, "seed", "0.."),
    (_json({"prompt": "a", "format": "mp3"}), 422, "format", "wav"),
    (_json({"prompt": "a", "format": 3}), 422, "format", "wav"),
    (_json({"prompt": "a", "format": "flac", "stream": True}), 422, "format", "wav"),
    (_json({"prompt": "a", "stream": "maybe"}), 422, "stream", "true or false"),
    (_json({"prompt": "a", "negative_prompt": {"a": 1}}), 422, "negative_prompt", "string"),
    (_json({"prompt": "a", "model": 5}), 422, "model", "string"),
    (_json({"prompt": "a", "durations": 1}), 422, "durations", "no such field"),
]


@pytest.mark.parametrize("raw,status,field,limit", MALFORMED, ids=[f"{c[2]}-{i}" for i, c in enumerate(MALFORMED)])
def test_malformed_bodies_get_4xx_naming_the_field(client, raw, status, field, limit):
    response = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    detail = response.json()["detail"][0]
    assert detail["field"] == field, detail
    assert limit in (detail["limit"] or ""), detail
    assert detail["message"]


UPLOAD_4XX = [
    ("/v1/continue", b"this is not audio", {"extension_seconds": "0.5"}, 422, "audio", None),
    ("/v1/continue", b"\0" * (600 * 1024), {}, 413, "body", "bytes"),
    ("/v1/continue", "long", {"extension_seconds": "0.5"}, 422, "audio", "10 s"),
    ("/v1/continue", "short", {"extension_seconds": "1000"}, 422, "extension_seconds", "extension_seconds <="),
    ("/v1/continue", "short", {"extension_seconds": "NaN"}, 422, "extension_seconds", "finite"),
    ("/v1/continue", "short", {"top_p": "2"}, 422, "top_p", "1"),
    ("/v1/continue", None, {"extension_seconds": "0.5"}, 422, "audio", "audio"),
    ("/v1/continue", "short", {"request": "[1, 2]"}, 422, "request", "JSON object"),
    ("/v1/continue", "short", {"model": "nope"}, 422, "model", "default, other"),
    ("/v1/inpaint", "short", {"mask": "[[0.5, 3.0]]"}, 422, "mask[0]", "1.000 s"),
    ("/v1/inpaint", "short", {"mask": json.dumps([True] * 10)}, 422, "mask", "50"),
    ("/v1/inpaint", "short", {"mask": "[]"}, 422, "mask", "at least one"),
    ("/v1/inpaint", "short", {"mask": "nope"}, 422, "mask", "start_s"),
    ("/v1/inpaint", "short", {}, 422, "mask", "required"),
    ("/v1/inpaint", "short", {"mask": "[[0, 0.5]]", "format": "mp3"}, 422, "format", "wav"),
]


@pytest.mark.parametrize("path,audio,fields,status,field,limit", UPLOAD_4XX,
                         ids=[f"{c[0][4:]}-{c[4]}-{i}" for i, c in enumerate(UPLOAD_4XX)])
def test_upload_validation(client, path, audio, fields, status, field, limit):
    data = {"short": _wav(1.0, rate=SAMPLE_RATE), "long": _wav(11.0, rate=8000)}.get(audio, audio)
    # no audio: still multipart (a plain field sent as a part without a filename)
    files = {"audio": ("in.wav", data, "audio/wav")} if data is not None else {"seed": (None, "1")}
    response = client.post(path, files=files, data=fields)
    assert response.status_code == status, response.text
    detail = response.json()["detail"][0]
    assert detail["field"] == field, detail
    if limit is not None:
        assert limit in (detail["limit"] or ""), detail


async def _timed(http, method: str, path: str, timeout: float = 30.0, **kwargs) -> tuple[int | str, dict, float]:
    """(status, headers, seconds) of one request; "timeout" when it is neither served nor refused in `timeout`."""
    started = time.perf_counter()
    try:
        response = await http.request(method, path, timeout=timeout, **kwargs)
        return response.status_code, dict(response.headers), time.perf_counter() - started
    except httpx.TimeoutException:
        return "timeout", {}, time.perf_counter() - started


@pytest.mark.slow
def test_full_app_stays_healthy_and_answers_fast_503s(server, client):
    """Every slot, engine queue place and Serve queue place taken by long clips: health, readiness, models and
    stats still answer within 2 s, and a burst of 16x the capacity gets only fast 503s with Retry-After."""
    _wait_idle(client)

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=120, limits=httpx.Limits(max_connections=200)) as http:
            holders = [asyncio.create_task(http.post("/v1/generate", json={**HOLD, "seed": i}))
                       for i in range(SLOTS + ENGINE_QUEUE)]
            deadline = time.monotonic() + 60
            while True:  # the replica's places: both slots decoding, the engine queue full
                totals = (await http.get("/v1/stats")).json()["totals"]
                if (totals["busy_slots"], totals["queue_depth"]) == (SLOTS, ENGINE_QUEUE):
                    break
                assert time.monotonic() < deadline and not any(h.done() for h in holders), totals
                await asyncio.sleep(0.1)
            holders += [asyncio.create_task(http.post("/v1/generate", json={**HOLD, "seed": 10 + i}))
                        for i in range(SERVE_QUEUE)]  # Serve's queue: waiting for the full replica
            await asyncio.sleep(2.0)  # (sent and queued; a probe must not take their places)
            while (probe := await _timed(http, "POST", "/v1/generate", 3.0, json={"prompt": "p", "duration": 0.2})
                   )[0] != 503:  # a probe that got a place times out (and leaves it): every place is not yet taken
                assert time.monotonic() < deadline and not any(h.done() for h in holders), probe
            probes = [(path, await _timed(http, "GET", path)) for path in ("/healthz", "/readyz", "/v1/models",
                                                                          "/v1/stats") for _ in range(3)]
            burst = await asyncio.gather(*(_timed(http, "POST", "/v1/generate", json={"prompt": "b", "duration": 0.2})
                                           for _ in range(16 * CAPACITY)))
            still_full = (await http.get("/v1/stats")).json()["totals"]
            assert not any(h.done() for h in holders), [h.result().text for h in holders if h.done()]
            for holder in holders:  # the holders give up: their requests are cancelled
                holder.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
        return probe, probes, burst, still_full

    probe, probes, burst, still_full = asyncio.run(scenario())
    assert probe[1]["retry-after"] == "1"
    for path, (status, _, seconds) in probes:
        assert status == 200 and seconds < 2.0, (path, status, seconds)
    assert (still_full["busy_slots"], still_full["queue_depth"]) == (SLOTS, ENGINE_QUEUE)
    assert {status for status, _, _ in burst} == {503}, burst
    assert all(headers["retry-after"] == "1" for _, headers, _ in burst)
    assert max(seconds for _, _, seconds in burst) < 10.0  # refused at once, not after waiting for a place
    _wait_idle(client)  # the cancelled holders freed their slots


@pytest.mark.slow
def test_overload_gives_only_200s_and_fast_503s(server, client):
    """16x the app's capacity at once, short clips: each request is served or refused at once, never left waiting."""
    _wait_idle(client)

    async def burst():
        async with httpx.AsyncClient(base_url=server, timeout=120, limits=httpx.Limits(max_connections=200)) as http:
            return await asyncio.gather(*(_timed(http, "POST", "/v1/generate", 60.0,
                                                 json={"prompt": f"burst {i}", "duration": 0.5, "seed": i})
                                          for i in range(16 * CAPACITY)))

    answers = asyncio.run(burst())
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}, answers
    assert statuses.count(200) >= SLOTS and statuses.count(503) >= CAPACITY, statuses
    refused = [(headers, seconds) for status, headers, seconds in answers if status == 503]
    assert all(headers["retry-after"] == "1" for headers, _ in refused)
    assert max(seconds for _, seconds in refused) < 10.0, sorted(s for _, s in refused)[-5:]


@pytest.mark.slow
def test_disconnect_cancels_and_frees_the_slot(server, client):
    _wait_idle(client)
    # a streaming client that goes away after the first chunk
    with httpx.Client(base_url=server, timeout=60) as other:
        with other.stream("POST", "/v1/generate", json={**HOLD, "seed": 1, "stream": True}) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()  # (a dropped iterator closes the response: keep it)
            next(chunks)
            _wait_for(lambda: _totals(client)["busy_slots"] == 1, 10, "the streamed clip in its slot")
    started = time.monotonic()
    _wait_idle(client, timeout=15)
    assert time.monotonic() - started < 10  # far sooner than the 60 s clip would take to finish
    # a non-streaming client that gives up (times out) while its clip is generated
    with httpx.Client(base_url=server, timeout=httpx.Timeout(60, read=1.0)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/generate", json={**HOLD, "seed": 2})
    _wait_idle(client, timeout=15)


@pytest.mark.slow
def test_metrics_through_ray_export(client):
    """Ray exports the replicas' series every few seconds; `/metrics` shows this node's audiogen series."""
    from prometheus_client.parser import text_string_to_metric_families

    from pipelines.serving.metrics import EXPORTED_PREFIXES

    assert client.post("/v1/generate", json={"prompt": "metrics", "duration": 0.3}).status_code == 200

    def scraped() -> dict[str, list]:
        response = client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        samples: dict[str, list] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(sample)
        ready = {"ray_audiogen_http_requests_total", "ray_audiogen_engine_slots",
                 "ray_audiogen_engine_audio_seconds_total"} <= set(samples)
        return samples if ready else {}

    samples = _wait_for(scraped, 60, "the app's series in Ray's metrics export")
    assert all(name.startswith(EXPORTED_PREFIXES) for name in samples) and "ray_serve_num_http_requests_total" in samples
    ok = [s for s in samples["ray_audiogen_http_requests_total"]
          if s.labels["route"] == "/v1/generate" and s.labels["status"] == "200"]
    assert ok and ok[0].value >= 1 and ok[0].labels["deployment"] == INGRESS
    slots = {s.labels["model"]: s.value for s in samples["ray_audiogen_engine_slots"]}
    assert slots["default"] == SLOTS

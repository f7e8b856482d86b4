"""Batch rendering end to end on a local Ray instance: local files and moto S3, bad rows, resume, the processor
API, and faults (a killed actor, a dead engine)."""

import hashlib
import io
import json
import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from audiogen.cli import main
from audiogen.defaults import default_model_path
from audiogen.sampling_params import SamplingParams
from pipelines.job import progress_actor_name
from pipelines.manifest import normalize_row
from pipelines.processor import RenderConfig, RenderWorker, build_audio_processor
from pipelines.render import RenderOptions, run_render
from pipelines.storage import Storage

GOOD = [
    {"id": "dog-1", "prompt": "a dog barking", "duration": 1.0, "seed": 1},
    {"id": "rain/../../x", "prompt": "rain on a roof", "duration": 0.6, "seed": None},
    {"id": None, "prompt": "a high beep", "duration": 0.8, "seed": 5},
    {"id": None, "prompt": "low rumble", "duration": None, "seed": None},
    {"id": "bell", "prompt": "church bell", "duration": 0.4, "seed": 9},
]
BAD = [
    {"id": "empty", "prompt": "", "duration": 1.0, "seed": 1},            # empty prompt (planning)
    {"id": "negative", "prompt": "x", "duration": -1.0, "seed": 1},      # duration <= 0 (planning)
    {"id": "too-long", "prompt": "x", "duration": 60.0, "seed": 1},      # beyond the model's max (engine)
    {"id": "dog-1", "prompt": "another dog", "duration": 1.0, "seed": 2},  # duplicate id
]


def _manifest(rows):
    return pa.table({"id": [r["id"] for r in rows], "prompt": [r["prompt"] for r in rows],
                     "duration": pa.array([r["duration"] for r in rows], pa.float64()),
                     "seed": pa.array([r["seed"] for r in rows], pa.int64())})


def _write_manifest(tmp_path, rows) -> str:
    path = tmp_path / "m.parquet"
    pq.write_table(_manifest(rows), path)
    return str(path)


def _options(manifest, output, **extra):
    return RenderOptions(input=manifest, output=output, duration=0.5, max_batch_slots=4, part_rows=4,
                         progress=False, **extra)


DEFAULT_MODEL_CONFIG = json.loads((default_model_path() / "config.json").read_text())["config"]
DEFAULT_MODEL_NAME = DEFAULT_MODEL_CONFIG["name"]


def _check_output(storage: Storage, expected_ids: set[str], expected_errors: set[str]) -> None:
    metadata = storage.read_tables("metadata")
    ids = metadata["id"].to_pylist()
    assert sorted(ids) == sorted(expected_ids), "every good row exactly once"
    audio = storage.list("audio", ".wav")
    assert sorted(audio) == sorted(metadata["file"].to_pylist())
    for row in metadata.to_pylist():
        data = storage.read_bytes(f"audio/{row['file']}")
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["bytes"]
        samples, rate = sf.read(io.BytesIO(data), always_2d=True)
        assert rate == row["sample_rate"] == 16000 and samples.shape[0] == row["num_samples"]
        assert row["model"] == DEFAULT_MODEL_NAME and len(row["model_checksum"]) == 64
    errors = storage.read_tables("errors")
    error_ids = [] if errors is None else errors["id"].to_pylist()
    assert sorted(error_ids) == sorted(expected_errors), "errors table holds exactly the bad rows"


def _good_ids():
    return {normalize_row(row, SamplingParams(), 0.5)["id"] for row in GOOD}


@pytest.mark.slow
def test_render_local_end_to_end_with_bad_rows(ray_local, tmp_path, capsys):
    manifest = _write_manifest(tmp_path, GOOD + BAD)
    output = str(tmp_path / "out")
    # the first run through the CLI (exit code 1: some rows failed), the rerun through the Python API
    assert main(["render", manifest, "-o", output, "--duration", "0.5", "--max-batch-slots", "4",
                 "--part-rows", "2", "--no-progress"]) == 1
    summary = json.loads(capsys.readouterr().out)
    storage = Storage(output)
    _check_output(storage, _good_ids(), {"empty", "negative", "too-long", "dog-1"})
    errors = {e["id"]: e for e in storage.read_tables("errors").to_pylist()}
    too_long = errors["too-long"]
    assert too_long["field"] == "duration" and f"<= {DEFAULT_MODEL_CONFIG['max_duration']:.1f} s" in too_long["message"]
    assert errors["negative"]["field"] == "duration" and "allowed: duration > 0 s" in errors["negative"]["message"]
    assert errors["dog-1"]["row"] == 8 and "row 0 of the manifest" in errors["dog-1"]["message"]
    assert summary["rows_read"] == 9 and summary["rows_rendered"] == 5 and summary["rows_failed"] == 4
    assert all(name.startswith(("dog-1", "rain_", "r-", "bell")) for name in storage.list("audio"))
    assert json.loads(storage.read_bytes("_SUCCESS"))["rows_rendered"] == 5
    # rerun of a finished job renders nothing (the engine-rejected row is tried again and fails again)
    again = run_render(_options(manifest, output))
    assert again["rows_rendered"] == 0 and again["rows_skipped_done"] == 5 and again["rows_failed"] == 4
    _check_output(storage, _good_ids(), {"empty", "negative", "too-long", "dog-1"})


@pytest.mark.slow
def test_render_s3_end_to_end(ray_local, s3_bucket):
    bucket, options = s3_bucket
    storage_in = Storage(f"s3://{bucket}/manifests", options)
    buffer = io.BytesIO()
    pq.write_table(_manifest(GOOD[:3] + BAD[:1]), buffer)
    storage_in.write_bytes("part-0.parquet", buffer.getvalue())
    summary = run_render(_options(f"s3://{bucket}/manifests/", f"s3://{bucket}/renders", storage_options=options))
    assert summary["rows_rendered"] == 3 and summary["rows_invalid"] == 1
    out = Storage(f"s3://{bucket}/renders", options)
    metadata = out.read_tables("metadata")
    assert len(metadata) == 3
    _check_output(out, set(metadata["id"].to_pylist()), {"empty"})
    again = run_render(_options(f"s3://{bucket}/manifests/", f"s3://{bucket}/renders", storage_options=options))
    assert again["rows_skipped_done"] == 3 and again["rows_rendered"] == 0


@pytest.mark.slow
def test_resume_renders_only_the_rest_and_repairs_orphans(ray_local, tmp_path):
    rows = [{"id": f"clip-{i}", "prompt": f"noise {i}", "duration": 0.3, "seed": i} for i in range(12)]
    manifest = _write_manifest(tmp_path, rows)
    output = str(tmp_path / "out")
    first = run_render(_options(manifest, output, limit=5))  # a job stopped part-way
    assert first["rows_rendered"] == 5 and first["rows_read"] == 5
    storage = Storage(output)
    before = {name: (tmp_path / "out" / "audio" / name).stat().st_mtime_ns for name in storage.list("audio")}
    # an orphan: audio of clip-11 written, but its metadata never committed (a crash between the two writes)
    storage.write_bytes("audio/clip-11.wav", b"partial")
    second = run_render(_options(manifest, output))
    assert second["rows_rendered"] == 7 and second["rows_skipped_done"] == 5
    after = {name: (tmp_path / "out" / "audio" / name).stat().st_mtime_ns for name in before}
    assert after == before, "committed clips are not written again"
    _check_output(storage, {f"clip-{i}" for i in range(12)}, set())
    assert storage.read_bytes("audio/clip-11.wav") != b"partial"
    parts = [len(pq.read_table(tmp_path / "out" / "metadata" / name)) for name in storage.list("metadata")]
    assert sum(parts) == 12 and all(size >= 4 for size in parts[:-1]), "parts hold at least --part-rows rows"


def _run_in_thread(options, **kwargs):
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run_render(options, **kwargs)))
    job.start()
    return job, result


@pytest.mark.slow
def test_killing_a_render_actor_mid_job_loses_and_duplicates_nothing(ray_local, tmp_path):
    import ray

    rows = [{"id": f"k-{i}", "prompt": f"hum {i}", "duration": 1.5, "seed": i} for i in range(16)]
    output = str(tmp_path / "out")
    job, result = _run_in_thread(_options(_write_manifest(tmp_path, rows), output))
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and job.is_alive():
        try:
            snapshot = ray.get(ray.get_actor(progress_actor_name(output)).snapshot.remote())
        except (ValueError, ray.exceptions.RayActorError):  # not started yet / job already over
            snapshot = {"rows": 0, "workers": {}}
        if snapshot["rows"] >= 2 and snapshot["workers"]:
            killed = next(iter(snapshot["workers"].values()))["pid"]
            os.kill(killed, signal.SIGKILL)  # the process dies as in a crash: Ray restarts the actor
        time.sleep(0.05)
    job.join(timeout=300)
    assert killed is not None, "the test must kill an actor while the job runs"
    assert not job.is_alive() and result["rows_rendered"] == 16
    _check_output(Storage(output), {f"k-{i}" for i in range(16)}, set())


class EngineFailsOnce(RenderWorker):
    """The first actor's engine fails a decoding step after a few steps; its restarted successor works."""

    def _start_engine(self) -> None:
        super()._start_engine()
        marker = os.path.join(self.config.output, "engine-failed-once")
        if not os.path.exists(marker):
            step, calls = self.engine.batch.step, []

            def failing_step():
                calls.append(1)
                if len(calls) > 3:
                    open(marker, "w").close()
                    raise RuntimeError("injected step failure")
                return step()

            self.engine.batch.step = failing_step


@pytest.mark.slow
def test_a_dead_engine_restarts_its_actor_and_its_rows_are_retried(ray_local, tmp_path):
    rows = [{"id": f"e-{i}", "prompt": f"buzz {i}", "duration": 0.4, "seed": i} for i in range(10)]
    output = tmp_path / "out"
    output.mkdir()
    summary = run_render(_options(_write_manifest(tmp_path, rows), str(output)), worker=EngineFailsOnce)
    assert (output / "engine-failed-once").exists(), "an engine step failed mid-job"
    assert summary["rows_rendered"] == 10 and summary["rows_failed"] == 0
    storage = Storage(str(output))
    _check_output(storage, {f"e-{i}" for i in range(10)}, set())
    assert len(set(storage.read_tables("metadata")["actor_id"].to_pylist())) == 1  # the same actor, restarted


@pytest.mark.slow
def test_processor_in_a_users_pipeline_keeps_their_columns(ray_local, tmp_path):
    import ray

    processor = build_audio_processor(RenderConfig(output=str(tmp_path / "clips"), max_batch_slots=2,
                                                   sampling=SamplingParams(temperature=0.5)))
    rows = ray.data.from_items([{"prompt": "a beep", "duration": 0.3, "seed": 3, "user": "a"},
                                {"prompt": "", "duration": 0.3, "seed": 4, "user": "b"},
                                {"prompt": "a hum", "duration": 45.0, "seed": 5, "user": "c"}])
    out = {row["user"]: row for row in processor(rows).take_all()}
    assert [out[u]["status"] for u in "abc"] == ["rendered", "invalid", "failed"]
    assert out["a"]["temperature"] == 0.5 and out["a"]["seed"] == 3 and out["a"]["sample_rate"] == 16000
    data = (tmp_path / "clips" / "audio" / out["a"]["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == out["a"]["sha256"]
    assert out["b"]["error_field"] == "prompt" and out["c"]["error_field"] == "duration"


@pytest.mark.slow
def test_render_with_the_onnx_backend_matches_torch(ray_local, tmp_path):
    from audiogen.onnx.export import export_onnx
    from audiogen.scratch import random_model as tiny_model

    model = tiny_model(seed=0)
    try:
        export_onnx(model, tmp_path / "onnx")
        model.save_pretrained(tmp_path / "torch")
    finally:
        model.close()
    rows = [{"id": f"o-{i}", "prompt": f"beep {i}", "duration": 0.4, "seed": i} for i in range(3)]
    manifest = _write_manifest(tmp_path, rows)
    audio = {}
    for backend in ("torch", "onnx"):
        output = str(tmp_path / f"out-{backend}")
        run_render(_options(manifest, output, model=str(tmp_path / backend), backend=backend, subtype="FLOAT"))
        metadata = Storage(output).read_tables("metadata")
        assert sorted(metadata["id"].to_pylist()) == ["o-0", "o-1", "o-2"]
        audio[backend] = {row_id: sf.read(f"{output}/audio/{row_id}.wav")[0] for row_id in metadata["id"].to_pylist()}
    for row_id, clip in audio["torch"].items():
        assert clip.shape == audio["onnx"][row_id].shape
        assert abs(clip - audio["onnx"][row_id]).max() < 1e-4

"""`pipelines.train` on the 2-CPU local Ray cluster: 2 gloo workers on a tiny synthetic (caption, tone) set.

One DDP training run (module fixture) is shared by several checks: the loss drops, a worker the test kills
mid-run (SIGKILL, as a lost node) makes the run resume from its checkpoint and finish (step counter continued,
not restarted), checkpoints are pruned, and the exported model loads and generates. A second, short FSDP run goes
through moto S3 for data, checkpoints and export, and is then resumed by rerunning the same job with more steps.
"""

import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from audiogen import AudioGen
from audiogen.training import CHECKPOINT_STATE_FILE, read_checkpoint_meta
from pipelines.encode import codes_table, load_codec, segment_audio
from pipelines.train import TrainOptions, is_val_row, run_train

pytestmark = pytest.mark.slow

TONES = {"a low beep": 220.0, "a high beep": 1760.0, "a medium tone": 660.0, "a very high whistle": 3520.0}
MAX_STEPS, EVAL_EVERY, KILL_AFTER = 60, 10, 20


def write_tone_dataset(directory, clips_per_caption=8, seconds=2.0, seed=0):
    """Sine tones whose pitch depends on the caption (random level, phase and +-2 % detune), cut into 1 s
    segments and encoded with the tiny codec, written as an encode output (`codes/part-0.parquet`)."""
    codec = load_codec("tiny")
    rng = np.random.default_rng(seed)
    rows, audio = [], []
    t = np.arange(int(16000 * seconds)) / 16000
    for caption, pitch in TONES.items():
        for j in range(clips_per_caption):
            wave = (0.3 + 0.4 * rng.random()) * np.sin(
                2 * np.pi * pitch * (1 + 0.02 * rng.standard_normal()) * t + 2 * np.pi * rng.random())
            segments, total = segment_audio(wave[None].astype(np.float32), sample_rate=16000, hop_length=320,
                                            segment_seconds=1.0)
            for segment in segments:
                rows.append(dict(id=f"{caption}-{j}", segment=segment.index, n_segments=total, caption=caption,
                                 path="", split=None, offset=float(segment.index), duration=segment.n_frames / 50,
                                 n_frames=segment.n_frames))
                audio.append(segment.audio)
    with torch.inference_mode():
        codes = codec.encode(torch.from_numpy(np.stack(audio))).numpy()
    os.makedirs(directory / "codes", exist_ok=True)
    pq.write_table(codes_table(rows, codes, codec.checksum()), directory / "codes" / "part-0.parquet")
    return len(rows)


@pytest.fixture(scope="module")
def tone_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tones")
    rows = write_tone_dataset(directory)
    return directory, rows


def kill_a_worker_once_registered(run_dir, step, killed, timeout=900.0):
    """Wait until Ray Train's controller has registered a checkpoint of `step` or later (it rewrites the run's
    `checkpoint_manager_snapshot.json` on every registration), then SIGKILL one TorchTrainer worker process of
    this test's Ray cluster, as a lost node would die; `killed` gets the registered step. Gives up after
    `timeout` seconds (the test then fails on the missing kill)."""
    import ray._private.state

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
            latest = int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
        except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being rewritten
            latest = 0
        if latest >= step:
            pids = [actor["Pid"] for actor in ray._private.state.actors().values()
                    if actor["ActorClassName"] == "RayTrainWorker" and actor["State"] == "ALIVE"]
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(latest)
                return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def trained(ray_local, tone_data, tmp_path_factory):
    """60 steps, 2 workers, checkpoints every 10 steps; a worker is killed once the step-20 checkpoint is
    registered."""
    data, _ = tone_data
    root = tmp_path_factory.mktemp("train")
    options = TrainOptions(
        data=str(data), storage=str(root / "runs"), name="tones", preset="tiny", base="tiny", workers=2,
        batch_size=4, max_steps=MAX_STEPS, log_every=5, eval_every=EVAL_EVERY, keep=2, max_failures=3,
        val_fraction=0.15, export=str(root / "export"), training={"lr": 1e-2, "warmup_steps": 5, "schedule": "cosine"})
    killed = []
    killer = threading.Thread(target=kill_a_worker_once_registered, args=(root / "runs" / "tones", KILL_AFTER, killed),
                              daemon=True)
    killer.start()
    summary = run_train(options)
    killer.join(timeout=5)
    return summary, root, killed


def test_loss_drops_well_below_its_initial_value(trained):
    summary, _, _ = trained
    history = summary["history"]
    first = history[0]
    assert first["step"] == 1 and first["start_step"] == 0
    final = [h for h in history if h["step"] == MAX_STEPS][0]
    # measured (2 workers, this data): step 1 4.20 (uniform over 64 codes: 4.16), steps 56-60 1.75 (0.42x);
    # validation 2.07 (0.49x)
    assert first["loss"] > 3.8
    assert final["loss"] < 0.55 * first["loss"], [(h["step"], round(h["loss"], 3)) for h in history]
    # per-codebook losses and the validation loss are reported and fall too
    assert all(final[f"loss_q{k}"] < first[f"loss_q{k}"] for k in range(4))
    val = [h["val_loss"] for h in history if "val_loss" in h]
    assert val and val[-1] < 0.65 * first["loss"]
    assert final["tokens_per_s"] > 0 and final["lr"] >= 0


def test_killed_worker_resumes_from_its_checkpoint(trained):
    summary, root, killed = trained
    history = summary["history"]
    # The first attempt reported from step 1; the last one started from the latest checkpoint registered when
    # the worker died: the one the kill waited for (step 20) or, if the controller was quicker, a later one.
    assert killed and killed[0] >= KILL_AFTER, "the worker was not killed"
    assert summary["resumed"] is True
    resumed_at = summary["start_step"]
    assert resumed_at % EVAL_EVERY == 0 and killed[0] <= resumed_at < MAX_STEPS
    starts = sorted({h["start_step"] for h in history})
    assert starts[0] == 0 and starts[-1] == resumed_at
    steps_after = [h["step"] for h in history if h["start_step"] == resumed_at]
    assert steps_after[0] == resumed_at + 1 and steps_after[-1] == MAX_STEPS  # continued, not restarted
    assert max(h["step"] for h in history if h["start_step"] == 0) <= resumed_at
    assert summary["metrics"]["step"] == MAX_STEPS
    # checkpoints: the 2 best by val_loss plus the latest are kept
    runs = root / "runs" / "tones"
    kept = sorted(p for p in runs.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())
    assert 2 <= len(kept) <= 3
    steps = sorted(read_checkpoint_meta(p)["step"] for p in kept)
    assert steps[-1] == MAX_STEPS
    payload = torch.load(kept[-1] / CHECKPOINT_STATE_FILE, weights_only=True)
    assert payload["step"] in steps and "optimizer" in payload and "scheduler" in payload


def test_exported_model_loads_and_generates(trained):
    summary, root, _ = trained
    model = AudioGen.from_pretrained(root / "export", device="cpu")
    try:
        assert model.config.name == "audiogen-tiny" and model.source["step"] == MAX_STEPS
        clip = model.generate("a high beep", duration=1.0, seed=0)[0]
        assert clip.shape == (1, 16000) and np.isfinite(clip).all()
        # the exported LM is the final checkpoint's
        final = [p for p in summary["checkpoints"] if read_checkpoint_meta(p)["step"] == MAX_STEPS][0]
        state = torch.load(os.path.join(final, CHECKPOINT_STATE_FILE), weights_only=True)["model"]
        for key, value in model.lm.state_dict().items():
            assert torch.equal(value, state[f"lm.{key}"]), key
    finally:
        model.close()


def test_fsdp_train_and_resume_through_s3(ray_local, tone_data, s3_bucket, tmp_path):
    """FSDP (2 gloo workers, gradient accumulation) with data, checkpoints and export on (moto) S3; rerunning the
    job with more steps continues the run from its latest checkpoint."""
    import fsspec

    data, rows = tone_data
    bucket, storage_options = s3_bucket
    fs = fsspec.filesystem("s3", **storage_options)
    fs.put(str(data / "codes" / "part-0.parquet"), f"{bucket}/data/codes/part-0.parquet")
    common = dict(data=f"s3://{bucket}/data", storage=f"s3://{bucket}/runs", name="s3run", preset="tiny",
                  base="tiny", workers=2, batch_size=4, log_every=2, eval_every=2, keep=1, val_fraction=0.15,
                  max_val_batches=1, storage_options=storage_options, strategy="fsdp",
                  training={"lr": 3e-3, "warmup_steps": 1, "grad_accum": 2})
    first = run_train(TrainOptions(max_steps=4, **common))
    assert first["start_step"] == 0 and first["metrics"]["step"] == 4
    assert first["train_rows"] + first["val_rows"] == rows
    second = run_train(TrainOptions(max_steps=6, export=f"s3://{bucket}/export", **common))
    assert second["resumed"] is True and second["start_step"] == 4 and second["metrics"]["step"] == 6
    assert [h["step"] for h in second["history"]][:3] == [1, 2, 4]  # history carried over in the checkpoint
    assert fs.exists(f"{bucket}/export/model.safetensors")
    meta = json.loads(fs.cat(f"{bucket}/export/config.json"))
    assert meta["source"]["step"] == 6
    checkpoints = [p for p in fs.ls(f"{bucket}/runs/s3run") if "checkpoint_" in p and not p.endswith(".json")]
    assert 1 <= len(checkpoints) <= 2
    # the exported (FSDP-gathered) weights load and generate
    local = tmp_path / "export"
    fs.get(f"{bucket}/export/", str(local), recursive=True)
    model = AudioGen.from_pretrained(local, device="cpu")
    try:
        assert np.isfinite(model.generate("a low beep", duration=0.4, seed=0)[0]).all()
    finally:
        model.close()


def test_validation_split_is_by_file():
    ids = [f"file-{i}" for i in range(2000)]
    fraction = sum(is_val_row(i, None, 0.1) for i in ids) / len(ids)
    assert 0.07 < fraction < 0.13
    assert is_val_row("x", "val", 0.0) and not is_val_row("x", "train", 0.99)


def test_codec_mismatch_is_refused(ray_local, tone_data, tmp_path):
    data, _ = tone_data
    with pytest.raises(ValueError, match="codec"):
        run_train(TrainOptions(data=str(data), storage=str(tmp_path), preset="tiny", base="tiny:1", max_steps=1))


def test_cli_maps_train_arguments(monkeypatch, capsys):
    import pipelines.train

    from audiogen.cli import main

    captured = {}

    def fake_run(options):
        captured["options"] = options
        return {"history": [], "metrics": {"step": 3}}

    monkeypatch.setattr(pipelines.train, "run_train", fake_run)
    assert main(["train", "s3://b/codes", "--storage", "s3://b/runs", "--preset", "small", "--base", "tiny",
                 "--override", "dim=256", "--override", "num_layers=2", "--workers", "4", "--strategy", "fsdp",
                 "--grad-accum", "2", "--max-steps", "50", "--schedule", "cosine", "--cfg-dropout-mode", "batch",
                 "--storage-option", "endpoint_url=http://x", "--export", "out"]) == 0
    options = captured["options"]
    assert (options.preset, options.base, options.init, options.workers, options.strategy) == (
        "small", "tiny", None, 4, "fsdp")
    assert options.overrides == {"dim": 256, "num_layers": 2}
    assert options.storage_options == {"endpoint_url": "http://x"} and options.export == "out"
    training = options.training_config()
    assert (training.grad_accum, training.schedule, training.warmup_steps, training.cfg_dropout_mode,
            training.max_steps) == (2, "cosine", 5, "batch", 50)
    assert json.loads(capsys.readouterr().out)["metrics"]["step"] == 3
    assert main(["train", "d", "--storage", "s", "--preset", "tiny"]) == 0  # no --base: the embedded demo model's
    assert (captured["options"].preset, captured["options"].base) == ("tiny", "default")
    capsys.readouterr()
    # --init and --preset are mutually exclusive (TrainOptions says so, the CLI exits 2 with its message)
    assert main(["train", "d", "--storage", "s", "--preset", "tiny", "--init", "m"]) == 2
    assert "preset" in capsys.readouterr().err

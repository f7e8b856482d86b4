"""`jobs/demo_model.py` at micro scale on the 2-CPU local Ray cluster: every stage writes its outputs, the exported
model loads and generates, its config is the base's (the recipe's claim that `--base` + `--override` rebuild the
same model), and a rerun skips every finished stage.

Micro scale (16 one-second clips, a 20-step codec of 32 codes, a 10-step one-layer LM) proves the wiring from the
corpus to the model card, not quality: its audio is noise, so no pitch/sweep/tempo/colour rate is asserted here.
Those rates are the full-size run's result, written to its MODEL_CARD.md and eval.json.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from audiogen import AudioGen

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).resolve().parents[1] / "jobs" / "demo_model.py"
TRAIN_CLIPS, HELDOUT_CLIPS = 16, 6
MICRO = ["--train-clips", str(TRAIN_CLIPS), "--heldout-clips", str(HELDOUT_CLIPS), "--clip-seconds", "1",
         "--codec-steps", "20", "--codec-batch", "4", "--codec-card", "32", "--codec-filters", "4",
         "--codec-hidden", "16", "--text-dim", "16", "--dim", "32", "--layers", "1", "--heads", "2", "--steps", "10",
         "--batch-size", "4", "--warmup-steps", "2", "--log-every", "5", "--eval-every", "5", "--eval-seeds", "2",
         "--workers", "1", "--cpus-per-worker", "2"]
STAGES = ["corpus", "codec", "base", "encode", "train", "evaluate"]


def load_recipe():
    spec = importlib.util.spec_from_file_location("demo_model", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def micro_run(ray_local, tmp_path_factory):
    recipe = load_recipe()
    work = tmp_path_factory.mktemp("demo")
    assert recipe.main([str(work), *MICRO]) == 0
    return recipe, work


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_stage_writes_its_outputs(micro_run):
    _, work = micro_run
    for split, count in (("train", TRAIN_CLIPS), ("heldout", HELDOUT_CLIPS)):
        rows = _rows(work / "corpus" / f"{split}.jsonl")
        assert len(rows) == count and all((work / "corpus" / row["path"]).exists() for row in rows)
        summary = json.loads((work / "codes" / split / "summary.json").read_text())
        assert summary["segments_total"] == count and summary["files_errored_total"] == 0
    report = json.loads((work / "codec" / "codec_report.json").read_text())
    assert report["training"]["config"]["steps"] == 20 and len(report["heldout"]["si_snr"]) == HELDOUT_CLIPS
    for name in ("config.json", "model.safetensors", "text_encoder", "codec"):
        assert (work / "base" / name).exists() and (work / "model" / name).exists()
    assert (work / "runs" / "demo").is_dir()
    train = json.loads((work / "train_summary.json").read_text())
    assert train["metrics"]["step"] == 10 and np.isfinite(train["metrics"]["val_loss"])
    evaluation = json.loads((work / "eval.json").read_text())
    assert set(evaluation["rates"]) == {"generated", "reference", "codec"}
    measured = evaluation["measured_clips"]
    assert measured + sum(evaluation["unmeasured_kinds"].values()) == HELDOUT_CLIPS
    assert sum(row["n"] for row in evaluation["rates"]["generated"].values()) == 2 * measured
    assert len(list((work / "samples").glob("*.wav"))) == measured
    card = (work / "model" / "MODEL_CARD.md").read_text()
    assert "## Measured on held-out captions" in card and "python jobs/demo_model.py WORK --seed 0" in card
    assert list(json.loads((work / "stages.json").read_text())) == STAGES


def test_exported_model_has_the_base_config_loads_and_generates(micro_run):
    _, work = micro_run
    base = json.loads((work / "base" / "config.json").read_text())["config"]
    exported = json.loads((work / "model" / "config.json").read_text())["config"]
    assert exported == base
    assert (exported["dim"], exported["card"], exported["window_duration"]) == (32, 32, 1.0)
    with AudioGen.from_pretrained(work / "model", device="cpu") as model:
        audio = model.generate("a low sine tone at c3", duration=1.0, seed=0)[0]
    assert audio.shape == (1, 16000) and np.isfinite(audio).all()


def test_rerun_skips_every_finished_stage(micro_run, capsys):
    recipe, work = micro_run
    watched = [work / "codec" / "model.safetensors", work / "model" / "model.safetensors", work / "eval.json"]
    before = [path.stat().st_mtime_ns for path in watched]
    capsys.readouterr()
    assert recipe.main([str(work), *MICRO]) == 0
    out = capsys.readouterr().out
    assert all(f"[demo] {stage}: done before, skipped" in out for stage in STAGES), out
    assert [path.stat().st_mtime_ns for path in watched] == before


def test_ship_writes_the_package_copy_with_float16_weights(micro_run, tmp_path):
    recipe, work = micro_run
    shipped = tmp_path / "weights" / "demo"
    assert recipe.main([str(work), *MICRO, "--ship", str(shipped)]) == 0
    assert {"MODEL_CARD.md", "quality.json", "config.json", "model.safetensors", "text_encoder", "codec"} <= {
        path.name for path in shipped.iterdir()}
    with safe_open(shipped / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float16}
    quality = json.loads((shipped / "quality.json").read_text())
    assert "items" not in quality
    assert quality["rates"] == json.loads((work / "eval.json").read_text())["rates"]
    assert "float16" in (shipped / "MODEL_CARD.md").read_text()
    with AudioGen.from_pretrained(shipped, device="cpu") as model:
        assert model.generate("a low sine tone at c3", duration=0.5, seed=0)[0].shape == (1, 8000)

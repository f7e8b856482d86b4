"""The `audiogen` command line: generate, info, render on the embedded defaults, and its error reporting."""

import json

import pytest
import soundfile as sf

from audiogen.cli import main


def test_generate_writes_the_clip_and_reports_the_seed(tmp_path, capsys):
    out = tmp_path / "bark.wav"
    assert main(["generate", "a dog barking", "-o", str(out), "--duration", "0.5", "--seed", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    audio, rate = sf.read(out)
    assert rate == 16000 and len(audio) == 8000 and report["seed"] == 1
    again = tmp_path / "again.wav"
    main(["generate", "a dog barking", "-o", str(again), "--duration", "0.5", "--seed", "1"])
    assert (sf.read(again)[0] == audio).all()


def test_bad_arguments_exit_2_with_the_field_named(tmp_path, capsys):
    code = main(["generate", "dog", "-o", str(tmp_path / "x.wav"), "--duration", "99"])
    assert code == 2
    assert "duration" in capsys.readouterr().err
    assert not (tmp_path / "x.wav").exists()


def test_info_describes_the_model(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sample_rate"] == 16000 and info["codebooks"] == 4


@pytest.mark.slow
def test_render_on_the_embedded_example_manifest(ray_local, tmp_path, capsys):
    assert main(["render", "-o", str(tmp_path / "renders"), "--limit", "3", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_rendered"] == 3 and summary["rows_failed"] == 0
    assert len(list((tmp_path / "renders" / "audio").glob("*.wav"))) == 3

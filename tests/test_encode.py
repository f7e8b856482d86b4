"""`pipelines.encode` end to end on the local Ray cluster (local files and moto S3) and its pure helpers."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from audiogen.cli import main
from audiogen.io import read_audio
from pipelines.encode import (EncodeOptions, UnusableAudio, codes_from_arrow, codes_to_arrow, load_codec,
                              load_manifest, run_encode, segment_audio)

SR = 16000


def _tone(seconds, rate, channels=1, pitch=440.0, level=0.5):
    t = np.arange(int(seconds * rate)) / rate
    wave = level * np.sin(2 * np.pi * pitch * t)
    return np.stack([wave * (1 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)  # frames first


def write_clips(fs_put, manifest_format="jsonl"):
    """Good clips in wav/flac/ogg at several rates and channel counts, plus a corrupt, a silent, a too short
    and a missing file. `fs_put(name, bytes)` stores a file next to the manifest; returns the manifest rows."""
    import io

    good = [("tone-a.wav", 1.5, 16000, 1, "wav"), ("tone-b.flac", 2.2, 44100, 2, "flac"),
            ("tone-c.ogg", 1.2, 22050, 1, "ogg"), ("tone-d.wav", 3.0, 48000, 2, "wav")]
    rows = []
    for i, (name, seconds, rate, channels, fmt) in enumerate(good):
        buffer = io.BytesIO()
        sf.write(buffer, _tone(seconds, rate, channels, pitch=220 * (i + 1)), rate, format=fmt.upper())
        fs_put(name, buffer.getvalue())
        rows.append({"path": name, "caption": f"tone {i}"})
    rows[0]["id"] = "clip-a"
    rows[3].update(offset=0.5, duration=2.0, split="val")
    fs_put("corrupt.wav", b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 20)
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(SR * 2, dtype=np.float32), SR, format="WAV")
    fs_put("silent.wav", buffer.getvalue())
    buffer = io.BytesIO()
    sf.write(buffer, _tone(0.2, SR), SR, format="WAV")
    fs_put("short.wav", buffer.getvalue())
    rows += [{"path": "corrupt.wav", "caption": "bad bytes"}, {"path": "silent.wav", "caption": "nothing"},
             {"path": "short.wav", "caption": "a blip"}, {"path": "missing.wav", "caption": "gone"}]
    if manifest_format == "jsonl":
        fs_put("manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    else:
        buffer = io.BytesIO()
        columns = ["path", "caption", "id", "offset", "duration", "split"]
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), buffer)
        fs_put("manifest.parquet", buffer.getvalue())
    return rows


def _segments_expected():
    # 1 s segments, pad-last, min 0.5 s: a 1.5 s (2), b 2.2 s (2 + 0.2 s dropped), c 1.2 s (1 + 0.2 dropped),
    # d 2.0 s span (2)
    return {"clip-a": 2, "tone 1": 2, "tone 2": 1, "tone 3": 2}


# ------------------------------------------------------------------ pure helpers
def test_segment_audio_pad_drop_and_errors():
    audio = _tone(2.5, SR).T
    kept, total = segment_audio(audio, sample_rate=SR, hop_length=320, segment_seconds=1.0, min_seconds=0.4)
    assert total == 3 and [s.n_frames for s in kept] == [50, 50, 25]
    assert all(s.audio.shape == (1, SR) for s in kept)
    assert np.all(kept[2].audio[:, SR // 2:] == 0)  # the last segment is zero padded
    kept, total = segment_audio(audio, sample_rate=SR, hop_length=320, segment_seconds=1.0, pad_last=False)
    assert total == 2 and [s.n_frames for s in kept] == [50, 50]
    kept, total = segment_audio(audio, sample_rate=SR, hop_length=320, segment_seconds=1.0, min_seconds=0.6)
    assert total == 2  # the 0.5 s tail is shorter than min_seconds
    kept, _ = segment_audio(audio, sample_rate=SR, hop_length=320, segment_seconds=1.0, skip={0, 2}, min_seconds=0.4)
    assert [s.index for s in kept] == [1]
    with_silence = np.concatenate([audio, np.zeros((1, 3 * SR // 2))], axis=1)
    kept, total = segment_audio(with_silence, sample_rate=SR, hop_length=320, segment_seconds=1.0)
    assert total == 4 and [s.index for s in kept] == [0, 1, 2]  # the silent last second is dropped
    with pytest.raises(UnusableAudio, match="silent") as error:
        segment_audio(np.zeros((1, SR * 2), np.float32), sample_rate=SR, hop_length=320, segment_seconds=1.0)
    assert error.value.kind == "silent"
    with pytest.raises(UnusableAudio, match="shorter") as error:
        segment_audio(audio[:, :SR // 4], sample_rate=SR, hop_length=320, segment_seconds=1.0)
    assert error.value.kind == "too_short"
    with pytest.raises(UnusableAudio, match="one full segment"):
        segment_audio(audio[:, :SR // 2], sample_rate=SR, hop_length=320, segment_seconds=1.0, pad_last=False)


def test_codes_arrow_roundtrip():
    codes = np.random.default_rng(0).integers(0, 2048, (3, 4, 7)).astype(np.int16)
    column = codes_to_arrow(codes)
    assert column.type == pa.list_(pa.list_(pa.int16()))
    back = codes_from_arrow(pa.chunked_array([column.slice(0, 1), column.slice(1)]))
    assert all(np.array_equal(a, b) for a, b in zip(back, codes))
    ragged = pa.array([[[1, 2, 3], [4, 5, 6]], [[7], [8]]], pa.list_(pa.list_(pa.int16())))
    back = codes_from_arrow(ragged)
    assert back[0].tolist() == [[1, 2, 3], [4, 5, 6]] and back[1].tolist() == [[7], [8]]


def test_manifest_columns_ids_and_duplicates(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"audio": "x.wav", "description": "a"}\n{"audio": "/abs/y.wav", "text": null}\n')
    table = load_manifest(str(tmp_path / "m.jsonl"))
    assert table["path"].to_pylist() == [str(tmp_path / "x.wav"), "/abs/y.wav"]
    assert table["caption"].to_pylist() == ["a", ""] and len(set(table["id"].to_pylist())) == 2
    again = load_manifest(str(tmp_path / "m.jsonl"))
    assert again["id"].to_pylist() == table["id"].to_pylist()  # stable ids
    (tmp_path / "d.jsonl").write_text('{"id": 1, "path": "x.wav", "caption": "a"}\n{"id": 1, "path": "y.wav", "caption": "b"}\n')
    with pytest.raises(ValueError, match="duplicate ids"):
        load_manifest(str(tmp_path / "d.jsonl"))
    (tmp_path / "n.jsonl").write_text('{"caption": "a"}\n')
    with pytest.raises(ValueError, match="no audio path column"):
        load_manifest(str(tmp_path / "n.jsonl"))


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_encode_local_end_to_end_errors_and_resume(ray_local, tmp_path, capsys):
    def put(name, data):
        (tmp_path / name).write_bytes(data)

    write_clips(put)
    output = tmp_path / "out"
    # the first run through the CLI, the reruns through the Python API with the same options
    assert main(["encode", str(tmp_path / "manifest.jsonl"), str(output), "--segment-seconds", "1",
                 "--min-seconds", "0.5", "--encode-batch", "2", "--read-batch", "3", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    options = EncodeOptions(manifest=str(tmp_path / "manifest.jsonl"), output=str(output), segment_seconds=1.0,
                            min_seconds=0.5, encode_batch=2, read_batch=3, progress=False)
    assert summary["files"] == 8 and summary["files_read"] == 8
    assert summary["segments_written"] == 7 and summary["errors_new"] == 4 and summary["files_encoded_total"] == 4
    assert json.loads((output / "summary.json").read_text())["segments_written"] == 7

    errors = pq.read_table(output / "errors").to_pylist()
    kinds = {e["path"].rsplit("/", 1)[-1]: e for e in errors}
    assert set(kinds) == {"corrupt.wav", "silent.wav", "short.wav", "missing.wav"}
    assert kinds["corrupt.wav"]["kind"] == "unreadable" and "decode" in kinds["corrupt.wav"]["message"]
    assert kinds["missing.wav"]["kind"] == "unreadable" and "No such file" in kinds["missing.wav"]["message"]
    assert kinds["silent.wav"]["kind"] == "silent" and "dBFS" in kinds["silent.wav"]["message"]
    assert kinds["short.wav"]["kind"] == "too_short" and "0.200 s" in kinds["short.wav"]["message"]

    table = pq.read_table(output / "codes")
    rows = table.drop(["codes"]).to_pylist()
    per_file = {}
    for row in rows:
        per_file.setdefault(row["caption"] if row["id"] != "clip-a" else "clip-a", []).append(row)
    assert {k: len(v) for k, v in per_file.items()} == _segments_expected()
    codec = load_codec("default")  # the embedded demo model's codec: the CLI's default
    assert {r["codec_checksum"] for r in rows} == {codec.checksum()}
    assert all(r["frames"] == 50 and r["n_segments"] == len(per_file[k]) for k, v in per_file.items() for r in v)
    # the padded last segment of the 1.5 s clip has 25 real frames; the offsets follow the segments
    a = sorted(per_file["clip-a"], key=lambda r: r["segment"])
    assert [r["n_frames"] for r in a] == [50, 25] and [r["offset"] for r in a] == [0.0, 1.0]
    d = sorted(per_file["tone 3"], key=lambda r: r["segment"])
    assert [r["offset"] for r in d] == [0.5, 1.5] and {r["split"] for r in d} == {"val"}

    # the codes are the codec's own for the resampled, downmixed segment
    codes = dict(zip([(r["id"], r["segment"]) for r in rows], codes_from_arrow(table["codes"])))
    b_id = per_file["tone 1"][0]["id"]
    audio, _ = read_audio(str(tmp_path / "tone-b.flac"), sample_rate=SR, channels=1)
    with torch.inference_mode():
        want = codec.encode(torch.from_numpy(audio[:, SR:2 * SR])[None])[0].numpy()
    assert codes[(b_id, 1)].dtype == np.int16 and np.array_equal(codes[(b_id, 1)], want)

    # a rerun has nothing to do
    again = run_encode(options)
    assert again["files_read"] == 0 and again["segments_written"] == 0 and again["errors_new"] == 0
    assert again["files_skipped_done"] == 4 and again["files_skipped_errored"] == 4
    assert len(pq.read_table(output / "codes")) == 7

    # a lost shard (a crash before its write) is re-encoded, and nothing else
    shards = sorted((output / "codes").glob("part-*.parquet"))
    lost = pq.read_table(shards[0]).drop(["codes"]).to_pylist()
    shards[0].unlink()
    resumed = run_encode(options)
    assert resumed["segments_written"] == len(lost) and resumed["files_read"] == len({r["id"] for r in lost})
    final = pq.read_table(output / "codes").drop(["codes"]).to_pylist()
    assert sorted((r["id"], r["segment"]) for r in final) == sorted((r["id"], r["segment"]) for r in rows)


@pytest.mark.slow
def test_encode_through_s3(ray_local, s3_bucket):
    import fsspec

    bucket, storage_options = s3_bucket
    fs = fsspec.filesystem("s3", **storage_options)

    def put(name, data):
        fs.pipe_file(f"{bucket}/input/{name}", data)

    write_clips(put, manifest_format="parquet")
    options = EncodeOptions(manifest=f"s3://{bucket}/input/manifest.parquet", output=f"s3://{bucket}/encoded",
                            segment_seconds=1.0, min_seconds=0.5, encode_batch=4, progress=False,
                            storage_options=storage_options)
    summary = run_encode(options)
    assert summary["segments_written"] == 7 and summary["errors_new"] == 4
    with fs.open(f"{bucket}/encoded/summary.json") as handle:
        assert json.load(handle)["files_encoded_total"] == 4
    parts = fs.ls(f"{bucket}/encoded/codes")
    rows = sum(pq.read_table(fs.open(p, "rb")).num_rows for p in parts)
    assert rows == 7
    errors = pa.concat_tables(pq.read_table(fs.open(p, "rb")) for p in fs.ls(f"{bucket}/encoded/errors"))
    assert sorted(errors["kind"].to_pylist()) == ["silent", "too_short", "unreadable", "unreadable"]
    assert all(p.startswith(f"s3://{bucket}/input/") for p in errors["path"].to_pylist())
    again = run_encode(options)
    assert again["files_read"] == 0 and again["segments_written"] == 0

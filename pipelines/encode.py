"""Encode (audio, caption) manifests into codec-token shards for training, with Ray Data.

Input: a Parquet or JSONL manifest (local or `s3://`), one row per clip: `path` (aliases `audio`, `uri`, `file`;
a local path, relative paths resolved against the manifest's directory, or an fsspec URL such as `s3://...`),
`caption` (aliases `description`, `text`, `prompt`), optional `id`, `offset` and `duration` (seconds: the span of
the file to use) and `split` (e.g. `train`/`val`, passed through for the trainer). Audio is wav/flac/ogg at any
sample rate and channel count.

Pipeline: driver plans (manifest, ids, what is already done) -> CPU tasks read, resample and downmix each file
(`audiogen.io.read_audio`) and cut it into fixed-length segments -> an actor pool holding the `Codec` encodes the
segments in batches and writes one Parquet shard per batch.

Output layout under OUTPUT (a local directory or `s3://bucket/prefix`):
```
codes/part-<hash>.parquet    one row per segment (CODES_SCHEMA): id, segment, caption, offset, n_frames, codes
                             (int16 [n_q, frames]), codec_checksum, ...
errors/part-<hash>.parquet   one row per file that could not be used (ERRORS_SCHEMA): unreadable, silent, too
                             short, failed to encode; with a readable message. Never a failed job.
summary.json                 the last run's counts, the codec and the segmenting settings
```

Segments: `segment_seconds` of audio (rounded to whole codec frames). The last, shorter piece is zero-padded to the
full length and its row records how many frames are real (`n_frames < frames`; the trainer masks the rest), or
dropped with `pad_last=False`. Pieces shorter than `min_seconds` are dropped, and so are silent segments (peak
below `silence_db` dBFS); a file left with no segment is an error row (`too_short` / `silent`).

Exactly once, resumable: shard names are a hash of the segment ids they hold, so a retried batch overwrites its
own shard. A rerun reads the ids already written (and the files already in `errors/`), skips every file whose
segments are all present (each row carries its file's `n_segments`), and for partly written files skips the
segments present: nothing is encoded twice and a rerun of a finished job does nothing. Files in `errors/` are
skipped too (their problems are properties of the files) unless `retry_errors`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from audiogen.data.manifest import load_manifest
from audiogen.io import read_audio
from audiogen.options import option
from audiogen.validation import check_integer, check_number
from pipelines.job import ensure_ray, fetch_model, write_summary
from pipelines.storage import Storage, storage_options_field

log = logging.getLogger(__name__)

CODES_SCHEMA = pa.schema([
    ("id", pa.string()), ("segment", pa.int32()), ("n_segments", pa.int32()), ("caption", pa.string()),
    ("path", pa.string()), ("split", pa.string()), ("offset", pa.float64()), ("duration", pa.float64()),
    ("n_frames", pa.int32()), ("frames", pa.int32()), ("codes", pa.list_(pa.list_(pa.int16()))),
    ("codec_checksum", pa.string()),
])
SEGMENT_COLUMNS = [name for name in CODES_SCHEMA.names if name not in ("frames", "codes", "codec_checksum")]
ERRORS_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("caption", pa.string()), ("kind", pa.string()),
    ("message", pa.string()),
])


@dataclass
class EncodeOptions:
    manifest: str
    output: str
    codec: str = option("default", help="codec: 'default' (the embedded demo model's), 'tiny[:SEED]', an EnCodec or "
                                        "model directory")
    segment_seconds: float = option(10.0, help="segment length (whole codec frames)")
    pad_last: bool = option(True, help="zero-pad the last short segment and mask its padding in training "
                                       "(--no-pad-last drops it)")
    min_seconds: float = option(1.0, help="shortest usable (last) segment")
    silence_db: float = option(-60.0, help="segments with a lower peak are dropped")
    max_seconds: float | None = option(None, help="refuse files (spans) longer than this")
    read_batch: int = option(8, help="files per read task")
    encode_batch: int = option(16, help="segments per codec batch and output shard")
    encoders: int = option(1, help="codec actors")
    encoder_cpus: float = option(1.0, help="CPUs per codec actor")
    encoder_gpus: float = option(0.0, help="GPUs per codec actor")
    read_cpus: float = option(1.0, help="CPUs per read/resample task")
    read_memory_mb: int = option(512, help="memory reserved per read task (decoded audio of --read-batch files)")
    retry_errors: bool = option(False, help="read again the files listed in errors/")
    storage_options: dict[str, Any] = storage_options_field()
    progress: bool = option(True, help="Ray Data progress bars")

    def __post_init__(self) -> None:
        check_number("segment_seconds", self.segment_seconds, low=0.0, high=math.inf, low_open=True, limit="> 0 s")
        check_number("min_seconds", self.min_seconds, low=0.0, high=math.inf, limit=">= 0 s")
        for name in ("read_batch", "encode_batch", "encoders", "read_memory_mb"):
            check_integer(name, getattr(self, name), low=1, high=None)


@dataclass(frozen=True)
class CodecInfo:
    """What the read tasks need to know about the codec without loading it."""

    sample_rate: int
    hop_length: int
    channels: int
    num_codebooks: int
    card: int
    checksum: str

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length


# -------------------------------------------------- Pure helpers (no Ray): manifest, segmenting, the codes table format
def segment_key(source: str, segment: int) -> str:
    return f"{source}#{int(segment)}"


@dataclass
class Segment:
    index: int
    audio: np.ndarray  # [C, segment_samples] float32, zero padded
    n_frames: int  # real (unpadded) frames


class UnusableAudio(ValueError):
    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


def segment_audio(audio: np.ndarray, *, sample_rate: int, hop_length: int, segment_seconds: float,
                  pad_last: bool = True, min_seconds: float = 1.0, silence_db: float = -60.0,
                  skip: set[int] | frozenset[int] = frozenset()) -> tuple[list[Segment], int]:
    """Cut [C, N] audio into segments of `segment_seconds` (whole frames) -> (kept segments, total count).

    The total counts every usable segment including the silent ones dropped and those in `skip` (already
    written by an earlier run); raises `UnusableAudio` when nothing usable remains.
    """
    length = max(1, int(round(segment_seconds * sample_rate / hop_length))) * hop_length
    total = audio.shape[-1]
    shortest = max(1, min(int(round(min_seconds * sample_rate)), length)) if pad_last else length
    if total < shortest:
        suffix = "" if pad_last else " (one full segment: the last partial segment is dropped)"
        raise UnusableAudio("too_short", f"audio is {total / sample_rate:.3f} s long, shorter than the minimum "
                                         f"{shortest / sample_rate:.3f} s{suffix}")
    threshold = 10.0 ** (silence_db / 20.0)
    kept: list[Segment] = []
    usable = 0
    silent = 0
    for index, start in enumerate(range(0, total, length)):
        piece = audio[:, start:start + length]
        real = piece.shape[-1]
        if real < shortest:
            continue  # a short last piece that is dropped
        usable += 1
        if float(np.max(np.abs(piece))) <= threshold:
            silent += 1
            continue
        if index in skip:
            continue
        if real < length:
            piece = np.pad(piece, ((0, 0), (0, length - real)))
        kept.append(Segment(index, np.ascontiguousarray(piece, dtype=np.float32), -(-real // hop_length)))
    if usable and silent == usable:
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        level = 20 * math.log10(peak) if peak > 0 else float("-inf")
        raise UnusableAudio("silent", f"audio is silent: peak {level:.1f} dBFS at or below the threshold "
                                      f"{silence_db:g} dBFS in every segment")
    return kept, usable


def codes_to_arrow(codes: np.ndarray) -> pa.Array:
    """codes [B, K, T] integer -> list<list<int16>> (row i = K lists of T codes)."""
    _, k, t = codes.shape
    flat = pa.array(np.ascontiguousarray(codes, dtype=np.int16).reshape(-1))
    rows = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, t), k)
    return rows.cast(CODES_SCHEMA.field("codes").type)


def codes_from_arrow(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """The inverse of `codes_to_arrow`: one int16 [K, T] array per row (rows may differ in T)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    outer = column.value_lengths().to_numpy(zero_copy_only=False)
    inner = column.flatten()
    inner_lengths = np.append(inner.value_lengths().to_numpy(zero_copy_only=False), 0)
    values = np.array(inner.flatten().to_numpy(zero_copy_only=False), dtype=np.int16)  # writable copy
    frames = np.where(outer > 0, inner_lengths[np.cumsum(outer) - outer], 0)  # each row's first list's length
    pieces = np.split(values, np.cumsum(outer * frames)[:-1])
    return [piece.reshape(int(k), int(t)) for piece, k, t in zip(pieces, outer, frames)]


def codes_table(rows: list[dict[str, Any]], codes: np.ndarray, checksum: str) -> pa.Table:
    """Segment rows (dicts with the scalar columns) + their codes [B, K, T] -> a CODES_SCHEMA table."""
    columns = {name: [row[name] for row in rows] for name in SEGMENT_COLUMNS}
    return pa.table({**columns, "frames": [int(codes.shape[-1])] * len(rows), "codes": codes_to_arrow(codes),
                     "codec_checksum": [checksum] * len(rows)}, schema=CODES_SCHEMA)


def errors_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.table({name: [str(row.get(name) or "") for row in rows] for name in ERRORS_SCHEMA.names},
                    schema=ERRORS_SCHEMA)


def load_codec(spec: str, storage_options: dict[str, Any] | None = None) -> Any:
    """`default` (the embedded demo model's), `tiny` / `tiny:SEED` (the codec of `audiogen.scratch.random_model`),
    an EnCodec directory (`Codec.save_pretrained`), or a model directory of any supported format (its codec);
    local or s3://."""
    from audiogen.codec import Codec

    spec = fetch_model(spec, storage_options)
    if spec == "tiny" or spec.startswith("tiny:"):
        from audiogen.config import AudioGenConfig
        from audiogen.scratch import random_codec
        from audiogen.training import single_thread

        with single_thread():  # bit-identical in every process (see `single_thread`)
            return random_codec(AudioGenConfig.preset("tiny"), seed=int(spec.split(":", 1)[1]) if ":" in spec else 0)
    directory = Path(spec).expanduser()
    if (directory / "codec").is_dir() and (directory / "config.json").exists():
        return Codec.from_pretrained(directory / "codec")  # audiogen's own model directory
    config = directory / "config.json"
    if config.exists() and json.loads(config.read_text()).get("model_type") == "encodec":
        return Codec.from_pretrained(directory)
    from audiogen.training import load_base_model

    return load_base_model(spec).codec


# ---------------------------------------------------------------------------------------------------- Ray stages
def read_and_segment(batch: pa.Table, *, options: EncodeOptions, info: CodecInfo,
                     partial: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Ray Data map task: read, resample and segment each file of `batch`; unusable files -> `errors/`."""
    length = max(1, int(round(options.segment_seconds * info.frame_rate))) * info.hop_length
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for row in batch.to_pylist():
        try:
            audio, _ = read_audio(row["path"], sample_rate=info.sample_rate, channels=info.channels,
                                  offset=row["offset"], duration=row["duration"],
                                  storage_options=options.storage_options, max_seconds=options.max_seconds)
        except Exception as error:  # anything about one file is that file's error, never the job's
            errors.append(dict(row, kind="unreadable", message=f"{type(error).__name__}: {error}"))
            continue
        try:
            segments, total = segment_audio(
                audio, sample_rate=info.sample_rate, hop_length=info.hop_length,
                segment_seconds=options.segment_seconds, pad_last=options.pad_last, min_seconds=options.min_seconds,
                silence_db=options.silence_db, skip=set(partial.get(row["id"], ())))
        except UnusableAudio as error:
            errors.append(dict(row, kind=error.kind, message=str(error)))
            continue
        rows += [dict(row, segment=segment.index, n_segments=total, split=row["split"] or "",
                      offset=row["offset"] + segment.index * length / info.sample_rate,
                      duration=segment.n_frames / info.frame_rate, n_frames=segment.n_frames, audio=segment.audio)
                 for segment in segments]
    if errors:
        Storage(options.output, options.storage_options).write_part("errors", [e["id"] for e in errors],
                                                                    errors_table(errors))
    result = {name: np.asarray([r[name] for r in rows], dtype=CODES_SCHEMA.field(name).type.to_pandas_dtype())
              for name in SEGMENT_COLUMNS}
    result["audio"] = (np.stack([r["audio"] for r in rows]) if rows
                       else np.zeros((0, info.channels, length), dtype=np.float32))
    return result


class SegmentEncoder:
    """Ray Data actor: holds the codec, encodes a batch of segments, writes the batch's shard."""

    def __init__(self, options: EncodeOptions, checksum: str) -> None:
        import torch

        torch.set_num_threads(max(1, int(options.encoder_cpus)))
        device = "cuda" if options.encoder_gpus and torch.cuda.is_available() else "cpu"
        self.codec = load_codec(options.codec, options.storage_options).to(device)
        self.checksum = self.codec.checksum()
        if self.checksum != checksum:
            raise RuntimeError(f"codec {options.codec!r} on this worker has checksum {self.checksum[:12]}, the "
                               f"driver's has {checksum[:12]}: workers must see the same codec files")
        self.storage = Storage(options.output, options.storage_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        count = len(batch["id"])
        if count == 0:
            return {"shard": np.asarray([], dtype=object), "segments": np.asarray([], dtype=np.int64)}
        rows = [{**{name: batch[name][i] for name in SEGMENT_COLUMNS}, "split": batch["split"][i] or None}
                for i in range(count)]
        audio = torch.from_numpy(np.ascontiguousarray(batch["audio"], dtype=np.float32))
        kept: list[dict[str, Any]] = []
        codes: list[np.ndarray] = []
        errors: list[dict[str, Any]] = []
        try:
            kept, codes = rows, list(self.codec.encode(audio).cpu().numpy())
        except Exception:  # find the culprit(s): one bad segment must not lose the batch
            for row, clip in zip(rows, audio):
                try:
                    codes.append(self.codec.encode(clip[None])[0].cpu().numpy())
                    kept.append(row)
                except Exception as error:
                    errors.append(dict(row, kind="encode_failed", message=f"{type(error).__name__}: {error}"))
        shard = self.storage.write_part("codes", [segment_key(r["id"], r["segment"]) for r in kept],
                                        codes_table(kept, np.stack(codes), self.checksum)) if kept else ""
        if errors:
            self.storage.write_part("errors", [segment_key(e["id"], e["segment"]) for e in errors],
                                    errors_table(errors))
        return {"shard": np.asarray([shard], dtype=object), "segments": np.asarray([len(kept)], dtype=np.int64)}


# ---------------------------------------------------------------------------------------------------- Driver
def existing_state(storage: Any) -> tuple[dict[str, set[int]], dict[str, int], set[str], set[str]]:
    """(segments written per id, n_segments per id, ids with an error row, codec checksums seen)."""
    errors = storage.read_tables("errors", columns=["id"])
    errored = set(errors["id"].to_pylist()) if errors is not None else set()
    table = storage.read_tables("codes", columns=["id", "segment", "n_segments", "codec_checksum"])
    if table is None:
        return {}, {}, errored, set()
    written: dict[str, set[int]] = {}
    for row_id, segment in zip(table["id"].to_pylist(), table["segment"].to_pylist()):
        written.setdefault(row_id, set()).add(segment)
    expected = dict(zip(table["id"].to_pylist(), table["n_segments"].to_pylist()))
    return written, expected, errored, set(table["codec_checksum"].unique().to_pylist())


def run_encode(options: EncodeOptions) -> dict[str, Any]:
    """Encode every not-yet-encoded file of the manifest; returns (and writes) the summary."""
    import ray
    from ray.data import ActorPoolStrategy

    started = time.perf_counter()
    storage = Storage(options.output, options.storage_options)
    manifest = load_manifest(options.manifest, options.storage_options)
    codec = load_codec(options.codec, options.storage_options)
    info = CodecInfo(sample_rate=codec.sample_rate, hop_length=codec.hop_length, channels=codec.channels,
                     num_codebooks=codec.num_codebooks, card=codec.card, checksum=codec.checksum())
    if info.card > 32768:
        raise ValueError(f"codec card {info.card} does not fit the int16 codes column")
    written, expected, errored, checksums = existing_state(storage)
    if checksums - {info.checksum}:
        raise ValueError(f"{storage.url('codes')} holds codes of another codec (checksums "
                         f"{sorted(c[:12] for c in checksums)}), this run's codec is {info.checksum[:12]}: "
                         f"use a new output location")
    if options.retry_errors and errored:
        storage.remove_prefix("errors")
        errored = set()
    complete = {i for i, segs in written.items() if len(segs) >= expected.get(i, 0)}
    ids = manifest["id"].to_pylist()
    todo = manifest.filter(pa.array([i not in complete and i not in errored for i in ids], pa.bool_()))
    partial = {i: sorted(written[i]) for i in todo["id"].to_pylist() if i in written}
    log.info("encode: %d files in the manifest, %d done, %d errored before, %d to read", len(ids),
             len(complete & set(ids)), len(errored & set(ids)), todo.num_rows)

    segments = shards = 0
    if todo.num_rows:
        ensure_ray(options.progress)
        blocks = [todo.slice(start, options.read_batch) for start in range(0, todo.num_rows, options.read_batch)]
        # Reading and resampling run as their own CPU tasks with a memory reservation for the decoded audio; the
        # reservation also keeps Ray Data from fusing them into the encoder actors (fusion needs equal resources),
        # so many cheap CPUs decode while the codec actors stay busy.
        read = ray.data.from_arrow(blocks).map_batches(
            read_and_segment, batch_size=None, batch_format="pyarrow", num_cpus=options.read_cpus,
            memory=options.read_memory_mb * 2**20, fn_kwargs={"options": options, "info": info, "partial": partial})
        encoded = read.map_batches(
            SegmentEncoder, batch_size=options.encode_batch, batch_format="numpy",
            fn_constructor_kwargs={"options": options, "checksum": info.checksum},
            compute=ActorPoolStrategy(size=options.encoders), num_cpus=options.encoder_cpus,
            num_gpus=options.encoder_gpus or None)
        for batch in encoded.iter_batches(batch_size=None, batch_format="pyarrow"):
            segments += sum(batch["segments"].to_pylist())
            shards += sum(1 for s in batch["shard"].to_pylist() if s)
    written_after, _, errored_after, _ = existing_state(storage)
    summary = {
        "manifest": options.manifest, "output": options.output, "codec": options.codec,
        "codec_checksum": info.checksum, "sample_rate": info.sample_rate, "frame_rate": info.frame_rate,
        "num_codebooks": info.num_codebooks, "card": info.card, "segment_seconds": options.segment_seconds,
        "segment_frames": max(1, int(round(options.segment_seconds * info.frame_rate))),
        "pad_last": options.pad_last, "min_seconds": options.min_seconds, "silence_db": options.silence_db,
        "files": len(ids), "files_skipped_done": len(complete & set(ids)),
        "files_skipped_errored": len(errored & set(ids)), "files_read": todo.num_rows,
        "segments_written": segments, "shards_written": shards,
        "errors_new": len(errored_after - errored), "segments_total": sum(len(s) for s in written_after.values()),
        "files_encoded_total": len(written_after), "files_errored_total": len(errored_after),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_summary(storage, "summary.json", summary)
    return summary


"""Audio reading, writing and conversion shared by the CLI, batch renderer, HTTP server and data encoder.

Every array in this API is float32, channels first (`[channels, samples]`), with samples nominally in [-1, 1];
that is the layout the codec consumes and produces, so callers never transpose. Decoding and encoding go through
libsndfile (`soundfile`), resampling through soxr, and every path or URL through fsspec, so that a local file,
`s3://bucket/key` and `memory://x` behave the same. Bad input raises `InvalidRequestError` naming the field, so
the server can answer 422 and the batch pipeline can write an error row without parsing text.
"""

from __future__ import annotations

import io
import os
import struct
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Mapping

import fsspec
import numpy as np
import soundfile as sf
import soxr
from fsspec.implementations.local import LocalFileSystem

from audiogen.errors import InvalidRequestError

__all__ = [
    "SUPPORTED_FORMATS",
    "AudioFormat",
    "AudioSource",
    "OggStreamEncoder",
    "RESAMPLE_QUALITY",
    "convert_audio",
    "convert_channels",
    "encode_audio",
    "pcm_bytes",
    "peak_normalize",
    "read_audio",
    "resample",
    "wav_stream_header",
    "write_audio",
]

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]

# soxr "HQ" is 20-bit precise with a 95 % passband: already below the 16-bit output we ship and the codec's own
# error, and noticeably faster than "VHQ" (28-bit) on the long files the data encoder resamples.
RESAMPLE_QUALITY = "HQ"

# Peaks below -160 dBFS are under 24-bit resolution: no output format could represent such a signal, so
# normalising it would only blow numerical dust up to full scale. Treat it as silence.
_SILENCE_PEAK = 1e-8

# Subtypes whose samples are floats; every other subtype cannot represent values beyond full scale.
_FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})


@dataclass(frozen=True)
class AudioFormat:
    """An output container/codec we produce, and what HTTP and file names need to know about it."""

    name: str
    sf_format: str  # libsndfile major format name
    default_subtype: str
    subtypes: tuple[str, ...]
    mime_type: str
    extension: str
    sample_rates: tuple[int, ...] | None = None  # None: any rate the container accepts


def _available(fmt: AudioFormat) -> AudioFormat | None:
    """Keep only the subtypes this libsndfile build can write, so we never advertise what would fail later."""
    subtypes = tuple(s for s in fmt.subtypes if sf.check_format(fmt.sf_format, s))
    if fmt.default_subtype not in subtypes:
        return None
    return replace(fmt, subtypes=subtypes)


_CANDIDATE_FORMATS = (
    AudioFormat("wav", "WAV", "PCM_16", ("PCM_16", "PCM_24", "PCM_32", "FLOAT"), "audio/wav", ".wav"),
    AudioFormat("flac", "FLAC", "PCM_16", ("PCM_16", "PCM_24"), "audio/flac", ".flac"),
    AudioFormat("ogg", "OGG", "VORBIS", ("VORBIS",), "audio/ogg", ".ogg"),
    # libsndfile >= 1.1 writes Ogg/Opus; the codec itself only runs at these rates.
    AudioFormat(
        "opus", "OGG", "OPUS", ("OPUS",), "audio/ogg; codecs=opus", ".opus", (8000, 12000, 16000, 24000, 48000)
    ),
)

SUPPORTED_FORMATS: Mapping[str, AudioFormat] = MappingProxyType(
    {fmt.name: fmt for fmt in map(_available, _CANDIDATE_FORMATS) if fmt is not None}
)


# --------------------------------------------------------------------------------------------------- Validation helpers


def _check_sample_rate(sample_rate: Any) -> int:
    """Rates must be positive integers: soxr and libsndfile silently misbehave on floats or zero."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise InvalidRequestError("sample_rate", "sample rate must be a positive integer", limit="> 0 Hz",
                                  value=sample_rate)
    return int(sample_rate)


def _check_channels(channels: Any) -> int:
    """WAV stores the channel count in 16 bits; anything else is a caller bug worth naming."""
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or not 1 <= channels <= 65535:
        raise InvalidRequestError("channels", "channel count out of range", limit="1..65535", value=channels)
    return int(channels)


def _as_audio(audio: Any, *, finite: bool = False) -> np.ndarray:
    """Accept only float `[channels, samples]` arrays: integer PCM would be misread as far beyond full scale.
    `finite` also refuses NaN/inf, which would encode as garbage (or full-scale clicks) rather than fail."""
    array = np.asarray(audio)
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidRequestError("audio", f"expected floating-point samples, got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[0] < 1:
        raise InvalidRequestError(
            "audio", f"expected a [channels, samples] array, got shape {tuple(array.shape)}", limit="2-D, channels >= 1"
        )
    if finite and not np.isfinite(array).all():
        raise InvalidRequestError("audio", "audio contains NaN or infinite samples", limit="finite samples")
    return np.ascontiguousarray(array, dtype=np.float32)


def _lookup_format(format: str, sample_rate: Any, subtype: str | None = None) -> tuple[AudioFormat, int, str]:
    """The output format named `format`, `sample_rate` checked against the rates it can encode, and the subtype
    (its default when None)."""
    fmt = SUPPORTED_FORMATS.get(str(format).lower())
    if fmt is None:
        raise InvalidRequestError(
            "format", f"unsupported audio format {format!r}", limit=", ".join(SUPPORTED_FORMATS), value=format
        )
    sample_rate = _check_sample_rate(sample_rate)
    if fmt.sample_rates is not None and sample_rate not in fmt.sample_rates:
        raise InvalidRequestError(
            "sample_rate",
            f"{fmt.name} cannot encode {sample_rate} Hz audio; resample first",
            limit=", ".join(map(str, fmt.sample_rates)) + " Hz",
            value=sample_rate,
        )
    chosen = fmt.default_subtype if subtype is None else str(subtype).upper()
    if chosen not in fmt.subtypes:
        raise InvalidRequestError(
            "subtype",
            f"subtype {subtype!r} is not supported for {fmt.name}",
            limit=", ".join(fmt.subtypes),
            value=subtype,
        )
    return fmt, sample_rate, chosen


def _decoder_reason(error: Exception) -> str:
    """libsndfile's own message, without soundfile's 'Error opening <_io.BytesIO object at 0x...>' prefix."""
    return getattr(error, "error_string", None) or str(error)


# ---------------------------------------------------------------------------------------------------- Conversion


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample `[C, N]` audio with soxr at `RESAMPLE_QUALITY`; returns the input unchanged when rates match.

    The output has `N * target_sr / orig_sr` samples to within one (soxr flushes its filter delay), so
    durations survive.
    """
    orig_sr = _check_sample_rate(orig_sr)
    target_sr = _check_sample_rate(target_sr)
    audio = _as_audio(audio)
    if orig_sr == target_sr:
        return audio
    # soxr wants frames first; the transposes are views plus one contiguous copy each way.
    out = soxr.resample(np.ascontiguousarray(audio.T), orig_sr, target_sr, quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(out.reshape(-1, audio.shape[0]).T, dtype=np.float32)


def convert_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    """Downmix to mono by the mean, or upmix mono to stereo by duplication; other conversions are refused (5.1 ->
    stereo and the like have no single right answer)."""
    audio = _as_audio(audio)
    current = audio.shape[0]
    if channels == current:
        return audio
    if channels == 1:
        return audio.mean(axis=0, keepdims=True, dtype=np.float32)
    if channels == 2 and current == 1:
        return np.repeat(audio, 2, axis=0)
    raise InvalidRequestError("channels", f"cannot convert {current}-channel audio to {channels} channels",
                              limit="1 (downmix from any count), or 2 from mono/stereo", value=channels)


def convert_audio(audio: np.ndarray, sample_rate: int, target_sample_rate: int, target_channels: int) -> np.ndarray:
    """Resample and remix in the cheaper order: upmix after resampling, anything else (downmix, or a conversion
    that is refused, before the expensive resampling) before it."""
    audio = _as_audio(audio)
    if (audio.shape[0], target_channels) == (1, 2):
        return convert_channels(resample(audio, sample_rate, target_sample_rate), target_channels)
    return resample(convert_channels(audio, target_channels), sample_rate, target_sample_rate)


def peak_normalize(audio: np.ndarray, peak_db: float = -1.0) -> np.ndarray:
    """Scale so the loudest sample sits at `peak_db` dBFS (default -1 dB leaves headroom for lossy codecs).

    Silent (or numerically silent) input is returned unchanged instead of being divided by ~zero.
    """
    if not np.isfinite(peak_db) or peak_db > 0:
        raise InvalidRequestError("peak_db", "peak must be a finite level at or below full scale", limit="<= 0 dBFS",
                                  value=peak_db)
    audio = _as_audio(audio, finite=True)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak < _SILENCE_PEAK:
        return audio.copy()
    return audio * np.float32(10.0 ** (peak_db / 20.0) / peak)


# ---------------------------------------------------------------------------------------------------- Reading


def _open_source(source: AudioSource, storage_options: dict | None) -> IO[bytes]:
    """A seekable binary file object for any source; libsndfile seeks to read headers and spans."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        # fsspec also opens local paths, so a missing file is a plain FileNotFoundError, not a decoder error.
        return fsspec.open(os.fspath(source), "rb", **(storage_options or {})).open()
    if hasattr(source, "read"):
        seekable = getattr(source, "seekable", None)
        return source if seekable is not None and seekable() else io.BytesIO(source.read())
    raise InvalidRequestError("audio", f"unsupported audio source type {type(source).__name__}",
                              limit="path, URL, bytes or binary file object")


def _span_frames(info: sf.SoundFile, offset: float, duration: float | None) -> tuple[int, int]:
    """Translate `offset`/`duration` seconds into (start frame, frame count), clamped to the file's end."""
    if not np.isfinite(offset) or offset < 0:
        raise InvalidRequestError("offset", "offset must be a finite number of seconds", limit=">= 0", value=offset)
    if duration is not None and (not np.isfinite(duration) or duration <= 0):
        raise InvalidRequestError("duration", "duration must be positive", limit="> 0 seconds", value=duration)
    start = round(offset * info.samplerate)
    if start >= info.frames > 0:
        total = info.frames / info.samplerate
        raise InvalidRequestError("offset", "offset is past the end of the audio", limit=f"< {total:.3f} s",
                                  value=offset)
    available = info.frames - start
    count = available if duration is None else min(available, round(duration * info.samplerate))
    return start, count


def _decode(
    handle: IO[bytes], offset: float, duration: float | None, max_seconds: float | None
) -> tuple[np.ndarray, int]:
    """Decode only the requested span, checking its length from the header before decoding anything."""
    if handle.seek(0, io.SEEK_END) == 0:  # libsndfile would call this "format not recognised"
        raise InvalidRequestError("audio", "audio is empty", limit="at least one sample")
    handle.seek(0)
    try:
        with sf.SoundFile(handle) as f:
            start, count = _span_frames(f, offset, duration)
            if max_seconds is not None and count > max_seconds * f.samplerate:
                raise InvalidRequestError(
                    "audio",
                    f"audio is {count / f.samplerate:.2f} s long",
                    limit=f"at most {max_seconds:g} s",
                    value=round(count / f.samplerate, 3),
                )
            if start:
                f.seek(start)
            data = f.read(count, dtype="float32", always_2d=True)
            return np.ascontiguousarray(data.T), f.samplerate
    except sf.SoundFileError as error:
        raise InvalidRequestError("audio", f"could not decode audio: {_decoder_reason(error)}") from error


def read_audio(
    source: AudioSource,
    *,
    sample_rate: int | None = None,
    channels: int | None = None,
    offset: float = 0.0,
    duration: float | None = None,
    storage_options: dict | None = None,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, int]:
    """Decode audio from a path, fsspec URL, bytes or binary file object (read from its start) into `[C, N]`.

    Only the `offset`/`duration` span (seconds) is read; for remote files fsspec then fetches just the byte
    ranges libsndfile seeks to. `max_seconds` bounds the span that would be decoded and is checked from the
    header, so an oversized upload is refused before it costs decode time or memory. With `sample_rate` and/or
    `channels` the result is converted, and the returned rate is the target rate.
    """
    if sample_rate is not None:
        _check_sample_rate(sample_rate)
    if channels is not None and channels not in (1, 2):
        raise InvalidRequestError("channels", "channels must be 1 or 2", limit="1 or 2", value=channels)
    if max_seconds is not None and not max_seconds > 0:
        raise InvalidRequestError("max_seconds", "limit must be positive", limit="> 0 seconds", value=max_seconds)
    handle = _open_source(source, storage_options)
    try:
        audio, source_rate = _decode(handle, offset, duration, max_seconds)
    finally:
        if handle is not source:
            handle.close()
    if audio.shape[1] == 0:
        raise InvalidRequestError("audio", "audio is empty", limit="at least one sample")
    audio = _as_audio(audio, finite=True)
    target_rate = sample_rate or source_rate
    return convert_audio(audio, source_rate, target_rate, channels or audio.shape[0]), target_rate


# ------------------------------------------------------------------------------------------------- Encoding and writing


def _prepare_for_encoding(audio: Any, subtype: str) -> np.ndarray:
    """Validated, finite, frames-first samples; clipped unless the subtype stores floats (no wrap-around)."""
    audio = _as_audio(audio, finite=True)
    if subtype not in _FLOAT_SUBTYPES:
        audio = np.clip(audio, -1.0, 1.0)
    return np.ascontiguousarray(audio.T)


def encode_audio(audio: np.ndarray, sample_rate: int, format: str = "wav", subtype: str | None = None) -> bytes:
    """Encode `[C, N]` float audio to the bytes of a complete file in memory (HTTP bodies, single S3 PUTs)."""
    fmt, sample_rate, subtype = _lookup_format(format, sample_rate, subtype)
    frames = _prepare_for_encoding(audio, subtype)
    buffer = io.BytesIO()
    try:
        sf.write(buffer, frames, sample_rate, format=fmt.sf_format, subtype=subtype)
    except sf.SoundFileError as error:  # e.g. more channels than the container allows
        raise InvalidRequestError("audio", f"could not encode audio as {fmt.name}: {_decoder_reason(error)}") from error
    return buffer.getvalue()


def _infer_format(destination: str) -> str:
    suffix = Path(destination.split("?", 1)[0]).suffix.lower()
    for fmt in SUPPORTED_FORMATS.values():
        if fmt.extension == suffix:
            return fmt.name
    raise InvalidRequestError(
        "format",
        f"cannot infer the audio format from {destination!r}; pass format=",
        limit=", ".join(f.extension for f in SUPPORTED_FORMATS.values()),
        value=suffix or None,
    )


def atomic_write_local(path: str, data: bytes) -> None:
    """Readers see either the old file or the complete new one, never a prefix: temp file, fsync, rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Same directory, so os.replace is a rename within one filesystem; O_EXCL + mode 0o666 honours the umask.
    temp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    if os.name == "posix":  # persist the rename itself: without this a crash can forget the new directory entry
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_audio(
    destination: str | os.PathLike,
    audio: np.ndarray,
    sample_rate: int,
    *,
    format: str | None = None,
    subtype: str | None = None,
    storage_options: dict | None = None,
) -> int:
    """Encode and store audio at a local path or fsspec URL; returns the number of bytes written.

    Encoding happens fully in memory first, so a bad argument never leaves a file behind. Local writes are
    atomic (temp file in the same directory, fsync, `os.replace`); remote ones are a single `pipe_file` of the
    finished bytes, which object stores such as S3 publish atomically (one PUT, or a multipart upload that only
    appears on completion).
    """
    destination = os.fspath(destination)
    data = encode_audio(audio, sample_rate, format or _infer_format(destination), subtype)
    fs, path = fsspec.core.url_to_fs(destination, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        atomic_write_local(path, data)
    else:
        fs.pipe_file(path, data)
    return len(data)


# ---------------------------------------------------------------------------------------------------- Streaming

# subtype -> (WAVE format tag: 1 integer PCM, 3 IEEE float; bits per sample)
_STREAM_SUBTYPES = {"PCM_16": (1, 16), "PCM_24": (1, 24), "PCM_32": (1, 32), "FLOAT": (3, 32)}
_UNKNOWN_SIZE = 0xFFFFFFFF


def _stream_subtype(subtype: str) -> str:
    if str(subtype).upper() not in _STREAM_SUBTYPES:
        raise InvalidRequestError("subtype", f"subtype {subtype!r} cannot be streamed as WAV",
                                  limit=", ".join(_STREAM_SUBTYPES), value=subtype)
    return str(subtype).upper()


def wav_stream_header(sample_rate: int, channels: int, subtype: str = "PCM_16") -> bytes:
    """A 44-byte RIFF/WAVE header for a stream of unknown length, to precede `pcm_bytes` chunks.

    The RIFF and data sizes are 0xFFFFFFFF, the "unknown/maximum length" convention browsers, ffmpeg and
    libsndfile accept: they play until the connection closes instead of stopping at a declared size.
    """
    sample_rate = _check_sample_rate(sample_rate)
    channels = _check_channels(channels)
    format_tag, bits = _STREAM_SUBTYPES[_stream_subtype(subtype)]
    block_align = channels * bits // 8
    # RIFF header; "fmt " chunk: tag, channels, rate, byte rate, block align, bits; then the data chunk's header
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", _UNKNOWN_SIZE, b"WAVE", b"fmt ", 16, format_tag, channels,
                       sample_rate, sample_rate * block_align, block_align, bits, b"data", _UNKNOWN_SIZE)


def pcm_bytes(audio: np.ndarray, subtype: str = "PCM_16") -> bytes:
    """Interleaved little-endian samples of one `[C, N]` chunk, for the body after `wav_stream_header`.

    libsndfile writes them (as headerless RAW), so a streamed WAV carries exactly the samples `encode_audio` would
    have written.
    """
    subtype = _stream_subtype(subtype)
    buffer = io.BytesIO()
    # RAW stores no sample rate; libsndfile only needs a valid one.
    sf.write(buffer, _prepare_for_encoding(audio, subtype), 8000, format="RAW", subtype=subtype, endian="LITTLE")
    return buffer.getvalue()


class _AppendOnlySink:
    """The file object libsndfile's Ogg writer writes into; hands over whatever was written since last asked.

    Ogg pages are only ever appended, so bytes can be sent as soon as they exist. The only seeks libsndfile
    makes are to the current end; any other seek means it wants to rewrite bytes already sent, which we record
    (exceptions cannot cross libsndfile's C callbacks) and report from the encoder.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._size = 0
        self.rewound = False

    def write(self, data: bytes) -> int:
        self._pending += data
        self._size += len(data)
        return len(data)

    def tell(self) -> int:
        return self._size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._size + offset  # SEEK_CUR == SEEK_END here
        if target != self._size:
            self.rewound = True
        return self._size

    def drain(self) -> bytes:
        data = bytes(self._pending)
        self._pending.clear()
        return data


class OggStreamEncoder:
    """Incremental Ogg (Vorbis, or Opus where available) encoding for chunked HTTP responses.

    `feed` returns the Ogg pages completed so far (possibly b"": the codec buffers about a page of audio) and
    `close` the rest; their concatenation is a normal Ogg file.
    """

    def __init__(self, sample_rate: int, channels: int, format: str = "ogg") -> None:
        fmt, sample_rate, self._subtype = _lookup_format(format, sample_rate)
        if fmt.sf_format != "OGG":
            raise InvalidRequestError("format", f"{fmt.name} is not an Ogg format",
                                      limit=", ".join(f.name for f in SUPPORTED_FORMATS.values()
                                                      if f.sf_format == "OGG"), value=format)
        self.channels = _check_channels(channels)
        self._sink = _AppendOnlySink()
        try:
            self._file = sf.SoundFile(self._sink, "w", sample_rate, self.channels, subtype=self._subtype,
                                      format=fmt.sf_format)
        except sf.SoundFileError as error:
            raise InvalidRequestError("channels", f"cannot encode {channels} channels as {fmt.name}: "
                                                  f"{_decoder_reason(error)}", value=channels) from error

    def feed(self, audio: np.ndarray) -> bytes:
        """Encode one `[channels, N]` chunk; returns the bytes that became final."""
        frames = _prepare_for_encoding(audio, self._subtype)
        if frames.shape[1] != self.channels:
            raise InvalidRequestError("audio", f"chunk has {frames.shape[1]} channels, stream has {self.channels}",
                                      limit=str(self.channels))
        self._file.write(frames)
        return self._drain()

    def close(self) -> bytes:
        """Flush the codec and end the stream; returns the final pages."""
        self._file.close()
        return self._drain()

    def _drain(self) -> bytes:
        if self._sink.rewound:
            raise RuntimeError("libsndfile tried to rewrite Ogg bytes that were already streamed")
        return self._sink.drain()

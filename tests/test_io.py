"""Tests for audiogen.io: formats, conversion, reading spans and limits, atomic/remote writes, streaming."""

from __future__ import annotations

import io
import os
import wave

import fsspec
import numpy as np
import pytest
import soundfile as sf

from audiogen import io as aio
from audiogen.errors import InvalidRequestError

SR = 16000


def sine(freq: float = 440.0, seconds: float = 1.0, sr: int = SR, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    rows = [amp * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]
    return np.stack(rows).astype(np.float32)


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = reference - estimate
    return 10 * np.log10(np.sum(reference**2) / max(np.sum(noise**2), 1e-20))


def best_aligned_snr(reference: np.ndarray, decoded: np.ndarray, max_shift: int = 2000) -> float:
    """Lossy codecs may delay the signal; compare at the lag where the first channels correlate best."""
    n = min(reference.shape[1], decoded.shape[1]) - max_shift
    ref, dec = reference[0, :n], decoded[0, : n + max_shift]
    lag = int(np.argmax([np.dot(ref[:4096], dec[s : s + 4096]) for s in range(max_shift)]))
    return snr_db(reference[:, :n], decoded[:, lag : lag + n])


class CountingReader(io.RawIOBase):
    """A seekable binary file that counts bytes handed to the decoder."""

    def __init__(self, data: bytes) -> None:
        self._buffer = io.BytesIO(data)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._buffer.readinto(b)
        self.bytes_read += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._buffer.seek(offset, whence)

    def tell(self) -> int:
        return self._buffer.tell()


# --- formats ---------------------------------------------------------------------------------------------------


def test_supported_formats_describe_themselves():
    assert {"wav", "flac", "ogg"} <= set(aio.SUPPORTED_FORMATS)
    expected = {"wav": ("PCM_16", "audio/wav", ".wav"), "flac": ("PCM_16", "audio/flac", ".flac"),
                "ogg": ("VORBIS", "audio/ogg", ".ogg")}
    for name, (subtype, mime, ext) in expected.items():
        fmt = aio.SUPPORTED_FORMATS[name]
        assert (fmt.default_subtype, fmt.mime_type, fmt.extension) == (subtype, mime, ext)
    for fmt in aio.SUPPORTED_FORMATS.values():
        assert all(sf.check_format(fmt.sf_format, s) for s in fmt.subtypes)
    assert ("opus" in aio.SUPPORTED_FORMATS) == ("OPUS" in sf.available_subtypes("OGG"))


@pytest.mark.parametrize("subtype,tolerance", [("PCM_16", 1 / 32768), ("PCM_24", 1 / 2**23), ("PCM_32", 1e-7),
                                               ("FLOAT", 0.0)])
def test_wav_round_trip(subtype, tolerance):
    audio = sine(channels=2)
    decoded, sr = aio.read_audio(aio.encode_audio(audio, SR, "wav", subtype))
    assert sr == SR and decoded.dtype == np.float32 and decoded.shape == audio.shape
    assert np.max(np.abs(decoded - audio)) <= tolerance


@pytest.mark.parametrize("subtype,bits", [("PCM_16", 16), ("PCM_24", 24)])
def test_flac_is_lossless(subtype, bits):
    rng = np.random.default_rng(0)
    scale = 1 << (bits - 1)
    on_grid = (rng.integers(-scale, scale, size=(2, SR)) / scale).astype(np.float32)  # exactly representable
    decoded, sr = aio.read_audio(aio.encode_audio(on_grid, SR, "flac", subtype))
    assert sr == SR
    np.testing.assert_array_equal(decoded, on_grid)
    audio = sine(channels=2)
    decoded, _ = aio.read_audio(aio.encode_audio(audio, SR, "flac", subtype))
    assert np.max(np.abs(decoded - audio)) <= 1 / scale


@pytest.mark.parametrize("name", [n for n in ("ogg", "opus") if n in aio.SUPPORTED_FORMATS])
def test_lossy_round_trip_is_close(name):
    sr = 48000 if name == "opus" else SR
    audio = sine(channels=2, sr=sr)
    decoded, got_sr = aio.read_audio(aio.encode_audio(audio, sr, name))
    assert got_sr == sr and decoded.shape[0] == 2
    assert abs(decoded.shape[1] - audio.shape[1]) <= sr // 50
    assert best_aligned_snr(audio, decoded) > 15


def test_opus_rejects_rates_it_cannot_encode():
    if "opus" not in aio.SUPPORTED_FORMATS:
        pytest.skip("libsndfile here has no Opus")
    with pytest.raises(InvalidRequestError) as err:
        aio.encode_audio(sine(sr=44100), 44100, "opus")
    assert err.value.field == "sample_rate" and "48000" in str(err.value)


def test_encode_rejects_unknown_format_and_subtype_listing_allowed_values():
    with pytest.raises(InvalidRequestError) as err:
        aio.encode_audio(sine(), SR, "mp4")
    assert err.value.field == "format" and "wav" in err.value.limit and "flac" in err.value.limit
    with pytest.raises(InvalidRequestError) as err:
        aio.encode_audio(sine(), SR, "flac", "FLOAT")
    assert err.value.field == "subtype" and "PCM_24" in err.value.limit


def test_encode_clips_pcm_but_not_float():
    loud = np.array([[2.0, -3.0, 0.25]], np.float32)
    pcm, _ = aio.read_audio(aio.encode_audio(loud, SR, "wav", "PCM_16"))
    assert pcm.max() <= 1.0 and pcm.min() >= -1.0 and pcm[0, 1] == -1.0
    flt, _ = aio.read_audio(aio.encode_audio(loud, SR, "wav", "FLOAT"))
    np.testing.assert_array_equal(flt, loud)


def test_encode_rejects_nan_and_integer_samples():
    with pytest.raises(InvalidRequestError, match="^audio: .*NaN"):
        aio.encode_audio(np.array([[0.0, np.nan]], np.float32), SR)
    with pytest.raises(InvalidRequestError, match="^audio: .*floating"):
        aio.encode_audio(np.zeros((1, 10), np.int16), SR)
    with pytest.raises(InvalidRequestError, match="channels, samples"):
        aio.encode_audio(np.zeros(10, np.float32), SR)


# --- conversion ------------------------------------------------------------------------------------------------


def test_resample_preserves_frequency_and_length():
    audio = sine(freq=1000.0, seconds=1.0, sr=44100, channels=2)
    out = aio.resample(audio, 44100, 16000)
    assert out.dtype == np.float32 and out.shape[0] == 2
    assert abs(out.shape[1] - audio.shape[1] * 16000 / 44100) <= 1
    for channel, freq in enumerate((1000.0, 2000.0)):
        spectrum = np.abs(np.fft.rfft(out[channel]))
        peak_hz = np.argmax(spectrum) * 16000 / out.shape[1]
        assert abs(peak_hz - freq) <= 2


def test_resample_same_rate_is_a_no_op_and_bad_rate_is_rejected():
    audio = sine()
    assert aio.resample(audio, SR, SR) is audio
    with pytest.raises(InvalidRequestError, match="sample_rate"):
        aio.resample(audio, SR, 0)


def test_convert_channels():
    stereo = np.array([[1.0, 0.0], [0.0, -1.0]], np.float32)
    np.testing.assert_array_equal(aio.convert_channels(stereo, 1), [[0.5, -0.5]])
    mono = np.array([[0.1, 0.2]], np.float32)
    np.testing.assert_array_equal(aio.convert_channels(mono, 2), np.concatenate([mono, mono]))
    assert aio.convert_channels(stereo, 2) is stereo
    assert aio.convert_channels(np.zeros((6, 4), np.float32), 1).shape == (1, 4)
    with pytest.raises(InvalidRequestError) as err:
        aio.convert_channels(np.zeros((6, 4), np.float32), 2)
    assert err.value.field == "channels"
    with pytest.raises(InvalidRequestError, match="channels"):
        aio.convert_channels(stereo, 3)


def test_convert_audio_combines_rate_and_channels():
    out = aio.convert_audio(sine(sr=44100, channels=2), 44100, 16000, 1)
    assert out.shape == (1, 16000)
    out = aio.convert_audio(sine(sr=8000), 8000, 16000, 2)
    assert out.shape == (2, 16000)
    np.testing.assert_array_equal(out[0], out[1])


def test_peak_normalize():
    out = aio.peak_normalize(sine(amp=0.1), -1.0)
    assert np.max(np.abs(out)) == pytest.approx(10 ** (-1 / 20), rel=1e-5)
    assert aio.peak_normalize(sine(amp=0.9), 0.0).max() == pytest.approx(1.0, rel=1e-5)
    silence = np.zeros((2, 100), np.float32)
    with np.errstate(all="raise"):
        np.testing.assert_array_equal(aio.peak_normalize(silence), silence)
    with pytest.raises(InvalidRequestError, match="peak_db"):
        aio.peak_normalize(sine(), 3.0)


# --- reading ---------------------------------------------------------------------------------------------------


def test_read_from_bytes_file_object_and_path(tmp_path):
    audio = sine(channels=2)
    data = aio.encode_audio(audio, SR, "flac")
    path = tmp_path / "a.flac"
    path.write_bytes(data)
    from_bytes, _ = aio.read_audio(data)
    from_file, _ = aio.read_audio(io.BytesIO(data))
    with open(path, "rb") as f:
        from_handle, _ = aio.read_audio(f)
        assert not f.closed  # the caller's file object stays theirs
    from_path, _ = aio.read_audio(path)
    from_str, _ = aio.read_audio(str(path))
    for other in (from_file, from_handle, from_path, from_str):
        np.testing.assert_array_equal(other, from_bytes)


def test_read_from_non_seekable_stream():
    data = aio.encode_audio(sine(), SR)

    class Pipe(io.RawIOBase):
        def __init__(self):
            self._inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self._inner.readinto(b)

    audio, _ = aio.read_audio(Pipe())
    assert audio.shape == (1, SR)


def test_read_converts_rate_and_channels():
    data = aio.encode_audio(sine(sr=44100, channels=2), 44100)
    audio, sr = aio.read_audio(data, sample_rate=SR, channels=1)
    assert sr == SR and audio.shape == (1, SR)


def test_read_offset_and_duration_seek_instead_of_decoding_everything():
    audio = np.arange(10 * SR, dtype=np.float32)[None] / (10 * SR)  # ramp: sample value encodes its index
    data = aio.encode_audio(audio, SR, "wav", "FLOAT")
    reader = CountingReader(data)
    span, _ = aio.read_audio(reader, offset=7.0, duration=0.5)
    np.testing.assert_array_equal(span, audio[:, 7 * SR : 7 * SR + SR // 2])
    assert reader.bytes_read < len(data) // 4
    tail, _ = aio.read_audio(data, offset=9.75, duration=5.0)  # duration past the end is clamped
    assert tail.shape == (1, SR // 4)


def test_read_rejects_bad_spans():
    data = aio.encode_audio(sine(), SR)
    with pytest.raises(InvalidRequestError) as err:
        aio.read_audio(data, offset=2.0)
    assert err.value.field == "offset" and "1.000" in err.value.limit
    with pytest.raises(InvalidRequestError, match="^offset"):
        aio.read_audio(data, offset=-1.0)
    with pytest.raises(InvalidRequestError, match="^duration"):
        aio.read_audio(data, duration=0.0)


def test_max_seconds_rejects_long_audio_before_decoding_it():
    data = aio.encode_audio(sine(seconds=30.0), SR)
    reader = CountingReader(data)
    with pytest.raises(InvalidRequestError) as err:
        aio.read_audio(reader, max_seconds=10)
    assert err.value.field == "audio" and "10 s" in str(err.value) and "30.00 s" in str(err.value)
    assert reader.bytes_read < len(data) // 10  # only the header was looked at
    audio, _ = aio.read_audio(data, max_seconds=10, offset=5.0, duration=10.0)  # the decoded span is what counts
    assert audio.shape == (1, 10 * SR)


def test_undecodable_empty_and_nan_audio_are_rejected():
    with pytest.raises(InvalidRequestError) as err:
        aio.read_audio(b"this is not audio" * 20)
    assert err.value.field == "audio" and str(err.value).startswith("audio:")
    assert "0x" not in str(err.value)  # libsndfile's reason, not soundfile's object repr
    with pytest.raises(InvalidRequestError, match="^audio: .*empty"):
        aio.read_audio(aio.encode_audio(np.zeros((1, 0), np.float32), SR))
    with pytest.raises(InvalidRequestError, match="^audio: .*empty"):
        aio.read_audio(b"")  # not "format not recognised"
    nan = np.array([[0.0, np.nan, 0.1]], np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, nan.T, SR, format="WAV", subtype="FLOAT")
    with pytest.raises(InvalidRequestError, match="^audio: .*NaN"):
        aio.read_audio(buffer.getvalue())


def test_read_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        aio.read_audio(tmp_path / "missing.wav")


def test_read_argument_validation():
    data = aio.encode_audio(sine(), SR)
    for kwargs, field in (({"channels": 3}, "channels"), ({"sample_rate": -5}, "sample_rate"),
                          ({"max_seconds": 0}, "max_seconds")):
        with pytest.raises(InvalidRequestError) as err:
            aio.read_audio(data, **kwargs)
        assert err.value.field == field


# --- writing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(aio.SUPPORTED_FORMATS))
def test_write_infers_format_from_extension(tmp_path, name):
    fmt = aio.SUPPORTED_FORMATS[name]
    sr = 48000 if name == "opus" else SR
    path = tmp_path / "nested" / "dir" / f"out{fmt.extension}"
    written = aio.write_audio(path, sine(sr=sr), sr)
    assert written == path.stat().st_size
    assert sf.info(str(path)).format == fmt.sf_format
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temp files left over


def test_write_is_atomic_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.wav"
    aio.write_audio(path, sine(), SR)
    before = path.read_bytes()
    with pytest.raises(InvalidRequestError, match="subtype"):
        aio.write_audio(path, sine(amp=0.1), SR, subtype="VORBIS")
    assert path.read_bytes() == before
    with pytest.raises(InvalidRequestError, match="subtype"):
        aio.write_audio(tmp_path / "new.wav", sine(), SR, subtype="NOPE")
    with pytest.raises(InvalidRequestError, match="format"):
        aio.write_audio(tmp_path / "new.xyz", sine(), SR)
    assert sorted(os.listdir(tmp_path)) == ["out.wav"]


def test_write_cleans_up_temp_file_when_the_disk_write_fails(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(aio.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        aio.write_audio(tmp_path / "out.wav", sine(), SR)
    assert os.listdir(tmp_path) == []


def test_write_replaces_existing_file_with_umask_permissions(tmp_path):
    path = tmp_path / "out.flac"
    aio.write_audio(path, sine(), SR)
    aio.write_audio(path, sine(freq=880.0), SR, format="flac", subtype="PCM_24")
    assert sf.info(str(path)).subtype == "PCM_24"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_fsspec_memory_round_trip():
    audio = sine(channels=2)
    url = f"memory://audiogen-tests/{os.getpid()}/clip.flac"
    written = aio.write_audio(url, audio, SR)
    fs = fsspec.filesystem("memory")
    assert fs.size(url) == written
    decoded, sr = aio.read_audio(url, offset=0.5)
    assert sr == SR and decoded.shape == (2, SR // 2)
    assert np.max(np.abs(decoded - audio[:, SR // 2 :])) <= 1 / 32768
    fs.rm(url)


# --- streaming -------------------------------------------------------------------------------------------------


def _chunks(audio: np.ndarray, size: int):
    return [audio[:, i : i + size] for i in range(0, audio.shape[1], size)]


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_streamed_wav_decodes_to_the_same_samples(subtype):
    audio = sine(channels=2, amp=0.9)
    audio[0, :3] = [1.5, -1.5, -1.0]  # clipping behaves like the file encoder
    header = aio.wav_stream_header(SR, 2, subtype)
    body = b"".join(aio.pcm_bytes(chunk, subtype) for chunk in _chunks(audio, 3001))
    assert len(header) == 44 and header[4:8] == header[40:44] == b"\xff\xff\xff\xff"

    reference, _ = aio.read_audio(aio.encode_audio(audio, SR, "wav", subtype))
    patched = header[:4] + (36 + len(body)).to_bytes(4, "little") + header[8:40] + len(body).to_bytes(4, "little")
    decoded, sr = aio.read_audio(patched + body)
    assert sr == SR
    np.testing.assert_array_equal(decoded, reference)  # bit-identical to a normally written file
    # libsndfile also accepts the unknown-length header as is, reading until the data ends.
    np.testing.assert_array_equal(aio.read_audio(header + body)[0], reference)


def test_stream_header_is_parseable_by_wave_module():
    header = aio.wav_stream_header(22050, 1)
    body = aio.pcm_bytes(sine(sr=22050))
    with wave.open(io.BytesIO(header + body)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22050)
        frames = np.frombuffer(w.readframes(22050), "<i2")
    assert frames.size == 22050


def test_stream_helpers_reject_unknown_subtype():
    with pytest.raises(InvalidRequestError) as err:
        aio.wav_stream_header(SR, 1, "VORBIS")
    assert err.value.field == "subtype" and "PCM_16" in err.value.limit
    with pytest.raises(InvalidRequestError, match="subtype"):
        aio.pcm_bytes(sine(), "ULAW")
    with pytest.raises(InvalidRequestError, match="channels"):
        aio.wav_stream_header(SR, 0)


@pytest.mark.parametrize("name", [n for n in ("ogg", "opus") if n in aio.SUPPORTED_FORMATS])
def test_ogg_stream_encoder_emits_pages_incrementally(name):
    sr = 48000 if name == "opus" else SR
    audio = sine(seconds=6.0, channels=2, sr=sr)
    encoder = aio.OggStreamEncoder(sr, 2, format=name)
    pieces = [encoder.feed(chunk) for chunk in _chunks(audio, sr // 2)]
    pieces.append(encoder.close())
    assert sum(1 for p in pieces[:-1] if p) >= 3  # bytes flow before the end, not only at close
    decoded, got_sr = aio.read_audio(b"".join(pieces))
    assert got_sr == sr and decoded.shape[0] == 2
    assert abs(decoded.shape[1] - audio.shape[1]) <= sr // 50
    assert best_aligned_snr(audio, decoded) > 15


def test_ogg_stream_encoder_validates_input():
    encoder = aio.OggStreamEncoder(SR, 2)
    with pytest.raises(InvalidRequestError, match="channels"):
        encoder.feed(sine(channels=1))
    encoder.close()
    with pytest.raises(InvalidRequestError, match="format"):
        aio.OggStreamEncoder(SR, 2, format="wav")

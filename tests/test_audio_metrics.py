"""The objective audio metrics (audiogen.eval.audio_metrics) on the synth corpus's own clean signals, and the
corpus generator itself (audiogen.data.synth): determinism, levels, held-out design, vocabulary, manifest.

Thresholds are measured values with margin (clean signals, 16 kHz): pitch error <= 0.03 semitone (asserted
0.1), tempo error <= 0.1 % (asserted 0.5 %), colour slope within 0.12 dB/octave of the ideal for steady noise
(asserted 0.35; 0.52 for short bursts, asserted 0.75), SI-SNR of a known 10 dB / 0 dB corruption within 0.05 dB.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from audiogen.data import synth
from audiogen.eval import audio_metrics as metrics
from audiogen.scratch import word_tokenizer as tiny_tokenizer, word_list

SR = synth.SAMPLE_RATE


# ---------------------------------------------------------------------------------------------------------------
# Pitch
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("waveform", synth.WAVEFORMS)
def test_dominant_pitch_of_every_note_within_a_tenth_of_a_semitone(waveform: str) -> None:
    worst = 0.0
    for note in synth.NOTES:
        audio = synth.render(synth.SoundSpec(kind="tone", note=note, waveform=waveform, duration=1.5))
        estimate = metrics.dominant_pitch(audio, SR)
        error = estimate.error_semitones(synth.note_hz(note))
        worst = max(worst, abs(error))
        assert abs(error) < 0.1, (note, waveform, estimate)
        assert estimate.voiced_fraction > 0.9 and estimate.aperiodicity < 0.05, (note, estimate)
    print(f"{waveform}: worst pitch error {worst:.4f} semitones")


@pytest.mark.parametrize("envelope", ["decay", "swell", "fade_out"])
def test_dominant_pitch_uses_the_sustained_part_of_shaped_tones(envelope: str) -> None:
    for note, waveform in (("c3", "saw"), ("a4", "square"), ("a5", "sine")):
        spec = synth.SoundSpec(kind="tone", note=note, waveform=waveform, envelope=envelope, decay=0.15, onset=0.2,
                               duration=2.0)
        estimate = metrics.dominant_pitch(synth.render(spec), SR)
        assert abs(estimate.error_semitones(synth.note_hz(note))) < 0.1, (spec, estimate)


def test_pitch_of_silence_and_noise_is_reported_as_missing() -> None:
    assert np.isnan(metrics.dominant_pitch(np.zeros(SR), SR).hz)
    noise = synth.render(synth.SoundSpec(kind="noise", color="white", duration=1.0))
    estimate = metrics.dominant_pitch(noise, SR)
    assert np.isnan(estimate.hz) or estimate.voiced_fraction < 0.2, estimate


def test_note_names_and_semitones() -> None:
    assert metrics.note_hz("a4") == pytest.approx(440.0)
    assert metrics.note_hz("c4") == pytest.approx(261.6256, abs=1e-3)
    assert metrics.note_hz("c#4") == pytest.approx(metrics.note_hz("db4"))
    assert all(metrics.note_hz(note) == pytest.approx(synth.note_hz(note)) for note in synth.NOTES)
    assert metrics.semitones(880.0, 440.0) == pytest.approx(12.0)
    assert np.isnan(metrics.semitones(float("nan"), 440.0))


# ---------------------------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", synth.DIRECTIONS)
def test_sweep_direction(direction: str) -> None:
    for waveform in synth.WAVEFORMS:
        for repeat, span, note in ((1, 7.0, "e4"), (2, 12.0, "g4"), (3, 20.0, "c4" if direction == "up" else "a5")):
            spec = synth.SoundSpec(kind="sweep", note=note, waveform=waveform, direction=direction, span=span,
                                   repeat=repeat, duration=3.0)
            estimate = metrics.sweep_direction(synth.render(spec), SR)
            assert estimate.direction == direction and estimate.confidence > 0.9, (spec, estimate)
            expected = span * repeat / spec.duration  # semitones per second
            assert abs(abs(estimate.slope) / expected - 1) < 0.1, (spec, estimate)


def test_steady_tone_is_not_a_sweep() -> None:
    audio = synth.render(synth.SoundSpec(kind="tone", note="a4", waveform="saw", duration=2.0))
    assert metrics.sweep_direction(audio, SR).direction == "flat"


# ---------------------------------------------------------------------------------------------------------------
# Tempo
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", synth.SOURCES)
def test_beat_tempo_of_every_tempo(source: str) -> None:
    for index, tempo in enumerate(synth.TEMPOS):
        spec = synth.SoundSpec(kind="beat", source=source, tempo=tempo, note="a4" if source == "beep" else None,
                               waveform="sine" if source == "beep" else None, decay=0.02 + 0.008 * index,
                               onset=0.03 * index, seed=index)
        estimate = metrics.beat_tempo(synth.render(spec), SR)
        assert estimate.error(tempo) < 0.005, (spec, estimate)
        assert estimate.confidence > 0.5, (spec, estimate)
        assert any(abs(bpm / estimate.bpm - 1) < 0.01 for bpm in estimate.candidates), estimate


def test_beat_tempo_is_not_fooled_into_half_or_double_tempo() -> None:
    for tempo in (60, 120, 180):
        audio = synth.render(synth.SoundSpec(kind="beat", source="click", tempo=tempo, decay=0.03))
        assert metrics.beat_tempo(audio, SR).bpm == pytest.approx(tempo, rel=0.005)


def test_beat_tempo_over_a_noise_background() -> None:
    beat = synth.SoundSpec(kind="beat", source="drum", tempo=140, decay=0.05, onset=0.1, seed=1)
    noise = synth.SoundSpec(kind="noise", color="pink", gain_db=-8.0, seed=2)
    audio = synth.render(synth.SoundSpec(kind="mix", parts=(beat, noise)))
    assert metrics.beat_tempo(audio, SR).error(140) < 0.01


# ---------------------------------------------------------------------------------------------------------------
# Noise colour
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("color", synth.COLORS)
def test_noise_colour_and_slope(color: str) -> None:
    for seed, envelope in enumerate(synth.ENVELOPES):
        spec = synth.SoundSpec(kind="noise", color=color, envelope=envelope, decay=0.2, onset=0.1, seed=seed,
                               duration=3.0)
        estimate = metrics.noise_colour(synth.render(spec), SR)
        assert estimate.colour == color, (spec, estimate)
        assert estimate.distance < (0.75 if envelope == "decay" else 0.35), (spec, estimate)


def test_tone_spectrum_is_not_a_straight_line() -> None:
    tone = synth.render(synth.SoundSpec(kind="tone", note="a4", waveform="sine", duration=1.0))
    noise = synth.render(synth.SoundSpec(kind="noise", color="pink", duration=1.0))
    assert metrics.noise_colour(tone, SR).residual > 5 * metrics.noise_colour(noise, SR).residual


# ---------------------------------------------------------------------------------------------------------------
# SI-SNR
# ---------------------------------------------------------------------------------------------------------------


def test_si_snr_identity_scale_and_known_noise() -> None:
    reference = synth.render(synth.SoundSpec(kind="tone", note="e4", waveform="saw", duration=2.0))
    assert metrics.si_snr(reference, reference) > 100
    assert metrics.si_snr(0.3 * reference, reference) > 100  # scale-invariant
    assert metrics.si_snr(reference[None], reference) > 100  # [1, N] accepted
    rng = np.random.default_rng(0)
    for snr_db in (10.0, 0.0):
        noise = rng.standard_normal(reference.size)
        noise -= noise.mean()
        # Exactly orthogonal to the reference, so the SI-SNR is exactly the SNR.
        centred = reference - reference.mean()
        noise -= (noise @ centred) / (centred @ centred) * centred
        noise *= np.linalg.norm(centred) / np.linalg.norm(noise) * 10 ** (-snr_db / 20)
        assert metrics.si_snr(reference + noise, reference) == pytest.approx(snr_db, abs=0.05)
    assert metrics.si_snr(-reference, reference) > 100  # a sign flip is a (negative) scale
    assert metrics.si_snr(rng.standard_normal(reference.size), reference) < -20


# ---------------------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_item_independent() -> None:
    first = list(synth.iter_corpus(6, seed=3, duration=1.0))
    again = list(synth.iter_corpus(6, seed=3, duration=1.0))
    longer = list(synth.iter_corpus(8, seed=3, duration=1.0))
    other = list(synth.iter_corpus(6, seed=4, duration=1.0))
    for a, b, c in zip(first, again, longer):
        assert a.spec == b.spec == c.spec and a.caption == b.caption == c.caption
        assert np.array_equal(a.audio, b.audio) and np.array_equal(a.audio, c.audio)
    assert [i.caption for i in first] != [i.caption for i in other]


def test_every_kind_renders_at_minus_3_dbfs() -> None:
    for kind in synth.KINDS:
        for split in synth.SPLITS:
            item = next(synth.iter_corpus(1, seed=11, split=split, kind=kind, duration=2.0))
            assert item.audio.dtype == np.float32 and item.audio.shape == (2 * SR,)
            assert np.isfinite(item.audio).all()
            assert float(np.max(np.abs(item.audio))) == pytest.approx(10 ** (-3 / 20), rel=1e-4), (kind, item.spec)
            assert synth.SoundSpec.from_dict(json.loads(item.spec.to_json())) == item.spec


def _all_combinations() -> dict[str, list[tuple]]:
    registers = ("low", "mid", "high")
    return {
        "tone": [("tone", n, w, e) for n in synth.NOTES for w in synth.WAVEFORMS for e in synth.ENVELOPES],
        "sweep": [("sweep", d, w, r, k) for d in synth.DIRECTIONS for w in synth.WAVEFORMS for r in registers
                  for k in (1, 2, 3)],
        "siren": [("siren", s, w, r) for s in synth.SPEEDS for w in synth.WAVEFORMS for r in registers],
        "noise": [("noise", c, e) for c in synth.COLORS for e in synth.ENVELOPES],
        "beat": [("beat", s, t) for s in synth.SOURCES for t in synth.TEMPOS],
    }


def test_heldout_combinations_recombine_values_seen_in_training() -> None:
    for kind, keys in _all_combinations().items():
        held = [key for key in keys if synth.is_heldout_combination(key)]
        assert 0.15 <= len(held) / len(keys) <= 0.25, kind
        for dimension in range(1, len(keys[0])):  # every single value occurs in some training combination
            assert {k[dimension] for k in keys if not synth.is_heldout_combination(k)} == {k[dimension] for k in keys}
    assert {key[1] for key in _all_combinations()["noise"] if synth.is_heldout_combination(key)} == set(synth.COLORS)
    for split in synth.SPLITS:
        for index in range(150):
            spec, _ = synth.item_spec(index, 0, split)
            key = synth.combination(spec)
            if key is not None:
                assert synth.is_heldout_combination(key) == (split == "heldout"), (split, spec)


def test_heldout_continuous_ranges_are_interior_bands() -> None:
    rng = np.random.default_rng(0)
    train = np.array([synth._draw(rng, 0.0, 10.0, "train") for _ in range(2000)])
    heldout = np.array([synth._draw(rng, 0.0, 10.0, "heldout") for _ in range(2000)])
    assert ((train < 4.0) | (train > 6.0)).all() and train.min() < 0.1 and train.max() > 9.9
    assert ((heldout >= 4.0) & (heldout <= 6.0)).all()


def test_caption_vocabulary_is_known_single_tokens() -> None:
    train_words = synth.vocabulary("train", n=1500)
    heldout_words = synth.vocabulary("heldout", n=600)
    assert heldout_words <= train_words, heldout_words - train_words
    assert train_words <= set(word_list()), train_words - set(word_list())
    tokenizer = tiny_tokenizer()
    captions = [synth.item_spec(i, 0, split)[1] for split in synth.SPLITS for i in range(300)]
    for text in captions:
        pieces = tokenizer.tokenize(text)
        assert not any(p.startswith("##") or p == "<unk>" for p in pieces), (text, pieces)
    # The controlled parameters are named: every tone caption has its note and waveform, every beat its tempo.
    for index in range(300):
        spec, text = synth.item_spec(index, 1, "heldout")
        words = synth.caption_words(text)
        if spec.kind == "tone":
            assert spec.note in words and any(w in words for w in synth._WAVE[spec.waveform]), text
        if spec.kind == "beat":
            assert str(spec.tempo) in words and ("bpm" in words or "minute" in words), text
        if spec.kind == "noise":
            assert spec.color in words, text


def test_write_corpus_manifest_is_what_encode_reads(tmp_path) -> None:
    from pipelines.encode import load_manifest

    from audiogen.io import read_audio

    manifest = synth.write_corpus(tmp_path, 3, seed=5, split="heldout", duration=1.0)
    assert manifest == tmp_path / "heldout.jsonl"
    table = load_manifest(str(manifest)).to_pylist()
    rows = synth.read_manifest(manifest)
    items = list(synth.iter_corpus(3, seed=5, split="heldout", duration=1.0))
    for entry, row, item in zip(table, rows, items):
        assert entry["caption"] == row["caption"] == item.caption and entry["split"] == "heldout"
        assert row["spec"] == item.spec
        audio, rate = read_audio(entry["path"])
        assert rate == SR and audio.shape == (1, SR)
        assert np.max(np.abs(audio[0] - item.audio)) < 1.0 / 2 ** 15  # 16-bit PCM

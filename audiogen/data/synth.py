"""A seeded procedural sound corpus with captions, for training and testing the project's own small models.

Every clip is described by a `SoundSpec` (what was synthesised, with all its parameters), rendered by `render` to
float32 mono audio, and captioned by `caption` from a family of templates. The same seed always gives the same
specs, captions and samples (NumPy's PCG64 streams keyed by (seed, split, index), so item i does not depend on how
many items are drawn).

Kinds and the parameters a caption names (these are what quality tests ask for, so they always use the same
words, each a single token of the tiny tokenizer's vocabulary `audiogen/data/words.txt`):

- `tone`: a note from `NOTES` (15 pentatonic notes C3..A5, 131-880 Hz, named "c3" ... "a5", at least two
  semitones apart so a pitch error of one semitone never lands on another note of the set), a waveform
  (`sine`/`square`/`saw`, band-limited) and an envelope (`steady`, `decay`, `swell`, `fade_out`). Captions also use
  the register word derived from the octave ("low" 3, "mid" 4, "high" 5).
- `sweep`: an exponential glide `up`/`down` ("rising"/"falling", "ascending"/"descending", "going up"/"down") over
  7-24 semitones, one to three times, with a waveform; the register it starts in.
- `siren`: a tone whose pitch swings around a note of `NOTES`, `slow` (0.4-0.8 Hz) or `fast` (2.5-5 Hz).
- `noise`: `white`, `pink` or `brown` noise (power slope 0, -3, -6 dB per octave) with an envelope; a `decay`
  envelope is captioned as a "burst".
- `beat`: `click`, `beep` (a short tone at a note), `drum` (a pitch-dropping thump) or `noise` bursts at a
  tempo from `TEMPOS` (60-180 bpm, always written as a number followed by "bpm").
- `sequence`: two or three of tone/noise/sweep one after the other ("..., then ...", "... followed by ...").
- `mix`: a tonal or rhythmic foreground over a noise background ("... with ... in the background").

Held-out split (`split="heldout"`), designed so that a model trained on `train` can be asked for it with words it
knows:

- caption templates: each kind has templates used only for held-out items. They rearrange words that the train
  templates use (no held-out caption contains a word absent from the train captions, and every caption word is a
  single token of `words.txt`: `tests/test_audio_metrics.py` checks both), so the text encoder sees known tokens
  in new orders;
- parameter combinations: for every kind, one combination in five of its discrete parameters (e.g. (note,
  waveform, envelope) for tones, (source, tempo) for beats, (colour, envelope) for noise) is held out by a fixed
  hash rule (`is_heldout_combination`). Every single value still occurs in training with other partners, so a
  held-out item asks the model to compose known values, never to invent an unseen note or tempo word;
- continuous ranges: the middle fifth of every continuous range (sweep span, siren rate, decay time, onsets,
  background level) is reserved for held-out items (`_draw`), so held-out values interpolate between trained ones.

Levels: every clip is peak-normalised to `SoundSpec.level_db` (default -3 dBFS), so nothing clips.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
DEFAULT_DURATION = 4.0
SPLITS = ("train", "heldout")

# C major pentatonic over three octaves: named notes, >= 2 semitones apart.
NOTES: dict[str, int] = {f"{name}{octave}": 12 * (octave + 1) + offset
                         for octave in (3, 4, 5) for name, offset in (("c", 0), ("d", 2), ("e", 4), ("g", 7),
                                                                      ("a", 9))}
WAVEFORMS = ("sine", "square", "saw")
ENVELOPES = ("steady", "decay", "swell", "fade_out")
DIRECTIONS = ("up", "down")
COLORS = ("white", "pink", "brown")
TEMPOS = (60, 80, 90, 100, 120, 140, 160, 180)
SOURCES = ("click", "beep", "drum", "noise")
HIT_SECONDS = {"click": 0.004, "beep": 0.1, "drum": 0.3}  # length of one beat event; noise: min(0.25, 5 * decay)
SPEEDS = ("slow", "fast")
SIREN_RATES = {"slow": (0.4, 0.8), "fast": (2.5, 5.0)}
KINDS = ("tone", "sweep", "siren", "noise", "beat", "sequence", "mix")
KIND_WEIGHTS = (0.26, 0.15, 0.08, 0.15, 0.20, 0.08, 0.08)
PART_KINDS = ("tone", "noise", "sweep")  # what a sequence is made of
FOREGROUND_KINDS = ("tone", "sweep", "siren", "beat")  # what a mix puts over its noise background
SEQUENCE_GAP = 0.1  # seconds of silence between the parts of a sequence
HELDOUT_FRACTION = 5  # about one combination in HELDOUT_FRACTION is held out
# Salt of the held-out hash: the first of a fixed search that holds out 15-25 % of every kind's combinations, keeps
# every single value in training, and holds out a combination for every noise colour (see `is_heldout_combination`).
HELDOUT_SALT = "synth-heldout-191:"


def note_hz(note: str) -> float:
    """Frequency of a note of `NOTES` (equal temperament, A4 = 440 Hz)."""
    return 440.0 * 2.0 ** ((NOTES[note] - 69) / 12)


def register(note: str) -> str:
    """"low" (octave 3), "mid" (octave 4) or "high" (octave 5)."""
    return {"3": "low", "4": "mid", "5": "high"}[note[-1]]


# ---------------------------------------------------------------------------------------------------- Specs


@dataclass(frozen=True)
class SoundSpec:
    """Everything `render` needs; fields a kind does not use stay None. JSON round trip: `to_dict`/`from_dict`."""

    kind: str
    duration: float = DEFAULT_DURATION
    note: str | None = None  # tone; sweep start; siren centre; beat source "beep"
    waveform: str | None = None  # tone, sweep, siren, beep beats
    envelope: str = "steady"  # tone, noise
    direction: str | None = None  # sweep: up | down
    span: float | None = None  # sweep: semitones covered by each glide (> 0)
    repeat: int = 1  # sweep: glides in the clip
    speed: str | None = None  # siren: slow | fast
    rate: float | None = None  # siren: modulation frequency in Hz
    depth: float | None = None  # siren: swing in semitones either side of the note
    color: str | None = None  # noise: white | pink | brown
    tempo: int | None = None  # beat: beats per minute
    source: str | None = None  # beat: click | beep | drum | noise
    decay: float | None = None  # time constant (s) of a decay envelope or of each beat hit
    onset: float = 0.0  # seconds before the first event (beats, decaying tones, bursts)
    gain_db: float = 0.0  # level of a part inside a mix, relative to the other parts' RMS
    parts: tuple["SoundSpec", ...] = ()  # sequence / mix
    seed: int = 0  # noise generator of this spec
    level_db: float = -3.0  # peak level of the rendered clip (dBFS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # parts too, as dicts

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SoundSpec":
        data = dict(data)
        data["parts"] = tuple(cls.from_dict(part) for part in data.get("parts", ()))
        return cls(**data)

    @property
    def frequency(self) -> float | None:
        """The note's frequency in Hz (start of a sweep, centre of a siren, pitch of beeps)."""
        return note_hz(self.note) if self.note else None


def combination(spec: SoundSpec) -> tuple[Any, ...] | None:
    """The discrete parameters of a spec whose joint values are split between train and held-out."""
    if spec.kind == "tone":
        return ("tone", spec.note, spec.waveform, spec.envelope)
    if spec.kind == "sweep":
        return ("sweep", spec.direction, spec.waveform, register(spec.note), spec.repeat)
    if spec.kind == "siren":
        return ("siren", spec.speed, spec.waveform, register(spec.note))
    if spec.kind == "noise":
        return ("noise", spec.color, spec.envelope)
    if spec.kind == "beat":
        return ("beat", spec.source, spec.tempo)
    return None


def is_heldout_combination(key: tuple[Any, ...] | None) -> bool:
    """About one combination in `HELDOUT_FRACTION`, by a fixed salted hash (stable across machines)."""
    if key is None:
        return False
    digest = hashlib.sha256((HELDOUT_SALT + json.dumps(list(key))).encode()).digest()
    return int.from_bytes(digest[:8], "little") % HELDOUT_FRACTION == 0


def _draw(rng: np.random.Generator, low: float, high: float, split: str) -> float:
    """Uniform in [low, high]; the middle fifth is reserved for the held-out split."""
    width = high - low
    band_low, band_high = low + 0.4 * width, low + 0.6 * width
    if split == "heldout":
        return float(rng.uniform(band_low, band_high))
    value = float(rng.uniform(low, high - 0.2 * width))
    return value if value < band_low else value + 0.2 * width


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def sample_spec(rng: np.random.Generator, split: str = "train", *, kind: str | None = None,
                duration: float = DEFAULT_DURATION) -> SoundSpec:
    """A random spec of `kind` (else drawn by `KIND_WEIGHTS`) whose combination belongs to `split`. The parts of
    sequences and mixes only take the split's continuous ranges: what is held out about them is their
    combination and caption templates."""
    _split_id(split)  # validates
    if kind is None:
        kind = KINDS[int(rng.choice(len(KINDS), p=np.asarray(KIND_WEIGHTS) / sum(KIND_WEIGHTS)))]
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    if kind == "sequence":
        count = 2 if rng.random() < 0.7 else 3
        part_duration = (duration - SEQUENCE_GAP * (count - 1)) / count
        parts = tuple(_draw_simple(rng, split, _choice(rng, PART_KINDS), part_duration) for _ in range(count))
        return SoundSpec(kind="sequence", duration=duration, parts=parts, seed=int(rng.integers(2**31)))
    if kind == "mix":
        foreground = _draw_simple(rng, split, _choice(rng, FOREGROUND_KINDS), duration)
        background = _draw_simple(rng, split, "noise", duration, envelope="steady")
        background = dataclasses.replace(background, gain_db=-_draw(rng, 4.0, 14.0, split))
        return SoundSpec(kind="mix", duration=duration, parts=(foreground, background),
                         seed=int(rng.integers(2**31)))
    for _ in range(1000):  # a simple kind: redrawn until its combination belongs to the split
        spec = _draw_simple(rng, split, kind, duration)
        if is_heldout_combination(combination(spec)) == (split == "heldout"):
            return spec
    raise RuntimeError(f"no {split} combination found for kind {kind!r}")  # pragma: no cover


def _draw_simple(rng: np.random.Generator, split: str, kind: str, duration: float,
                 envelope: str | None = None) -> SoundSpec:
    seed = int(rng.integers(2**31))
    notes = list(NOTES)
    if kind in ("tone", "noise"):
        env = envelope or _choice(rng, ENVELOPES)
        shape = dict(envelope=env, decay=_draw(rng, 0.15, 0.6, split) if env == "decay" else None,
                     onset=_draw(rng, 0.0, 0.2, split) if env == "decay" else 0.0)
        if kind == "noise":
            return SoundSpec(kind="noise", duration=duration, color=_choice(rng, COLORS), seed=seed, **shape)
        return SoundSpec(kind="tone", duration=duration, note=_choice(rng, notes), waveform=_choice(rng, WAVEFORMS),
                         seed=seed, **shape)
    if kind == "sweep":
        direction = _choice(rng, DIRECTIONS)
        span = _draw(rng, 7.0, 24.0, split)
        repeat = int(_choice(rng, (1, 1, 2, 3))) if duration >= 2.0 else 1
        # Start so that the glide stays within roughly C3..A5 (plus a few semitones either side).
        lowest, highest = NOTES["c3"] - 3, NOTES["a5"] + 3
        candidates = [n for n, m in NOTES.items()
                      if (lowest <= m + span <= highest if direction == "up" else lowest <= m - span <= highest)]
        return SoundSpec(kind="sweep", duration=duration, note=_choice(rng, candidates),
                         waveform=_choice(rng, WAVEFORMS), direction=direction, span=round(span, 3), repeat=repeat,
                         seed=seed)
    if kind == "siren":
        speed = _choice(rng, SPEEDS)
        low, high = SIREN_RATES[speed]
        return SoundSpec(kind="siren", duration=duration, note=_choice(rng, notes[2:-2]),
                         waveform=_choice(rng, WAVEFORMS), speed=speed, rate=round(_draw(rng, low, high, split), 4),
                         depth=round(_draw(rng, 3.0, 7.0, split), 3), seed=seed)
    if kind == "beat":
        source = _choice(rng, SOURCES)
        tempo = int(_choice(rng, TEMPOS))
        beep = source == "beep"
        return SoundSpec(kind="beat", duration=duration, source=source, tempo=tempo,
                         note=_choice(rng, notes) if beep else None,
                         waveform=_choice(rng, ("sine", "square")) if beep else None,
                         decay=round(_draw(rng, 0.02, 0.08, split), 4),
                         onset=round(_draw(rng, 0.0, 0.25, split), 4), seed=seed)
    raise ValueError(f"{kind!r} is not a simple kind")


# ---------------------------------------------------------------------------------------------------- Rendering


def render(spec: SoundSpec, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 mono samples [round(spec.duration * sample_rate)], peak at `spec.level_db` dBFS."""
    n = int(round(spec.duration * sample_rate))
    if n <= 0:
        raise ValueError(f"duration must be positive, got {spec.duration}")
    audio = _render(spec, sample_rate, n)
    peak = float(np.max(np.abs(audio)))
    if peak > 0:
        audio = audio * (10.0 ** (spec.level_db / 20) / peak)
    return audio.astype(np.float32)


def _render(spec: SoundSpec, sr: int, n: int) -> np.ndarray:
    t = np.arange(n) / sr
    rng = np.random.default_rng(spec.seed)
    if spec.kind == "tone":
        phase = 2 * np.pi * note_hz(spec.note) * t
        return _oscillator(phase, np.full(n, note_hz(spec.note)), spec.waveform, sr) * _envelope(spec, sr, n)
    if spec.kind == "sweep":
        glide = n / spec.repeat / sr
        local = (t % glide) / glide
        sign = 1.0 if spec.direction == "up" else -1.0
        freq = note_hz(spec.note) * 2.0 ** (sign * spec.span * local / 12)
        phase = 2 * np.pi * np.cumsum(freq) / sr
        # Each glide fades in and out so the jump back to the start frequency is not a click.
        edge = np.minimum(1.0, np.minimum(local * glide, (1 - local) * glide) / 0.02)
        return _oscillator(phase, freq, spec.waveform, sr) * edge
    if spec.kind == "siren":
        freq = note_hz(spec.note) * 2.0 ** (spec.depth * np.sin(2 * np.pi * spec.rate * t - np.pi / 2) / 12)
        phase = 2 * np.pi * np.cumsum(freq) / sr
        return _oscillator(phase, freq, spec.waveform, sr) * _fades(n, sr)
    if spec.kind == "noise":
        return colored_noise(rng, n, spec.color, sr) * _envelope(spec, sr, n)
    if spec.kind == "beat":
        return _beat(spec, sr, n, rng)
    if spec.kind == "sequence":
        out = np.zeros(n)
        start = 0
        for part in spec.parts:
            length = min(int(round(part.duration * sr)), n - start)
            if length <= 0:
                break
            piece = _render(part, sr, length)
            out[start:start + length] = piece / max(float(np.max(np.abs(piece))), 1e-9)
            start += length + int(round(SEQUENCE_GAP * sr))
        return out
    if spec.kind == "mix":
        out = np.zeros(n)
        for part in spec.parts:
            piece = _render(part, sr, n)
            rms = math.sqrt(float(np.mean(piece ** 2))) or 1.0
            out += piece / rms * 10.0 ** (part.gain_db / 20)
        return out
    raise ValueError(f"unknown kind {spec.kind!r}")


def _oscillator(phase: np.ndarray, freq: np.ndarray, waveform: str, sr: int) -> np.ndarray:
    """Band-limited additive sine/square/saw: harmonics fade out between 0.8 and 0.95 of Nyquist."""
    if waveform == "sine":
        return np.sin(phase)
    if waveform not in ("square", "saw"):
        raise ValueError(f"unknown waveform {waveform!r}")
    nyquist = sr / 2
    out = np.zeros_like(phase)
    k = 1
    while k * float(np.min(freq)) < 0.95 * nyquist:
        taper = np.clip((0.95 * nyquist - k * freq) / (0.15 * nyquist), 0.0, 1.0)
        out += taper * np.sin(k * phase) / k
        k += 2 if waveform == "square" else 1
    # Unit-ish amplitude: the ideal square's Fourier series is 4/pi * sum, the saw's 2/pi * sum.
    return out * (4 / np.pi if waveform == "square" else 2 / np.pi)


def _fades(n: int, sr: int, seconds: float = 0.01) -> np.ndarray:
    ramp = max(1, min(int(seconds * sr), n // 2))
    env = np.ones(n)
    env[:ramp] = np.linspace(0.0, 1.0, ramp, endpoint=False)
    env[n - ramp:] = np.linspace(1.0, 0.0, ramp)
    return env


def _envelope(spec: SoundSpec, sr: int, n: int) -> np.ndarray:
    t = np.arange(n) / sr
    total = n / sr
    if spec.envelope == "steady":
        return _fades(n, sr)
    if spec.envelope == "decay":
        local = t - spec.onset
        attack = np.clip(local / 0.005, 0.0, 1.0)
        return np.where(local >= 0, attack * np.exp(-np.maximum(local, 0.0) / spec.decay), 0.0) * _fades(n, sr)
    if spec.envelope == "swell":  # -30 dB -> 0 dB, linear in dB
        return 10.0 ** (-1.5 * (1 - t / total)) * _fades(n, sr)
    if spec.envelope == "fade_out":  # 0 dB -> -30 dB
        return 10.0 ** (-1.5 * t / total) * _fades(n, sr, 0.05)
    raise ValueError(f"unknown envelope {spec.envelope!r}")


def colored_noise(rng: np.random.Generator, n: int, color: str, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Gaussian noise with power ~ 1/f^alpha (white 0, pink 1, brown 2), rolled off below 30 Hz."""
    alpha = {"white": 0.0, "pink": 1.0, "brown": 2.0}[color]
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    corner = 30.0
    gain = (np.maximum(freqs, corner) / corner) ** (-alpha / 2)
    gain *= np.where(freqs < corner, (freqs / corner) ** 2, 1.0)  # second-order high-pass below the corner
    noise = np.fft.irfft(spectrum * gain, n)
    return noise / (np.std(noise) or 1.0)


def _beat(spec: SoundSpec, sr: int, n: int, rng: np.random.Generator) -> np.ndarray:
    period = 60.0 / spec.tempo
    hit = _hit(spec, sr, rng)
    tail = max(1, len(hit) // 5)  # each event fades out over its last fifth: a hard cut would be a second onset
    hit[-tail:] *= 0.5 + 0.5 * np.cos(np.linspace(0.0, np.pi, tail))
    out = np.zeros(n)
    time = spec.onset
    while time < n / sr:
        start = int(round(time * sr))
        length = min(len(hit), n - start)
        out[start:start + length] += hit[:length]
        time += period
    return out


def _hit(spec: SoundSpec, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One event of a beat (before `_beat` fades out its tail)."""
    if spec.source not in SOURCES:
        raise ValueError(f"unknown beat source {spec.source!r}")
    seconds = min(0.25, 5 * spec.decay) if spec.source == "noise" else HIT_SECONDS[spec.source]
    length = int(seconds * sr)
    t = np.arange(length) / sr
    if spec.source == "click":
        return rng.standard_normal(length) * np.exp(-t / 0.0008)
    if spec.source == "noise":
        return rng.standard_normal(length) * np.exp(-t / spec.decay) * np.clip(t / 0.002, 0, 1)
    if spec.source == "drum":
        freq = 50.0 + 110.0 * np.exp(-t / 0.03)
        return np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / (1.5 * spec.decay + 0.03)) \
            * np.clip(t / 0.001, 0, 1)
    freq = note_hz(spec.note)  # beep
    env = np.clip(t / 0.005, 0, 1) * np.clip((0.1 - t) / 0.02, 0, 1)
    return _oscillator(2 * np.pi * freq * t, np.full(length, freq), spec.waveform, sr) * env


# ---------------------------------------------------------------------------------------------------- Captions

# Slot fillers. Every filler must be words the train templates use somewhere (held-out captions never bring a new
# word). Lists give variants; `_slots` picks one per caption.
_WAVE = {"sine": ["sine"], "square": ["square"], "saw": ["saw", "sawtooth"]}
_REGISTER = {"low": ["low", "deep"], "mid": ["mid"], "high": ["high"]}
_ENV_ADJ = {"steady": ["steady", "constant", "sustained"], "decay": ["decaying", "short decaying"],
            "swell": ["swelling"], "fade_out": ["fading"]}
_ENV_POST = {"steady": ["held steady", "at a constant level", "steady"],
             "decay": ["that decays quickly", "decaying quickly"],
             "swell": ["growing louder", "fading in", "swelling up"],
             "fade_out": ["fading out", "getting quieter", "slowly fading out"]}
_NOISE_ENV_POST = dict(_ENV_POST, decay=["in a short burst", "as a short burst"])
_DIR_ADJ = {"up": ["rising", "ascending"], "down": ["falling", "descending"]}
_DIR_POST = {"up": ["going up", "rising from low to high", "sweeping up"],
             "down": ["going down", "falling from high to low", "sweeping down"]}
_REPEAT = {1: [""], 2: ["twice", "repeated twice"], 3: ["three times", "repeated three times"]}
_SPEED_ADJ = {"slow": ["slow", "slowly wailing"], "fast": ["fast", "quickly wailing"]}
_TEMPO_ADV = {60: "slowly", 80: "slowly", 140: "quickly", 160: "quickly", 180: "quickly"}
_COLOR_EXTRA = {"white": ["white noise", "white noise hiss"], "pink": ["pink noise"],
                "brown": ["brown noise", "low rumbling brown noise"]}
_SOURCE_PLURAL = {"click": ["clicks", "ticks"], "drum": ["drum hits", "kick drum hits"],
                  "noise": ["noise bursts", "short bursts of noise"], "beep": ["{wave} beeps at {note}"]}
_SOURCE_SINGULAR = {"click": ["click"], "drum": ["kick drum"], "noise": ["noise burst"],
                    "beep": ["{wave} beep at {note}"]}

# (train templates, held-out templates) per kind: indexed by the split's position in `SPLITS`.
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tone": ((
        "a {wave} tone at {note}, {env_post}",
        "{env_adj} {wave} wave at {note}",
        "a {reg} {wave} tone at {note} {env_post}",
        "{note} {wave} tone, {env_adj}",
        "a {env_adj} {wave} beep at {note}",
        "pitch {note}, {wave} wave, {env_adj}",
        "a {wave} synth note at {note} {env_post}",
        "{env_adj} {reg} {wave} tone, note {note}",
        "a single {reg} {wave} note pitched at {note}, {env_post}",
    ), (
        "a {reg} {env_adj} {wave} note at {note}",
        "{wave} wave, pitch {note}, {env_post}",
        "note {note}, a {env_adj} {wave} tone",
    )),
    "sweep": ((
        "a {dir_adj} {wave} sweep {repeat}",
        "a {wave} tone {dir_post} {repeat}",
        "{wave} sweep {dir_post}, {repeat}",
        "a {reg} {wave} tone {dir_post}",
        "{dir_adj} {wave} wave sweep {repeat}",
        "a {wave} synth sweep {dir_post}",
    ), (
        "a {dir_adj} sweep, {wave} wave, {repeat}",
        "{dir_post}: a {reg} {wave} sweep",
    )),
    "siren": ((
        "a {speed_adj} {wave} siren",
        "a {reg} siren, {speed_adj}",
        "{speed_adj} siren with a {wave} tone",
        "a {wave} siren around {note}, {speed_adj}",
        "a {speed_adj} {reg} siren",
    ), (
        "a {reg} {wave} siren, {speed_adj}",
        "{wave} tone siren, {speed_adj}, around {note}",
    )),
    "noise": ((
        "{color_phrase}, {env_post}",
        "{env_adj} {color} noise",
        "{color} noise {env_post}",
        "{env_adj} {color_phrase}",
        "{color_phrase} {env_post}",
        "some {env_adj} {color} noise",
    ), (
        "{color} noise, {env_adj}",
        "{env_post}: {color_phrase}",
    )),
    "beat": ((
        "{plural} at {tempo} bpm",
        "a {singular} repeating at {tempo} bpm",
        "{tempo} bpm {plural}",
        "{plural} repeating {tempo_adv} at {tempo} bpm",
        "a beat of {plural} at {tempo} beats per minute",
        "steady {plural}, {tempo} bpm",
    ), (
        "{plural}, {tempo} beats per minute",
        "a {singular} at {tempo} bpm, repeating {tempo_adv}",
    )),
    "sequence": ((
        "{first}, then {second}",
        "{first} followed by {second}",
        "first {first}, then {second}",
    ), (
        "{first} then {second}",
        "first {first}, followed by {second}",
    )),
    "mix": ((
        "{fg} with {bg} in the background",
        "{fg} over {bg}",
        "{bg} under {fg}",
    ), (
        "{bg} with {fg}",
        "{fg} with {bg}",
    )),
}


def caption(spec: SoundSpec, rng: np.random.Generator, split: str = "train") -> str:
    """A caption for `spec` from the `split`'s templates; the controlled parameters are always named."""
    templates = TEMPLATES[spec.kind][_split_id(split)]
    if spec.kind == "sequence":
        first, *rest = [_phrase(part, rng) for part in spec.parts]
        template = _choice(rng, templates)
        if len(rest) == 2:  # three parts: the first two joined by ", then"
            first, rest = f"{first}, then {rest[0]}", rest[1:]
        return _tidy(template.format(first=first, second=rest[0]))
    if spec.kind == "mix":
        fg, bg = (_phrase(part, rng) for part in spec.parts)
        return _tidy(_choice(rng, templates).format(fg=fg, bg=bg))
    return _tidy(_choice(rng, templates).format(**_slots(spec, rng)))


def _phrase(spec: SoundSpec, rng: np.random.Generator) -> str:
    """A short noun phrase for a part of a sequence or mix."""
    slots = _slots(spec, rng)
    options = {
        "tone": ["a {wave} tone at {note}", "a {reg} {wave} beep at {note}", "a {env_adj} {wave} tone at {note}"],
        "sweep": ["a {dir_adj} {wave} sweep", "a {wave} tone {dir_post}"],
        "siren": ["a {speed_adj} siren", "a {speed_adj} {wave} siren"],
        "noise": ["{color} noise", "{env_adj} {color} noise"] if spec.envelope != "decay"
        else ["a burst of {color} noise"],
        "beat": ["{plural} at {tempo} bpm"],
    }[spec.kind]
    return _tidy(_choice(rng, options).format(**slots))


def _slots(spec: SoundSpec, rng: np.random.Generator) -> dict[str, str]:
    slots: dict[str, str] = {}
    if spec.note:
        slots["note"] = spec.note
        slots["reg"] = _choice(rng, _REGISTER[register(spec.note)])
    if spec.waveform:
        slots["wave"] = _choice(rng, _WAVE[spec.waveform])
    if spec.kind in ("tone", "noise"):
        slots["env_adj"] = _choice(rng, _ENV_ADJ[spec.envelope])
        slots["env_post"] = _choice(rng, (_NOISE_ENV_POST if spec.kind == "noise" else _ENV_POST)[spec.envelope])
    if spec.kind == "sweep":
        slots["dir_adj"] = _choice(rng, _DIR_ADJ[spec.direction])
        slots["dir_post"] = _choice(rng, _DIR_POST[spec.direction])
        slots["repeat"] = _choice(rng, _REPEAT[spec.repeat])
    if spec.kind == "siren":
        slots["speed_adj"] = _choice(rng, _SPEED_ADJ[spec.speed])
    if spec.kind == "noise":
        slots["color"] = spec.color
        slots["color_phrase"] = _choice(rng, _COLOR_EXTRA[spec.color])
        if spec.envelope == "decay":  # a decaying noise is a burst, whatever the template says
            slots["env_adj"] = "short burst of"
    if spec.kind == "beat":
        inner = {"wave": slots.get("wave", ""), "note": slots.get("note", "")}
        slots["plural"] = _choice(rng, _SOURCE_PLURAL[spec.source]).format(**inner)
        slots["singular"] = _choice(rng, _SOURCE_SINGULAR[spec.source]).format(**inner)
        slots["tempo"] = str(spec.tempo)
        slots["tempo_adv"] = _TEMPO_ADV.get(spec.tempo, "")
    return slots


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,:])", r"\1", text)
    text = re.sub(r",(\s*,)+", ",", text)
    text = re.sub(r"[,:]\s*$", "", text)
    text = re.sub(r"\ba (?=[aeiou][a-z])", "an ", text)  # "an ascending", but "a a4" stays
    return text.replace("some short burst of", "a short burst of")


# ---------------------------------------------------------------------------------------------------- Corpus


@dataclass(frozen=True)
class CorpusItem:
    spec: SoundSpec
    caption: str
    audio: np.ndarray = field(repr=False)  # float32 [samples]


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def item_spec(index: int, seed: int, split: str = "train", *, duration: float = DEFAULT_DURATION,
              kind: str | None = None) -> tuple[SoundSpec, str]:
    """The spec and caption of item `index` of the corpus (seed, split): independent of the corpus size."""
    spec = sample_spec(np.random.default_rng([seed, _split_id(split), index, 0]), split, kind=kind,
                       duration=duration)
    text = caption(spec, np.random.default_rng([seed, _split_id(split), index, 1]), split)
    return spec, text


def iter_corpus(n: int, seed: int, split: str = "train", *, duration: float = DEFAULT_DURATION,
                sample_rate: int = SAMPLE_RATE, kind: str | None = None) -> Iterator[CorpusItem]:
    """`n` (spec, caption, audio) items; deterministic given (seed, split, duration, sample_rate, kind)."""
    for index in range(n):
        spec, text = item_spec(index, seed, split, duration=duration, kind=kind)
        yield CorpusItem(spec, text, render(spec, sample_rate))


def write_corpus(directory: str | os.PathLike[str], n: int, seed: int, split: str = "train", *,
                 duration: float = DEFAULT_DURATION, sample_rate: int = SAMPLE_RATE, format: str = "wav") -> Path:
    """Write `n` clips under `directory/<split>/` and the manifest `directory/<split>.jsonl`; returns its path.

    Manifest rows (what `audiogen encode` reads; `path` is relative to the manifest's directory): `id`, `path`,
    `caption`, `duration`, `split`, and `spec` (the `SoundSpec` as a JSON string). Audio is 16-bit PCM.
    """
    from audiogen.io import atomic_write_local, write_audio

    directory = Path(directory)
    (directory / split).mkdir(parents=True, exist_ok=True)
    manifest = directory / f"{split}.jsonl"
    rows = []
    for index, item in enumerate(iter_corpus(n, seed, split, duration=duration, sample_rate=sample_rate)):
        name = f"{split}/{split}-{seed}-{index:06d}.{format}"
        write_audio(directory / name, item.audio[None], sample_rate, format=format)
        rows.append({"id": f"synth-{split}-{seed}-{index:06d}", "path": name, "caption": item.caption,
                     "duration": item.audio.shape[-1] / sample_rate, "split": split, "spec": item.spec.to_json()})
    atomic_write_local(str(manifest), "".join(json.dumps(row) + "\n" for row in rows).encode())
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a manifest written by `write_corpus`, with `spec` parsed back into a `SoundSpec`."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for row in rows:
        row["spec"] = SoundSpec.from_dict(json.loads(row["spec"]))
    return rows


def vocabulary(split: str = "train", n: int = 2000, seed: int = 0) -> set[str]:
    """Words (lower-case, punctuation split off) of the captions of the first `n` items of a split."""
    return {word for index in range(n) for word in caption_words(item_spec(index, seed, split)[1])}


def caption_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the procedural sound corpus (wav files + JSONL manifest).")
    parser.add_argument("directory")
    parser.add_argument("--n", type=int, required=True, help="number of clips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION)
    parser.add_argument("--format", default="wav", choices=("wav", "flac"))
    args = parser.parse_args(argv)
    print(write_corpus(args.directory, args.n, args.seed, args.split, duration=args.duration, format=args.format))


if __name__ == "__main__":
    main()

"""Does a clip deliver what its synth caption promises? One objective check per measurable kind of sound: tones,
sweeps, beats and noise (`CHECKS`, `RULES`). Sirens, sequences and mixes have no single property to check and are
not measured.

Shared by the demo recipe's evaluation (`jobs/demo_model.py`) and the quality tests of the shipped model, so the
rates in the model card and the thresholds in the tests come from the same rules.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from audiogen.eval import audio_metrics as metrics

PITCH_TOLERANCE_SEMITONES = 1.0
TEMPO_TOLERANCE = 0.05
CHECKS = {"tone": "pitch", "sweep": "sweep_direction", "beat": "tempo", "noise": "noise_colour"}
RULES = {"pitch": f"dominant pitch within {PITCH_TOLERANCE_SEMITONES:g} semitone of the captioned note",
         "sweep_direction": "pitch moves in the captioned direction",
         "tempo": f"beat tempo within {TEMPO_TOLERANCE * 100:g} % of the captioned bpm",
         "noise_colour": "spectral slope nearest the captioned colour (0 / -3 / -6 dB per octave)"}
SILENCE = 1e-3  # peak below which a clip counts as silent


def target(spec: Any) -> Any:
    """What the caption of a measured kind promises: a note's frequency, a direction, a tempo or a colour."""
    return {"tone": spec.frequency, "sweep": spec.direction, "beat": spec.tempo, "noise": spec.color}[spec.kind]


def check(spec: Any, audio: np.ndarray, sample_rate: int) -> dict[str, Any]:
    """Measure the property `CHECKS[spec.kind]` on mono `audio`: the value found and whether it passes. Silence
    never passes (its flat spectrum would otherwise count as white noise)."""
    if spec.kind not in CHECKS:
        raise ValueError(f"kind {spec.kind!r} has no check; measurable kinds: {', '.join(CHECKS)}")
    if float(np.max(np.abs(audio))) < SILENCE:
        return {"value": "silent", "ok": False}
    if spec.kind == "tone":
        pitch = metrics.dominant_pitch(audio, sample_rate)
        error = pitch.error_semitones(spec.frequency)
        return {"value": pitch.hz, "error_semitones": error, "ok": bool(abs(error) <= PITCH_TOLERANCE_SEMITONES)}
    if spec.kind == "sweep":
        sweep = metrics.sweep_direction(audio, sample_rate)
        return {"value": sweep.direction, "slope": sweep.slope, "ok": sweep.direction == spec.direction}
    if spec.kind == "beat":
        tempo = metrics.beat_tempo(audio, sample_rate)
        error = tempo.error(spec.tempo)
        return {"value": tempo.bpm, "relative_error": error, "ok": bool(error <= TEMPO_TOLERANCE)}
    colour = metrics.noise_colour(audio, sample_rate)
    return {"value": colour.colour, "slope": colour.slope, "ok": colour.colour == spec.color}

"""Objective audio measurements for quality tests: pitch, sweep direction, tempo, noise colour, SI-SNR.

NumPy, mono float audio `[samples]` (a `[1, samples]` array or a torch tensor is accepted too). Each measure
returns a small dataclass with the value and a confidence, so a test can assert on both and print a useful
message when it fails.

- `pitch_track` / `dominant_pitch`: YIN (de Cheveigne & Kawahara 2002: cumulative-mean-normalised difference
  function, absolute threshold, parabolic interpolation) on 64 ms windows every 16 ms. The dominant pitch is the
  median (in log frequency) over periodic frames within `loud_db` of the loudest frame, i.e. the sustained part,
  so attacks, tails and silence do not vote. YIN's first-dip rule makes it robust to the octave errors that plain
  autocorrelation makes on square and sawtooth waves. Clean tones: error < 0.01 semitone.
- `sweep_direction`: the sign of the median frame-to-frame pitch change of the pitch track (jumps larger than two
  semitones per frame, such as the restart of a repeated sweep or a tracker octave error, are ignored), with the
  fraction of steps that agree as confidence.
- `beat_tempo`: spectral-flux onset envelope (4 ms hop, 40 dB range, local mean removed) -> autocorrelation over
  the 40-240 bpm lag range. The shortest lag whose peak is at least `octave_ratio` of the strongest is taken (the
  fundamental period, not a multiple of it: a biased autocorrelation of a clean pulse train peaks at every
  multiple, highest at the first).
  The period is then refined from the peaks at its multiples (k * period, the largest k that still stands out),
  which makes clean pulse trains exact to ~0.1 %. Half and double tempo are reported as `candidates` with their
  autocorrelation strengths.
- `spectral_slope` / `noise_colour`: Welch power spectrum averaged into third-octave bands between 100 Hz and
  5 kHz, least-squares line of band level (dB) against log2 frequency -> dB per octave. White ~0, pink ~-3, brown
  ~-6 dB/octave; the class is the nearest of the three.
- `si_snr_db` (torch, batched, differentiable) / `si_snr` (one clip, float64): the standard scale-invariant SNR
  (Le Roux et al. 2019): both signals mean-removed, target = the estimate's projection onto the reference, dB of
  |target|^2 / |estimate - target|^2; blind to gain and DC, not to phase. The project's one definition: the
  codec's training loss and log, its held-out evaluation and the model card all use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

NOTE_OFFSETS = {"c": 0, "d": 2, "e": 4, "f": 5, "g": 7, "a": 9, "b": 11}
COLOUR_SLOPES = {"white": 0.0, "pink": -3.0103, "brown": -6.0206}


# ---------------------------------------------------------------------------------------------------- Helpers


def as_mono(audio: Any) -> np.ndarray:
    """float64 `[samples]` from a `[samples]` or `[1, samples]` array/tensor (several channels are averaged)."""
    if hasattr(audio, "detach"):
        audio = audio.detach().cpu().numpy()
    array = np.asarray(audio, dtype=np.float64)
    while array.ndim > 1:
        array = array.mean(axis=0) if array.shape[0] > 1 else array[0]
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"expected mono audio [samples], got shape {np.shape(audio)}")
    return array


def note_hz(note: str) -> float:
    """"a4" -> 440.0; "c#3" / "db3" accepted (equal temperament)."""
    name = note.strip().lower()
    accidental = {"#": 1, "b": -1}.get(name[1], 0) if len(name) > 2 else 0  # "b3" is the note b, not a flat
    midi = 12 * (int(name[1 + abs(accidental):]) + 1) + NOTE_OFFSETS[name[0]] + accidental
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def semitones(hz: float, reference_hz: float) -> float:
    """Signed distance in semitones from `reference_hz` to `hz` (nan when either is not positive)."""
    if not (hz > 0 and reference_hz > 0):
        return float("nan")
    return 12.0 * math.log2(hz / reference_hz)


def _frames(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    """[frames, length] views of x (zero-padded at the end so the last samples get a frame)."""
    count = 1 + max(0, -(-(x.size - length) // hop))
    x = np.pad(x, (0, (count - 1) * hop + length - x.size))
    return np.lib.stride_tricks.sliding_window_view(x, length)[::hop]


def _parabolic(values: np.ndarray, index: int) -> tuple[float, float]:
    """Vertex (position, value) of the parabola through values[index-1:index+2]."""
    if index <= 0 or index >= len(values) - 1:
        return float(index), float(values[index])
    a, b, c = values[index - 1], values[index], values[index + 1]
    denominator = a - 2 * b + c
    if denominator == 0:
        return float(index), float(b)
    shift = float(np.clip(0.5 * (a - c) / denominator, -1.0, 1.0))
    return index + shift, float(b - 0.25 * (a - c) * shift)


# ---------------------------------------------------------------------------------------------------- Pitch


@dataclass(frozen=True)
class PitchTrack:
    times: np.ndarray  # frame centres (s)
    f0: np.ndarray  # Hz, nan where the frame is not periodic
    aperiodicity: np.ndarray  # YIN's normalised difference at the chosen lag (0 = perfectly periodic)
    level_db: np.ndarray  # frame RMS in dB relative to the loudest frame


def pitch_track(audio: Any, sample_rate: int, *, fmin: float = 60.0, fmax: float = 2000.0,
                window: float = 0.064, hop: float = 0.016, threshold: float = 0.15,
                max_aperiodicity: float = 0.35, silence_db: float = -45.0) -> PitchTrack:
    """YIN pitch per frame; frames quieter than `silence_db` below the loudest, or whose best dip is above
    `max_aperiodicity`, are unvoiced (nan)."""
    tau_min = max(2, int(sample_rate / fmax))
    tau_max = int(math.ceil(sample_rate / fmin))
    width = int(round(window * sample_rate))
    step = max(1, int(round(hop * sample_rate)))
    frames = _frames(as_mono(audio), width + tau_max + 1, step)
    count = frames.shape[0]
    # d(tau) = sum_{j<W} (x_j - x_{j+tau})^2 = E0 + E_tau - 2 r(tau), r via FFT.
    head = frames[:, :width]
    size = 1 << int(math.ceil(math.log2(frames.shape[1] + width)))
    spectrum = np.fft.rfft(frames, size) * np.conj(np.fft.rfft(head, size))
    r = np.fft.irfft(spectrum, size)[:, : tau_max + 1]
    squares = np.concatenate([np.zeros((count, 1)), np.cumsum(frames ** 2, axis=1)], axis=1)
    energy0 = squares[:, width]
    taus = np.arange(tau_max + 1)
    energy_tau = squares[:, taus + width] - squares[:, taus]
    d = np.maximum(energy0[:, None] + energy_tau - 2 * r, 0.0)
    cumulative = np.cumsum(d[:, 1:], axis=1)
    cmnd = np.ones_like(d)
    cmnd[:, 1:] = d[:, 1:] * taus[1:] / np.maximum(cumulative, 1e-12)
    rms = np.sqrt(energy0 / width)
    level_db = 20 * np.log10(np.maximum(rms, 1e-12) / max(float(rms.max()), 1e-12))
    f0 = np.full(count, np.nan)
    aperiodicity = np.ones(count)
    for i in range(count):
        if level_db[i] < silence_db or rms[i] < 1e-5:  # quiet, or digital silence (below -100 dBFS)
            continue
        curve = cmnd[i]
        below = np.nonzero(curve[tau_min:tau_max] < threshold)[0]
        if below.size:
            tau = tau_min + int(below[0])
            while tau + 1 < tau_max and curve[tau + 1] < curve[tau]:
                tau += 1
        else:
            tau = tau_min + int(np.argmin(curve[tau_min:tau_max]))
        aperiodicity[i] = curve[tau]
        if curve[tau] > max_aperiodicity:
            continue
        position, _ = _parabolic(d[i], tau)  # interpolate the raw difference: unbiased for clean periods
        f0[i] = sample_rate / position if position > 0 else np.nan
    times = (np.arange(count) * step + (width + tau_max) / 2) / sample_rate
    return PitchTrack(times, f0, aperiodicity, level_db)


@dataclass(frozen=True)
class PitchEstimate:
    hz: float  # nan when no sustained periodic part was found
    voiced_fraction: float  # periodic frames among the loud ones
    aperiodicity: float  # median YIN dip of the frames that voted (0 clean, ~0.3 noisy)
    frames: int  # frames that voted

    def error_semitones(self, target_hz: float) -> float:
        return semitones(self.hz, target_hz)


def dominant_pitch(audio: Any, sample_rate: int, *, loud_db: float = 20.0, **track_options: Any) -> PitchEstimate:
    """The pitch of the sustained part: median over periodic frames within `loud_db` dB of the loudest."""
    track = pitch_track(audio, sample_rate, **track_options)
    loud = track.level_db >= -loud_db
    voting = loud & np.isfinite(track.f0)  # voiced
    if not voting.any():
        return PitchEstimate(float("nan"), 0.0, 1.0, 0)
    hz = float(2.0 ** np.median(np.log2(track.f0[voting])))
    return PitchEstimate(hz, float(voting.sum() / max(1, loud.sum())),
                         float(np.median(track.aperiodicity[voting])), int(voting.sum()))


@dataclass(frozen=True)
class SweepEstimate:
    direction: str  # "up", "down" or "flat" (also when no pitch could be tracked)
    slope: float  # median pitch change, semitones per second
    confidence: float  # fraction of frame-to-frame steps with the reported sign (0 when flat/untracked)
    steps: int  # pitch steps that voted


def sweep_direction(audio: Any, sample_rate: int, *, min_slope: float = 1.0, max_step: float = 2.0,
                    **track_options: Any) -> SweepEstimate:
    """Direction of the pitch movement: sign of the median step of the pitch track (semitones per second);
    |slope| < `min_slope` is "flat". Steps over `max_step` semitones (restarts, octave slips) are ignored."""
    track = pitch_track(audio, sample_rate, **track_options)
    hop = float(track.times[1] - track.times[0]) if len(track.times) > 1 else 1.0
    steps = np.diff(12 * np.log2(track.f0))
    steps = steps[np.isfinite(steps) & (np.abs(steps) <= max_step)]
    if steps.size < 3:
        return SweepEstimate("flat", 0.0, 0.0, int(steps.size))
    slope = float(np.median(steps)) / hop
    if abs(slope) < min_slope:
        return SweepEstimate("flat", slope, 0.0, int(steps.size))
    agree = float(np.mean(np.sign(steps) == np.sign(slope)))
    return SweepEstimate("up" if slope > 0 else "down", slope, agree, int(steps.size))


# ---------------------------------------------------------------------------------------------------- Tempo


def onset_envelope(audio: Any, sample_rate: int, *, n_fft: int = 512, hop: int = 64,
                   compression: float = 100.0, local_mean: float = 0.1) -> np.ndarray:
    """Onset strength per hop (frame i centred at i * hop): spectral flux of log(1 + compression * |X| / max|X|)
    (a 40 dB range, so a noise floor's random fluctuations weigh little), minus its mean over +-`local_mean`
    seconds and half-wave rectified (steady noise adds a constant flux, which this removes). The first and last
    `n_fft` samples are zeroed: the clip's own edges (a sound cut off by the end of the clip is a broadband step)
    are not onsets of the audio."""
    frames = _frames(np.pad(as_mono(audio), (n_fft // 2, n_fft // 2)), n_fft, hop) * np.hanning(n_fft)
    magnitude = np.abs(np.fft.rfft(frames, axis=1))
    log_mag = np.log1p(compression * magnitude / max(float(magnitude.max()), 1e-12))
    flux = np.concatenate([[0.0], np.maximum(np.diff(log_mag, axis=0), 0.0).sum(axis=1)])
    reach = max(1, int(local_mean * sample_rate / hop))
    flux = np.maximum(flux - np.convolve(flux, np.ones(2 * reach + 1) / (2 * reach + 1), mode="same"), 0.0)
    edge = n_fft // hop
    flux[:edge] = 0.0
    flux[-edge:] = 0.0
    return flux


@dataclass(frozen=True)
class TempoEstimate:
    bpm: float  # nan when nothing periodic was found
    confidence: float  # normalised autocorrelation at the chosen period (0..1; clean pulses ~0.5-1)
    periods: int  # autocorrelation peaks (multiples of the period) the estimate was refined with
    candidates: dict[float, float] = field(default_factory=dict)  # bpm -> autocorrelation (half/double tempo)

    def error(self, target_bpm: float) -> float:
        """Relative error |bpm / target - 1|."""
        return abs(self.bpm / target_bpm - 1.0)


def beat_tempo(audio: Any, sample_rate: int, *, bpm_range: tuple[float, float] = (40.0, 240.0),
               octave_ratio: float = 0.6, hop: int = 64) -> TempoEstimate:
    """Tempo of a periodic train of events (clicks, beeps, drum hits, noise bursts) in beats per minute."""
    flux = onset_envelope(audio, sample_rate, hop=hop)
    frame_rate = sample_rate / hop
    centred = flux - flux.mean()
    size = 1 << int(math.ceil(math.log2(2 * centred.size)))
    spectrum = np.fft.rfft(centred, size)
    ac = np.fft.irfft(spectrum * np.conj(spectrum), size)[: centred.size]
    if ac[0] <= 0:
        return TempoEstimate(float("nan"), 0.0, 0)
    ac = ac / ac[0]
    low_lag = max(2, int(math.floor(60 * frame_rate / bpm_range[1])))
    high_lag = min(len(ac) - 2, int(math.ceil(60 * frame_rate / bpm_range[0])))
    window = ac[low_lag:high_lag + 1]
    peaks = [low_lag + i for i in range(1, len(window) - 1)
             if window[i] >= window[i - 1] and window[i] > window[i + 1] and window[i] > 0]
    if not peaks:
        return TempoEstimate(float("nan"), 0.0, 0)
    strongest = max(ac[p] for p in peaks)
    lag = min(p for p in peaks if ac[p] >= octave_ratio * strongest)  # the fundamental period, not a multiple
    position, value = _parabolic(ac, lag)
    period = position / frame_rate
    candidates = {round(60 / period * factor, 2): float(ac[index - 1:index + 2].max()) for factor in (0.5, 1.0, 2.0)
                  if 1 <= (index := int(round(position / factor))) < len(ac) - 1}
    period, used = _refine_period(ac, position, frame_rate)
    return TempoEstimate(60.0 / period, float(max(0.0, min(1.0, value))), used, candidates)


def _refine_period(ac: np.ndarray, lag: float, frame_rate: float, min_ratio: float = 0.3) -> tuple[float, int]:
    """Period from the autocorrelation peak at the largest multiple k * lag that still stands out: position / k.

    The interpolation error of one peak is a fraction of a frame whatever k is, so dividing by k shrinks it; a
    4 s clip at 120 bpm resolves its period to ~0.05 %.
    """
    reference = ac[int(round(lag))]
    best, multiples = lag, 1
    k = 2
    while (k + 0.5) * lag < len(ac) - 1:
        guess = k * best / multiples  # follow the refined period so the search window stays on the peak
        reach = max(2.0, 0.03 * lag)
        low, high = int(math.floor(guess - reach)), min(int(math.ceil(guess + reach)), len(ac) - 2)
        index = low + int(np.argmax(ac[low:high + 1]))
        if not (low < index < high) or ac[index] < min_ratio * reference or k * lag > 0.75 * len(ac):
            break
        best, multiples = _parabolic(ac, index)[0], k
        k += 1
    return best / multiples / frame_rate, multiples


# ---------------------------------------------------------------------------------------------------- Noise colour


@dataclass(frozen=True)
class ColourEstimate:
    colour: str  # nearest of white / pink / brown
    slope: float  # dB per octave
    distance: float  # |slope - the colour's ideal slope| (dB/octave)
    residual: float  # RMS deviation of the band levels from the fitted line (dB): small for coloured noise


def spectral_slope(audio: Any, sample_rate: int, *, fmin: float = 100.0, fmax: float = 5000.0,
                   bands_per_octave: int = 3) -> tuple[float, float]:
    """(slope in dB per octave, RMS residual in dB) of the power spectrum in fractional-octave bands."""
    # Welch power spectrum: 2048-sample Hann windows, 50 % overlap
    power = (np.abs(np.fft.rfft(_frames(as_mono(audio), 2048, 1024) * np.hanning(2048), axis=1)) ** 2).mean(axis=0)
    freqs = np.fft.rfftfreq(2048, 1 / sample_rate)
    fmax = min(fmax, sample_rate / 2 * 0.95)
    edges = fmin * 2.0 ** (np.arange(int(math.floor(bands_per_octave * math.log2(fmax / fmin))) + 1)
                           / bands_per_octave)
    centres, levels = [], []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (freqs >= low) & (freqs < high)
        if inside.any():
            centres.append(math.log2(math.sqrt(low * high)))
            levels.append(10 * math.log10(max(float(power[inside].mean()), 1e-30)))
    if len(centres) < 3:
        raise ValueError("too few frequency bands for a slope; widen [fmin, fmax]")
    slope, intercept = np.polyfit(centres, levels, 1)
    residual = float(np.sqrt(np.mean((np.asarray(levels) - (intercept + slope * np.asarray(centres))) ** 2)))
    return float(slope), residual


def noise_colour(audio: Any, sample_rate: int, **options: Any) -> ColourEstimate:
    slope, residual = spectral_slope(audio, sample_rate, **options)
    colour = min(COLOUR_SLOPES, key=lambda name: abs(COLOUR_SLOPES[name] - slope))
    return ColourEstimate(colour, slope, abs(COLOUR_SLOPES[colour] - slope), residual)


# ---------------------------------------------------------------------------------------------------- Reconstruction


def si_snr_db(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SI-SNR (dB) of each row of `estimate` [..., N] against `reference` [..., N] (see the module docstring);
    `eps` keeps silent rows finite (their value means nothing: skip them)."""
    estimate = estimate - estimate.mean(-1, keepdim=True)
    reference = reference - reference.mean(-1, keepdim=True)
    scale = (estimate * reference).sum(-1, keepdim=True) / (reference.square().sum(-1, keepdim=True) + eps)
    target = scale * reference
    return 10 * torch.log10((target.square().sum(-1) + eps) / ((estimate - target).square().sum(-1) + eps))


def si_snr(estimate: Any, reference: Any, eps: float = 1e-12) -> float:
    """`si_snr_db` (dB) of one clip against its reference (mono, trimmed to the shorter), in float64."""
    est, ref = as_mono(estimate), as_mono(reference)
    n = min(est.size, ref.size)
    return float(si_snr_db(torch.as_tensor(est[:n]), torch.as_tensor(ref[:n]), eps))

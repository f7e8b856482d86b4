"""Model configuration: sizes, audio rates, window, sampling defaults, and their validation.

One dataclass describes every model this engine runs (AudioGen, MusicGen mono/stereo, our own trained ones), so
that checkpoint loaders only have to translate their own format into it. It is frozen: a running engine relies
on the sizes never changing under it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from audiogen.errors import InvalidConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for unit tests on one CPU core; the random codec and T5 built by `audiogen.scratch` match it.
    "tiny": dict(
        dim=64,
        num_layers=2,
        num_heads=4,
        ffn_dim=128,
        card=64,
        text_dim=32,
        max_text_tokens=32,
        text_encoder="tiny-t5",
        window_duration=2.0,
        max_duration=6.0,
        extend_stride=1.0,
        top_k=16,
    ),
    # AudioGen/MusicGen sizes (audiocraft's model_scale/{small,medium,large}.yaml).
    "small": dict(dim=1024, num_layers=24, num_heads=16, ffn_dim=4096),
    "medium": dict(dim=1536, num_layers=48, num_heads=24, ffn_dim=6144),
    "large": dict(dim=2048, num_layers=48, num_heads=32, ffn_dim=8192),
}


@dataclass(frozen=True)
class AudioGenConfig:
    """Everything needed to build the LM and to validate requests against it.

    Defaults are audiocraft's AudioGen (16 kHz, 50 Hz frames, 4 x 2048 codebooks, T5-large, 10 s window,
    2 s extension stride, top-k 250, guidance 3.0).
    """

    # Transformer LM
    dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    n_q: int = 4
    card: int = 2048
    audio_channels: int = 1
    delays: tuple[int, ...] | None = None
    norm_eps: float = 1e-5
    bias_attn: bool = False
    bias_ff: bool = False
    positional_max_period: float = 10_000.0
    # Text conditioner
    text_encoder: str = "t5-large"
    text_dim: int = 1024
    max_text_tokens: int = 128
    # Audio and time
    sample_rate: int = 16_000
    frame_rate: int = 50
    window_duration: float = 10.0
    max_duration: float = 30.0
    extend_stride: float = 2.0
    # Sampling defaults
    default_duration: float = 5.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0
    guidance_scale: float = 3.0
    # Bookkeeping
    name: str = "audiogen"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        delays = self.delays
        if delays is None:  # audiocraft's: codebook k is delayed k steps; stereo interleaves L/R codebooks per level
            delays = (k for k in range(self.n_q) for _ in range(self.audio_channels))
        object.__setattr__(self, "delays", tuple(int(d) for d in delays))
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_codebooks(self) -> int:
        """Codebook streams the LM models: n_q per channel, channels interleaved (MusicGen stereo)."""
        return self.n_q * self.audio_channels

    @property
    def special_token(self) -> int:
        """Id of the pattern's special (padding/start) token; embeddings have `card + 1` rows for it."""
        return self.card

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def window_frames(self) -> int:
        """Frames the LM sees at once; longer clips slide this window."""
        return int(self.window_duration * self.frame_rate)

    @property
    def max_frames(self) -> int:
        return int(self.max_duration * self.frame_rate)

    @property
    def stride_frames(self) -> int:
        return int(self.extend_stride * self.frame_rate)

    @property
    def max_steps(self) -> int:
        """Positions fed to the LM per window (start position + frames + delay tail - 1): the KV cache length."""
        return self.window_frames + self.max_delay

    @property
    def hop_length(self) -> int:
        return self.sample_rate // self.frame_rate

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise InvalidConfigError(name, f"{rule} (got {getattr(self, name)!r})")

        for name in ("dim", "num_layers", "num_heads", "ffn_dim", "n_q", "card", "text_dim", "max_text_tokens",
                     "sample_rate", "frame_rate"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(self.dim % self.num_heads == 0, "dim", f"must be divisible by num_heads={self.num_heads}")
        need(self.head_dim % 2 == 0, "num_heads", "dim / num_heads must be even")
        need(self.dim % 2 == 0, "dim", "must be even for sinusoidal positions")
        need(self.audio_channels in (1, 2), "audio_channels", "must be 1 (mono) or 2 (stereo)")
        need(len(self.delays) == self.num_codebooks, "delays", f"must have n_q * audio_channels = {self.num_codebooks} entries")
        need(all(d >= 0 for d in self.delays) and self.delays[0] == 0, "delays", "must be >= 0 and start at 0")
        need(self.sample_rate % self.frame_rate == 0, "frame_rate", f"must divide sample_rate={self.sample_rate}")
        for name in ("window_duration", "max_duration", "extend_stride", "default_duration"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name, "must be a positive number")
        need(self.max_duration >= self.window_duration or math.isclose(self.max_duration, self.window_duration),
             "max_duration", f"must be >= window_duration={self.window_duration}")
        need(self.extend_stride < self.window_duration, "extend_stride", f"must be < window_duration={self.window_duration}")
        need(self.stride_frames >= 1, "extend_stride", "must be at least one frame")
        need(self.default_duration <= self.max_duration, "default_duration", f"must be <= max_duration={self.max_duration}")
        need(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        need(isinstance(self.top_k, int) and 0 <= self.top_k <= self.card, "top_k", f"must be in [0, card={self.card}]")
        need(0.0 <= self.top_p <= 1.0, "top_p", "must be in [0, 1]")
        need(math.isfinite(self.guidance_scale) and self.guidance_scale >= 0, "guidance_scale", "must be >= 0")
        need(self.norm_eps > 0, "norm_eps", "must be > 0")

    # ------------------------------------------------------------------ construction and serialisation
    @classmethod
    def preset(cls, size: str, **overrides: Any) -> "AudioGenConfig":
        """A named size (`tiny`, `small`, `medium`, `large`) with any field overridden."""
        if size not in PRESETS:
            raise InvalidConfigError("preset", f"unknown size {size!r}; choose one of {sorted(PRESETS)}")
        values = {**PRESETS[size], **overrides}
        if "dim" in overrides and "ffn_dim" not in overrides:
            values["ffn_dim"] = 4 * values["dim"]
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AudioGenConfig":
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InvalidConfigError(unknown[0], f"unknown config field(s) {unknown}")
        return cls(**values)  # `__post_init__` turns a JSON list of delays into a tuple

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "delays": list(self.delays)}


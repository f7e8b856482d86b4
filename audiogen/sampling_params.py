"""`SamplingParams`: how one clip is sampled, declared and validated once for every entry point.

The Python API, engine requests, render manifest rows, the HTTP schema and the CLI all carry this one frozen
object, so a limit, a default or an error message cannot drift between them. Construction validates what needs
no model (types, finiteness, ranges) and raises `InvalidRequestError` naming the field and the limit;
`resolved(config)` adds what depends on the model (its defaults, top-k at most the codebook size) and draws a
seed when none was given, so the result records exactly what was used.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from audiogen.errors import InvalidRequestError
from audiogen.validation import check_integer, check_number, check_text

if TYPE_CHECKING:
    from audiogen.config import AudioGenConfig

MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 100.0
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """Sampling of one clip. `None` means "the default": the job's, else the model's (see `with_defaults`)."""

    negative_prompt: str | None = field(default=None, metadata={
        "help": "what to steer away from: replaces the null condition of classifier-free guidance"})
    seed: int | None = field(default=None, metadata={
        "help": f"0..{MAX_SEED}; the same seed and parameters reproduce a clip exactly (default: random)"})
    temperature: float | None = field(default=None, metadata={
        "help": f"0 <= temperature <= {MAX_TEMPERATURE:g} (0 = greedy)"})
    top_k: int | None = field(default=None, metadata={"help": "keep the k most likely tokens, 0..codebook size "
                                                              "(0 = no cut)"})
    top_p: float | None = field(default=None, metadata={
        "help": "nucleus sampling, 0 <= top_p <= 1 (0 = off; takes precedence over top_k, as in audiocraft)"})
    guidance_scale: float | None = field(default=None, metadata={
        "help": f"classifier-free guidance, 0..{MAX_GUIDANCE:g} (1 = conditional only)"})

    def __post_init__(self) -> None:
        checked = {
            "negative_prompt": check_text("negative_prompt", self.negative_prompt),
            "seed": check_integer("seed", self.seed, low=0, high=MAX_SEED),
            "temperature": check_number("temperature", self.temperature, low=0.0, high=MAX_TEMPERATURE,
                                   limit=f"0 <= temperature <= {MAX_TEMPERATURE:g} (0 = greedy)"),
            "top_k": check_integer("top_k", self.top_k, low=0, high=None, limit="0..codebook size (0 = no cut)"),
            "top_p": check_number("top_p", self.top_p, low=0.0, high=1.0, limit="0 <= top_p <= 1 (0 = off)"),
            "guidance_scale": check_number("guidance_scale", self.guidance_scale, low=0.0, high=MAX_GUIDANCE,
                                      limit=f"0 <= guidance_scale <= {MAX_GUIDANCE:g}"),
        }
        for name, value in checked.items():  # store the normalised values (numpy ints -> int, 3 -> 3.0 ...)
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "SamplingParams":
        """The sampling fields of a row, a JSON body or parsed flags (other keys are ignored; None = unset)."""
        return cls(**{name: values.get(name) for name in FIELDS})

    def with_defaults(self, defaults: "SamplingParams") -> "SamplingParams":
        """Fields left unset here take `defaults`' values (a job's defaults for its rows)."""
        return replace(self, **{name: getattr(defaults, name) for name in FIELDS if getattr(self, name) is None})

    def resolved(self, config: "AudioGenConfig") -> "SamplingParams":
        """Every field concrete: model defaults filled, top-k checked against the codebook, a seed drawn if
        none was given. This is what a clip was generated with (metadata rows, HTTP headers, replays)."""
        if self.top_k is not None and self.top_k > config.card:
            raise InvalidRequestError("top_k", f"{self.top_k} is out of range", limit=f"0..{config.card}",
                                      value=self.top_k)
        return self.with_defaults(SamplingParams(
            negative_prompt="", seed=secrets.randbits(63), temperature=config.temperature, top_k=config.top_k,
            top_p=config.top_p, guidance_scale=config.guidance_scale))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))

"""Generation requests: what a caller asks for, validated and resolved against the model's limits/defaults.

Validation happens when a request is submitted, on the caller's thread, so that bad input fails immediately
with an `InvalidRequestError` naming the field and the limit, and never reaches the decoding loop.
"""

from __future__ import annotations

import math
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from audiogen.config import AudioGenConfig
from audiogen.decoding import SlotSpec
from audiogen.errors import InvalidRequestError

MAX_SEED = 2**63 - 1


@dataclass
class GenerationRequest:
    """One clip to generate. `None` sampling fields take the model's defaults.

    - continuation: `prefix_codes [K, P]` are forced as the first P frames; `duration` is the total length.
    - inpainting: `inpaint_codes [K, T]` with `inpaint_mask [T]` (True = regenerate); frames outside the mask
      are forced (teacher forcing), frames inside are sampled; `duration` defaults to T frames.
    """

    prompt: str = ""
    negative_prompt: str | None = None
    duration: float | None = None
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float | None = None
    prefix_codes: torch.Tensor | None = None
    inpaint_codes: torch.Tensor | None = None
    inpaint_mask: torch.Tensor | None = None
    request_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request with every parameter concrete (what was actually used, for metadata/replay)."""

    request_id: str
    prompt: str
    negative_prompt: str
    total_frames: int
    seed: int
    temperature: float
    top_k: int
    top_p: float
    guidance_scale: float
    known_codes: torch.Tensor | None
    known_frames: torch.Tensor | None
    metadata: dict[str, Any]

    def slot_spec(self) -> SlotSpec:
        return SlotSpec(total_frames=self.total_frames, seed=self.seed, temperature=self.temperature,
                        top_k=self.top_k, top_p=self.top_p, guidance_scale=self.guidance_scale,
                        known_codes=self.known_codes, known_frames=self.known_frames)

    def params(self) -> dict[str, Any]:
        """The generation parameters, JSON-friendly (metadata rows, HTTP headers)."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
                "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "guidance_scale": self.guidance_scale, "frames": self.total_frames}


def _number(name: str, value: Any, *, low: float, high: float, low_open: bool = False, limit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidRequestError(name, f"must be a number, got {type(value).__name__}", limit=limit, value=value)
    value = float(value)
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        raise InvalidRequestError(name, f"{value!r} is out of range", limit=limit, value=value)
    return value


def _integer(name: str, value: Any, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidRequestError(name, f"must be an integer, got {value!r}", limit=f"{low}..{high}", value=value)
    if not low <= int(value) <= high:
        raise InvalidRequestError(name, f"{int(value)} is out of range", limit=f"{low}..{high}", value=int(value))
    return int(value)


def _text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequestError(name, f"must be a string, got {type(value).__name__}", value=value)
    if "\x00" in value:
        raise InvalidRequestError(name, "contains a NUL character", value=value[:80])
    return value


def _codes(name: str, value: Any, config: AudioGenConfig) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != config.num_codebooks:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InvalidRequestError(name, f"must be a tensor [codebooks={config.num_codebooks}, frames], got {shape}")
    if value.dtype.is_floating_point or value.dtype == torch.bool:
        raise InvalidRequestError(name, f"must hold integer codes, got {value.dtype}")
    if value.numel() and (int(value.min()) < 0 or int(value.max()) >= config.card):
        raise InvalidRequestError(name, "holds codes outside the codebook", limit=f"0..{config.card - 1}")
    return value.to(torch.long).cpu()


def resolve_request(request: GenerationRequest, config: AudioGenConfig) -> ResolvedRequest:
    """Validate every field and fill defaults from the config; raises `InvalidRequestError`."""
    max_duration = config.max_duration
    frame_rate = config.frame_rate
    prompt = _text("prompt", request.prompt)
    negative = _text("negative_prompt", request.negative_prompt)
    temperature = config.temperature if request.temperature is None else _number(
        "temperature", request.temperature, low=0.0, high=100.0, limit="0 <= temperature <= 100 (0 = greedy)")
    top_k = config.top_k if request.top_k is None else _integer("top_k", request.top_k, low=0, high=config.card)
    top_p = config.top_p if request.top_p is None else _number("top_p", request.top_p, low=0.0, high=1.0,
                                                                limit="0 <= top_p <= 1 (0 = off)")
    guidance = config.guidance_scale if request.guidance_scale is None else _number(
        "guidance_scale", request.guidance_scale, low=0.0, high=100.0, limit="0 <= guidance_scale <= 100")
    seed = secrets.randbits(63) if request.seed is None else _integer("seed", request.seed, low=0, high=MAX_SEED)

    known_codes = known_frames = None
    if request.prefix_codes is not None and request.inpaint_codes is not None:
        raise InvalidRequestError("prefix_codes", "cannot be combined with inpaint_codes")
    if request.inpaint_codes is not None:
        known_codes = _codes("inpaint_codes", request.inpaint_codes, config)
        frames = known_codes.shape[1]
        mask = request.inpaint_mask
        if not isinstance(mask, torch.Tensor) or mask.dim() != 1 or mask.shape[0] != frames:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InvalidRequestError("mask", f"must be a boolean vector of {frames} frames, got {shape}",
                                      limit=f"one entry per frame ({frames})")
        if not 0 < frames <= config.max_frames:
            raise InvalidRequestError("audio", f"is {frames / frame_rate:.2f} s long",
                                      limit=f"0 < duration <= {max_duration} s")
        known_frames = ~mask.to(torch.bool).cpu()
        total = frames
    else:
        default = config.default_duration
        duration = default if request.duration is None else _number(
            "duration", request.duration, low=0.0, high=max_duration, low_open=True,
            limit=f"0 < duration <= {max_duration} s")
        total = int(duration * frame_rate)
        if total < 1:
            raise InvalidRequestError("duration", f"{duration} s is shorter than one frame",
                                      limit=f"at least {1 / frame_rate} s")
        if request.prefix_codes is not None:
            prefix = _codes("prefix_codes", request.prefix_codes, config)
            if prefix.shape[1] >= total:
                raise InvalidRequestError("prefix_codes", f"prefix of {prefix.shape[1]} frames leaves nothing to "
                                          f"generate in {total} frames", limit=f"fewer than {total} frames")
            known_codes = torch.zeros((config.num_codebooks, total), dtype=torch.long)
            known_codes[:, :prefix.shape[1]] = prefix
            known_frames = torch.zeros(total, dtype=torch.bool)
            known_frames[:prefix.shape[1]] = True
    return ResolvedRequest(
        request_id=request.request_id or uuid.uuid4().hex, prompt=prompt, negative_prompt=negative,
        total_frames=total, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
        guidance_scale=guidance, known_codes=known_codes, known_frames=known_frames,
        metadata=dict(request.metadata))

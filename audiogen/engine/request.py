"""Generation requests: what a caller asks for, validated and resolved against the model's limits/defaults.

Validation happens when a request is submitted, on the caller's thread, so that bad input fails immediately
with an `InvalidRequestError` naming the field and the limit, and never reaches the decoding loop.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from audiogen.config import AudioGenConfig
from audiogen.errors import InvalidRequestError
from audiogen.sampling_params import SamplingParams
from audiogen.validation import check_number, check_text

@dataclass
class GenerationRequest:
    """One clip to generate: a prompt, a duration and its `SamplingParams` (unset fields take model defaults).

    - continuation: `prefix_codes [K, P]` are forced as the first P frames; `duration` is the total length.
    - inpainting: `inpaint_codes [K, T]` with `inpaint_mask [T]` (True = regenerate); frames outside the mask
      are forced (teacher forcing), frames inside are sampled; `duration` defaults to T frames.
    """

    prompt: str = ""
    duration: float | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prefix_codes: torch.Tensor | None = None
    inpaint_codes: torch.Tensor | None = None
    inpaint_mask: torch.Tensor | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request with every parameter concrete (what was actually used, for metadata/replay)."""

    request_id: str
    prompt: str
    total_frames: int
    sampling: SamplingParams  # resolved: every field set
    known_codes: torch.Tensor | None  # [K, total_frames] codes forced where `known_frames`
    known_frames: torch.Tensor | None  # [total_frames] bool


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
    prompt = check_text("prompt", request.prompt) or ""
    if not isinstance(request.sampling, SamplingParams):
        raise InvalidRequestError("sampling", f"must be SamplingParams, got {type(request.sampling).__name__}")
    sampling = request.sampling.resolved(config)

    known_codes = known_frames = None
    if request.prefix_codes is not None and request.inpaint_codes is not None:
        raise InvalidRequestError("prefix_codes", "cannot be combined with inpaint_codes")
    if request.inpaint_codes is not None:
        known_codes = _codes("inpaint_codes", request.inpaint_codes, config)
        total = known_codes.shape[1]
        mask = request.inpaint_mask
        if not isinstance(mask, torch.Tensor) or mask.dim() != 1 or mask.shape[0] != total:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InvalidRequestError("mask", f"must be a boolean vector of {total} frames, got {shape}",
                                      limit=f"one entry per frame ({total})")
        if not 0 < total <= config.max_frames:
            raise InvalidRequestError("audio", f"is {total / config.frame_rate:.2f} s long",
                                      limit=f"0 < duration <= {config.max_duration} s")
        known_frames = ~mask.to(torch.bool).cpu()
    else:
        duration = config.default_duration if request.duration is None else check_number(
            "duration", request.duration, low=0.0, high=config.max_duration, low_open=True,
            limit=f"0 < duration <= {config.max_duration} s")
        total = int(duration * config.frame_rate)
        if total < 1:
            raise InvalidRequestError("duration", f"{duration} s is shorter than one frame",
                                      limit=f"at least {1 / config.frame_rate} s")
        if request.prefix_codes is not None:
            prefix = _codes("prefix_codes", request.prefix_codes, config)
            if prefix.shape[1] >= total:
                raise InvalidRequestError("prefix_codes", f"prefix of {prefix.shape[1]} frames leaves nothing to "
                                          f"generate in {total} frames", limit=f"fewer than {total} frames")
            known_codes = torch.nn.functional.pad(prefix, (0, total - prefix.shape[1]))
            known_frames = torch.arange(total) < prefix.shape[1]
    return ResolvedRequest(
        request_id=request.request_id or uuid.uuid4().hex, prompt=prompt, total_frames=total, sampling=sampling,
        known_codes=known_codes, known_frames=known_frames)

"""The delay pattern that interleaves codebooks into one LM sequence.

Position 0 is the start position (every codebook holds the special token). At position p, codebook k holds
frame `p - 1 - delays[k]` when that frame exists, else the special token. The LM at position p predicts
position p + 1, so one step emits frame `p - delays[k]` of every codebook k. With delays (0, 1, 2, 3) a clip of
T frames takes T + 3 steps, as in audiocraft's `DelayedPatternProvider` and transformers' MusicGen.
"""

from __future__ import annotations

import torch


def pattern_frame_index(length: int, delays: tuple[int, ...], device: torch.device | str | None = None
                        ) -> torch.Tensor:
    """[K, length] frame index held at each position (-1 where none: start or delay padding)."""
    positions = torch.arange(length, device=device)[None, :]
    offsets = torch.tensor(delays, device=device)[:, None]
    return positions - 1 - offsets


def build_delay_pattern(codes: torch.Tensor, delays: tuple[int, ...], special: int) -> torch.Tensor:
    """codes [B, K, T] -> sequence [B, K, T + max(delays) + 1] with the start position and delay padding."""
    batch, num_codebooks, frames = codes.shape
    if num_codebooks != len(delays):
        raise ValueError(f"codes have {num_codebooks} codebooks but the pattern has {len(delays)} delays")
    index = pattern_frame_index(frames + max(delays) + 1, delays, codes.device)
    valid = (index >= 0) & (index < frames)
    gathered = codes.gather(2, index.clamp(0, max(frames - 1, 0)).expand(batch, -1, -1))
    return torch.where(valid, gathered, torch.full_like(gathered, special))


def revert_delay_pattern(sequence: torch.Tensor, delays: tuple[int, ...], frames: int) -> torch.Tensor:
    """Inverse of `build_delay_pattern`: sequence [B, K, S] -> codes [B, K, frames]."""
    index = torch.arange(frames, device=sequence.device)[None, :] + 1 + torch.tensor(delays, device=sequence.device)[:, None]
    if int(index.max()) >= sequence.shape[-1]:
        raise ValueError(f"sequence of length {sequence.shape[-1]} is too short for {frames} frames")
    return sequence.gather(2, index.expand(sequence.shape[0], -1, -1))


def target_mask(length: int, frames: int, delays: tuple[int, ...], device: torch.device | str | None = None
                ) -> torch.Tensor:
    """[K, length] True where the target at position p (the token of position p + 1) is a real frame.

    Training feeds positions 0..length-1 and scores their predictions of positions 1..length; only
    predictions of real frames count, special tokens are never targets.
    """
    index = pattern_frame_index(length + 1, delays, device)[:, 1:]
    return (index >= 0) & (index < frames)

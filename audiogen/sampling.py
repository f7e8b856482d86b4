"""Classifier-free guidance and seeded sampling that does not depend on batch mates.

Sampling is Gumbel-max: the chosen token is `argmax(logits / temperature + g)` over the tokens that top-k /
top-p keep, with `g = -log(-log(u))`. That is an exact draw from the renormalised softmax, and `u` comes from a
counter-based hash of (request seed, frame, codebook, token id) computed with integer tensor ops. So a clip's
tokens depend only on its own seed and logits: not on which requests share the batch, on the row it sits in,
on how many steps the engine ran before it joined, or on a per-request `torch.Generator` (which would cost a
kernel launch per row per step on GPU).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 never overflows.
_M1, _M2, _GOLDEN = 0x7FEB352D, 0x5BD1E995, 0x1E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit finaliser with full avalanche (xor-shift-multiply, lowbias32-style) on int64 holding 32 bits."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """32-bit key of a 63-bit request seed (computed once per request, on the host)."""
    key = _mix32(torch.tensor([(seed & _MASK32) ^ 0x2545F491]))
    key = _mix32(key ^ ((seed >> 32) & _MASK32))
    return int(key)


def stream_keys(seed_keys: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """One key per (request, codebook, frame): seed_keys [S] from `seed_key`, frames [S, K] absolute indices."""
    codebooks = frames.shape[1]
    stream = frames * codebooks + torch.arange(codebooks, device=frames.device)[None, :]
    return _mix32(seed_keys[:, None] ^ ((stream * _GOLDEN) & _MASK32))


def uniform_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """u in (0, 1) for each candidate token: keys [S, K], token_ids [S, K, N] -> float32 [S, K, N]."""
    bits = _mix32(keys[..., None] ^ (((token_ids + 1) * _M2) & _MASK32))
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_noise(keys, token_ids)))


def apply_guidance(logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """logits [S, 2, K, V] (conditional, unconditional/negative) -> `uncond + scale * (cond - uncond)`."""
    cond, uncond = logits[:, 0].float(), logits[:, 1].float()
    return uncond + scale.to(cond.dtype)[:, None, None] * (cond - uncond)


def sampling_plan(temperatures: list[float], top_ks: list[int], top_ps: list[float], vocab: int) -> tuple[int, bool]:
    """(candidates, ranked) for a step's rows, computed on the host so the step never syncs with the device.

    candidates: 1 if every row is greedy, the largest top-k otherwise, the whole vocabulary if a row uses
    top-p or no cut. ranked: whether candidates must be sorted (any cut, or greedy rows); when every row samples
    from the whole vocabulary unranked, the sort is skipped.
    """
    needed, ranked = 1, False
    for temperature, top_k, top_p in zip(temperatures, top_ks, top_ps):
        if temperature <= 0:
            ranked = True
        elif top_p > 0:
            needed, ranked = vocab, True
        elif top_k <= 0 or top_k >= vocab:
            needed = vocab
        else:
            needed, ranked = max(needed, top_k), True
    return needed, ranked or needed < vocab


def sample_tokens(logits: torch.Tensor, *, keys: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, num_candidates: int, ranked: bool = True) -> torch.Tensor:
    """Pick one token per (row, codebook) from logits [S, K, V].

    temperature [S] (0 = greedy), top_k [S] (0 = no cut), top_p [S] (0 = no cut; takes precedence over
    top_k, as in audiocraft), keys [S, K] from `stream_keys`. `num_candidates` must come from
    `sampling_plan` for the same rows.
    """
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None, None]
    rank = torch.arange(num_candidates, device=logits.device)
    if not ranked:
        # every token is a candidate and nothing needs ranks: skip the sort (ids in vocabulary order)
        return _gumbel_argmax(scaled, rank.expand_as(scaled), keys, torch.ones_like(scaled, dtype=torch.bool))
    values, token_ids = scaled.topk(num_candidates, dim=-1)
    keep_count = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    keep_count = torch.where(top_p > 0, torch.full_like(keep_count, vocab), keep_count)
    keep = rank[None, None, :] < keep_count[:, None, None]
    if num_candidates == vocab:
        probs = torch.softmax(values, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        nucleus = (mass_before <= top_p[:, None, None]) | (rank == 0)[None, None, :]
        keep = torch.where((top_p > 0)[:, None, None], nucleus, keep)
    keep = keep & ~(greedy[:, None, None] & (rank > 0)[None, None, :])  # greedy rows keep their top token only
    return _gumbel_argmax(values, token_ids, keys, keep)


def _gumbel_argmax(values: torch.Tensor, token_ids: torch.Tensor, keys: torch.Tensor, keep: torch.Tensor
                   ) -> torch.Tensor:
    scores = torch.where(keep, values + gumbel_noise(keys, token_ids), torch.full_like(values, float("-inf")))
    return token_ids.gather(-1, scores.argmax(dim=-1, keepdim=True))[..., 0]

"""Preallocated key/value cache for batched decoding with one row per (request, CFG branch).

Self-attention keys/values live in `[layers, rows, heads, max_steps, head_dim]`, cross-attention keys/values of
the text in `[layers, rows, heads, text_tokens, head_dim]`. Everything is allocated once, so decoding never
reallocates or concatenates (audiocraft grows its cache with `torch.cat` every step). Active rows are kept
compact at the front (`move` relocates a request), so a step only touches rows `0..R-1` and keys `0..length-1`.
"""

from __future__ import annotations

import numpy as np
import torch


class KVCache:
    def __init__(self, *, num_layers: int, rows: int, num_heads: int, head_dim: int, max_steps: int,
                 text_tokens: int, device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (num_layers, rows, num_heads, max_steps, head_dim)
        text_shape = (num_layers, rows, num_heads, text_tokens, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.text_keys = torch.zeros(text_shape, device=device, dtype=dtype)
        self.text_values = torch.zeros(text_shape, device=device, dtype=dtype)
        self.text_mask = torch.zeros((rows, text_tokens), device=device, dtype=torch.bool)
        self.text_lengths = np.zeros(rows, dtype=np.int64)  # host-side: text positions each row's prompt uses
        self._row_index = torch.arange(rows, device=device)

    @staticmethod
    def bytes_needed(*, num_layers: int, rows: int, num_heads: int, head_dim: int, max_steps: int,
                     text_tokens: int, dtype: torch.dtype) -> int:
        """Memory the cache will take, for admission checks before allocating it."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_row = num_layers * num_heads * head_dim * (max_steps + text_tokens) * 2 * itemsize
        return rows * (per_row + text_tokens)

    # ------------------------------------------------------------------ text (once per request)
    def store_text(self, rows: slice, text_kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Write projected text keys/values [B, H, L, hd] per layer and the key mask [B, L] for `rows`."""
        length = mask.shape[1]
        self.text_mask[rows] = False
        self.text_mask[rows, :length] = mask
        self.text_lengths[rows] = length
        for layer, (k, v) in enumerate(text_kv):
            self.text_keys[layer, rows, :, :length] = k
            self.text_values[layer, rows, :, :length] = v

    def text_view(self, rows: slice) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per-layer text keys/values [R, H, L, hd] and the key mask [R, L] of `rows`, cut to the longest prompt
        among them: the cache is sized for the longest prompt allowed (256 tokens for MusicGen), and attending
        over its masked tail would read the whole text cache every step for nothing (for a 4-layer, 32-row
        model it was as much memory traffic as all the weights)."""
        length = self.text_length(rows)
        kv = [(self.text_keys[layer, rows, :, :length], self.text_values[layer, rows, :, :length])
              for layer in range(self.keys.shape[0])]
        return kv, self.text_mask[rows, :length]

    def text_length(self, rows: slice) -> int:
        """Text positions the longest prompt among `rows` uses (at least 1)."""
        return max(1, int(self.text_lengths[rows].max(initial=0)))

    # ------------------------------------------------------------------ self-attention
    def write_prefix(self, layer: int, rows: slice, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values [B, H, P, hd] of positions 0..P-1 for `rows` (prefill) and return them: what the
        prefix attends to, as `write_step` returns what a step attends to (both serve as `lm.Past`)."""
        length = k.shape[2]
        self.keys[layer, rows, :, :length] = k
        self.values[layer, rows, :, :length] = v
        return k, v

    def write_step(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one position per row (k/v [R, H, 1, hd] at `positions [R]`) and return the keys/values of
        positions 0..length-1 of those rows as views (no copy)."""
        num_rows = positions.shape[0]
        index = self._row_index[:num_rows]
        keys = self.keys[layer, :num_rows]
        values = self.values[layer, :num_rows]
        keys[index, :, positions] = k[:, :, 0]
        values[index, :, positions] = v[:, :, 0]
        return keys[:, :, :length], values[:, :, :length]

    # ------------------------------------------------------------------ compaction
    def move(self, src: slice, dst: slice, steps: int) -> None:
        """Copy rows `src` onto rows `dst` (positions 0..steps-1 and all text), used to keep rows compact."""
        self.keys[:, dst, :, :steps] = self.keys[:, src, :, :steps]
        self.values[:, dst, :, :steps] = self.values[:, src, :, :steps]
        self.text_keys[:, dst] = self.text_keys[:, src]
        self.text_values[:, dst] = self.text_values[:, src]
        self.text_mask[dst] = self.text_mask[src]
        self.text_lengths[dst] = self.text_lengths[src]

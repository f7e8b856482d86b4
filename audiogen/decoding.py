"""Decoding over a batch of slots, each slot one request at its own position (the engine's model runner).

A slot holds everything one request needs between steps: its window of the delay pattern (`window_start`,
`window_len`, position `pos`), the codes of the whole clip (`codes`, frames `< settled` or marked `known` are
forced: continuation prefixes, inpainting context, earlier windows), its seed and sampling parameters, and two
cache rows (conditional text, and negative prompt or null text for classifier-free guidance).

One `step` advances every active slot by one position, whatever position each is at; requests with different
parameters share the step. A window finishes after `window_len + max_delay` positions; a clip longer than the
window continues in a new window that re-reads the last `window - stride` frames as a prefix (audiocraft's
`extend_stride` extension), prefilled in one forward pass. Active slots are kept at indices `0..n-1`
(`release` moves the last one into the hole), so a step computes only rows in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from audiogen.config import AudioGenConfig
from audiogen.kv_cache import KVCache
from audiogen.lm import LanguageModel
from audiogen.patterns import build_delay_pattern
from audiogen.sampling import apply_guidance, sample_tokens, sampling_plan, seed_key, stream_keys

# Columns of the per-slot integer state kept on the host (so the scheduler never waits on the device).
POS, WINDOW_START, WINDOW_LEN, SETTLED, TOTAL, SEED_KEY, TOP_K = range(7)
# Columns of the per-slot float state.
TEMPERATURE, TOP_P, GUIDANCE = range(3)


@dataclass
class SlotSpec:
    """What a request asks of the decoder (already validated and resolved against model defaults)."""

    total_frames: int
    seed: int
    temperature: float
    top_k: int
    top_p: float
    guidance_scale: float
    known_codes: torch.Tensor | None = None  # [K, total_frames] codes to force where `known_frames`
    known_frames: torch.Tensor | None = None  # [total_frames] bool


class SlotBatch:
    """Fixed-capacity batch of decoding slots with their KV cache, codes and sampling state."""

    def __init__(self, lm: LanguageModel, *, max_slots: int, max_frames: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        config: AudioGenConfig = lm.config
        self.lm = lm
        self.config = config
        self.max_slots = max_slots
        self.max_frames = max_frames
        self.device = device
        self.window = config.window_frames
        self.stride = config.stride_frames
        self.max_delay = config.max_delay
        self.delays = torch.tensor(config.delays, device=device)
        self.cache = KVCache(num_layers=config.num_layers, rows=2 * max_slots, num_heads=config.num_heads,
                             head_dim=config.head_dim, max_steps=config.max_steps,
                             text_tokens=config.max_text_tokens, device=device, dtype=dtype)
        self.codes = torch.zeros((max_slots, config.num_codebooks, max_frames), dtype=torch.long, device=device)
        self.known = torch.zeros((max_slots, max_frames), dtype=torch.bool, device=device)
        self.ints = np.zeros((max_slots, 7), dtype=np.int64)
        self.floats = np.zeros((max_slots, 3), dtype=np.float32)
        self.owners: list[Any] = []

    # ------------------------------------------------------------------ occupancy
    @property
    def active(self) -> int:
        return len(self.owners)

    @property
    def free(self) -> int:
        return self.max_slots - len(self.owners)

    def position(self, slot: int) -> int:
        return int(self.ints[slot, POS])

    def settled_frames(self, slot: int) -> int:
        """Frames of the clip that are final: earlier windows plus this window's frames whose every codebook
        has been emitted (used to stream audio while the clip is still being generated)."""
        row = self.ints[slot]
        in_window = min(max(int(row[POS]) - self.max_delay, 0), int(row[WINDOW_LEN]))
        return max(int(row[SETTLED]), int(row[WINDOW_START]) + in_window)

    def total_frames(self, slot: int) -> int:
        return int(self.ints[slot, TOTAL])

    # ------------------------------------------------------------------ admission
    def admit(self, owners: list[Any], specs: list[SlotSpec], text: torch.Tensor, text_mask: torch.Tensor) -> list[int]:
        """Place requests in free slots. `text [2n, L, dim]` / `text_mask [2n, L]` hold, per request, the
        conditional row then the unconditional (negative prompt or null) row. Returns the slot indices."""
        if len(owners) > self.free:
            raise RuntimeError(f"admitting {len(owners)} requests into {self.free} free slots")
        first = self.active
        slots = list(range(first, first + len(owners)))
        rows = slice(2 * first, 2 * (first + len(owners)))
        with torch.inference_mode():
            text = text.to(device=self.device, dtype=self.cache.keys.dtype)
            self.cache.store_text(rows, self.lm.project_text(text), text_mask.to(self.device))
        for slot, owner, spec in zip(slots, owners, specs):
            self.owners.append(owner)
            self._load(slot, spec)
        return slots

    def _load(self, slot: int, spec: SlotSpec) -> None:
        frames = spec.total_frames
        if not 0 < frames <= self.max_frames:
            raise ValueError(f"total_frames={frames} outside 1..{self.max_frames}")
        self.codes[slot].zero_()
        self.known[slot].zero_()
        if spec.known_frames is not None and spec.known_codes is not None:
            self.known[slot, :frames] = spec.known_frames.to(self.device)
            self.codes[slot, :, :frames] = spec.known_codes.to(self.device)
        self.ints[slot] = (0, 0, 0, 0, frames, seed_key(spec.seed), spec.top_k)
        self.floats[slot] = (spec.temperature, spec.top_p, spec.guidance_scale)
        self._start_window(slot, self._first_window_start(slot))

    def _first_window_start(self, slot: int) -> int:
        """0, unless the known prefix is longer than a window: then start so that the window re-reads the
        last `window - stride` prefix frames, like every later window."""
        prefix = self._known_run(slot, 0, self.total_frames(slot))
        if prefix < self.window or self.total_frames(slot) <= self.window:
            return 0
        return min(prefix - (self.window - self.stride), self.total_frames(slot) - self.window)

    def _known_run(self, slot: int, start: int, stop: int) -> int:
        """Length of the run of forced frames starting at `start` (bounded by `stop`)."""
        settled = int(self.ints[slot, SETTLED])
        run = max(0, min(settled, stop) - start)
        if start + run < stop:
            known = self.known[slot, start + run:stop].cpu()
            unknown = (~known).nonzero()
            run += int(unknown[0, 0]) if len(unknown) else stop - start - run
        return run

    def _start_window(self, slot: int, start: int) -> None:
        total = self.total_frames(slot)
        length = min(self.window, total - start)
        prefix = min(self._known_run(slot, start, start + length), length)
        self.ints[slot, WINDOW_START] = start
        self.ints[slot, WINDOW_LEN] = length
        self.ints[slot, POS] = prefix
        if prefix > 0:
            sequence = build_delay_pattern(self.codes[slot:slot + 1, :, start:start + prefix], self.config.delays,
                                           self.config.special_token)[:, :, :prefix]
            with torch.inference_mode():
                self.lm.prefill(sequence.expand(2, -1, -1), self.cache, slice(2 * slot, 2 * slot + 2))

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[int]:
        """Advance every active slot by one position; return the slots whose window just finished."""
        n = self.active
        if n == 0:
            return []
        ints = torch.from_numpy(self.ints[:n].copy()).to(self.device)
        floats = torch.from_numpy(self.floats[:n].copy()).to(self.device)
        pos, start, length, settled = ints[:, POS], ints[:, WINDOW_START], ints[:, WINDOW_LEN], ints[:, SETTLED]
        codes = self.codes[:n]
        special = self.config.special_token

        rel_in = pos[:, None] - 1 - self.delays[None, :]
        frame_in = (start[:, None] + rel_in.clamp(min=0)).clamp(max=self.max_frames - 1)
        tokens = codes.gather(2, frame_in[..., None])[..., 0]
        tokens = torch.where((rel_in >= 0) & (rel_in < length[:, None]), tokens, torch.full_like(tokens, special))

        with torch.inference_mode():
            logits = self.lm.step(tokens.repeat_interleave(2, dim=0), pos.repeat_interleave(2), self.cache, 2 * n,
                                  int(self.ints[:n, POS].max()) + 1)
        logits = logits.view(n, 2, *logits.shape[1:])
        guidance = floats[:, GUIDANCE]
        guided = torch.where((guidance == 1)[:, None, None], logits[:, 0].float(), apply_guidance(logits, guidance))

        rel_out = pos[:, None] - self.delays[None, :]
        frame_out = (start[:, None] + rel_out.clamp(min=0)).clamp(max=self.max_frames - 1)
        emit = (rel_out >= 0) & (rel_out < length[:, None])
        forced = self.known[:n].gather(1, frame_out) | (frame_out < settled[:, None])
        candidates, ranked = sampling_plan(self.floats[:n, TEMPERATURE].tolist(), self.ints[:n, TOP_K].tolist(),
                                           self.floats[:n, TOP_P].tolist(), self.config.card)
        sampled = sample_tokens(
            guided, keys=stream_keys(ints[:, SEED_KEY], frame_out), temperature=floats[:, TEMPERATURE],
            top_k=ints[:, TOP_K], top_p=floats[:, TOP_P], num_candidates=candidates, ranked=ranked)
        current = codes.gather(2, frame_out[..., None])[..., 0]
        codes.scatter_(2, frame_out[..., None], torch.where(emit & ~forced, sampled, current)[..., None])

        self.ints[:n, POS] += 1
        done = self.ints[:n, POS] >= self.ints[:n, WINDOW_LEN] + self.max_delay
        return np.flatnonzero(done).tolist()

    def finish_window(self, slot: int) -> bool:
        """Settle the finished window; start the next one if the clip continues. True when the clip is done."""
        row = self.ints[slot]
        end = int(row[WINDOW_START] + row[WINDOW_LEN])
        row[SETTLED] = end
        if end >= row[TOTAL]:
            return True
        self._start_window(slot, int(row[WINDOW_START]) + self.stride)
        return False

    # ------------------------------------------------------------------ results and release
    def clip_codes(self, slot: int, frames: int | None = None, start: int = 0) -> torch.Tensor:
        """Codes [K, frames] of a slot's clip, copied to the CPU (a copy even on the CPU: the slot's buffer is
        reused by the next request while the audio thread still decodes these)."""
        stop = self.total_frames(slot) if frames is None else frames
        return self.codes[slot, :, start:stop].to("cpu", copy=True)

    def release(self, slot: int) -> Any:
        """Free a slot; the last active slot moves into it. Returns the owner that moved (or None)."""
        last = self.active - 1
        moved = None
        if slot != last:
            steps = self.config.max_steps
            self.cache.move(slice(2 * last, 2 * last + 2), slice(2 * slot, 2 * slot + 2), steps)
            self.codes[slot] = self.codes[last]
            self.known[slot] = self.known[last]
            self.ints[slot] = self.ints[last]
            self.floats[slot] = self.floats[last]
            self.owners[slot] = self.owners[last]
            moved = self.owners[slot]
        self.owners.pop()
        return moved

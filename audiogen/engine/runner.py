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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from audiogen.config import AudioGenConfig
from audiogen.kv_cache import KVCache
from audiogen.lm import LanguageModel
from audiogen.patterns import build_delay_pattern
from audiogen.sampling import apply_guidance, sample_tokens, sampling_plan, seed_key, stream_keys

if TYPE_CHECKING:
    from audiogen.engine.request import ResolvedRequest

INT_FIELDS = ("pos", "window_start", "window_len", "settled", "total", "seed_key", "top_k")
FLOAT_FIELDS = ("temperature", "top_p", "guidance")


class SlotState:
    """Per-slot scalars, one named array per field, kept on the host so the scheduler never waits on the device.

    `pos` is the slot's position in its current window of the delay pattern, `window_start`/`window_len` the
    window's frames of the clip, `settled` the frames final from earlier windows, `total` the clip's frames. The
    named arrays are rows of one integer and one float block, so a step sends all of them to the device in two
    copies and moving a slot is two column copies.
    """

    pos: np.ndarray
    window_start: np.ndarray
    window_len: np.ndarray
    settled: np.ndarray
    total: np.ndarray
    seed_key: np.ndarray
    top_k: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    guidance: np.ndarray

    def __init__(self, slots: int) -> None:
        self._blocks = ((INT_FIELDS, np.zeros((len(INT_FIELDS), slots), dtype=np.int64)),
                        (FLOAT_FIELDS, np.zeros((len(FLOAT_FIELDS), slots), dtype=np.float32)))
        for names, block in self._blocks:
            for name, row in zip(names, block):
                setattr(self, name, row)

    def copy_slot(self, src: int, dst: int) -> None:
        for _, block in self._blocks:
            block[:, dst] = block[:, src]

    def on_device(self, count: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Slots 0..count-1 of every field as tensors, in one host-to-device copy per block (a step needs all)."""
        result: dict[str, torch.Tensor] = {}
        for names, block in self._blocks:
            result.update(zip(names, torch.from_numpy(block[:, :count].copy()).to(device).unbind(0)))
        return result


class SlotBatch:
    """Fixed-capacity batch of decoding slots with their KV cache, codes and sampling state.

    `compile=True` runs the LM step through `torch.compile` (dynamic shapes: the number of active rows and the
    attended length change every step); the compiled function belongs to this batch, the model is not changed.
    """

    def __init__(self, lm: LanguageModel, *, max_slots: int, max_frames: int, device: torch.device,
                 dtype: torch.dtype, compile: bool = False) -> None:
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
        self.state = SlotState(max_slots)
        self.owners: list[Any] = []
        self._lm_step: Callable[..., torch.Tensor] = torch.compile(lm.step, dynamic=True) if compile else lm.step

    # ------------------------------------------------------------------ occupancy
    @property
    def active(self) -> int:
        return len(self.owners)

    @property
    def free(self) -> int:
        return self.max_slots - len(self.owners)

    def settled_frames(self, slot: int) -> int:
        """Frames of the clip that are final: earlier windows plus this window's frames whose every codebook
        has been emitted (used to stream audio while the clip is still being generated)."""
        state = self.state
        in_window = min(max(int(state.pos[slot]) - self.max_delay, 0), int(state.window_len[slot]))
        return max(int(state.settled[slot]), int(state.window_start[slot]) + in_window)

    # ------------------------------------------------------------------ admission
    def admit(self, owners: list[Any], requests: list["ResolvedRequest"], text: torch.Tensor,
              text_mask: torch.Tensor) -> None:
        """Place requests in the next free slots. `text [2n, L, dim]` / `text_mask [2n, L]` hold, per request,
        the conditional row then the unconditional (negative prompt or null) row."""
        if len(owners) > self.free:
            raise RuntimeError(f"admitting {len(owners)} requests into {self.free} free slots")
        rows = slice(2 * self.active, 2 * (self.active + len(owners)))
        with torch.inference_mode():
            text = text.to(device=self.device, dtype=self.cache.keys.dtype)
            self.cache.store_text(rows, self.lm.project_text(text), text_mask.to(self.device))
        for owner, request in zip(owners, requests):
            self.owners.append(owner)
            self._load(self.active - 1, request)

    def _load(self, slot: int, request: "ResolvedRequest") -> None:
        frames = request.total_frames
        if not 0 < frames <= self.max_frames:
            raise ValueError(f"total_frames={frames} outside 1..{self.max_frames}")
        self.codes[slot].zero_()
        self.known[slot].zero_()
        if request.known_frames is not None and request.known_codes is not None:
            self.known[slot, :frames] = request.known_frames.to(self.device)
            self.codes[slot, :, :frames] = request.known_codes.to(self.device)
        sampling, state = request.sampling, self.state
        state.pos[slot] = state.window_start[slot] = state.window_len[slot] = state.settled[slot] = 0
        state.total[slot] = frames
        state.seed_key[slot] = seed_key(sampling.seed)
        state.top_k[slot] = sampling.top_k
        state.temperature[slot] = sampling.temperature
        state.top_p[slot] = sampling.top_p
        state.guidance[slot] = sampling.guidance_scale
        # the first window starts at 0, unless the known prefix is longer than a window: then it starts so that
        # it re-reads the last `window - stride` prefix frames, like every later window
        prefix = self._known_run(slot, 0, frames)
        late = prefix >= self.window and frames > self.window
        self._start_window(slot, min(prefix - (self.window - self.stride), frames - self.window) if late else 0)

    def _known_run(self, slot: int, start: int, stop: int) -> int:
        """Length of the run of forced frames starting at `start` (bounded by `stop`)."""
        run = max(0, min(int(self.state.settled[slot]), stop) - start)
        if start + run < stop:  # plus the leading run of known frames after the settled ones
            run += int(self.known[slot, start + run:stop].cpu().cumprod(0).sum())
        return run

    def _start_window(self, slot: int, start: int) -> None:
        length = min(self.window, int(self.state.total[slot]) - start)
        prefix = min(self._known_run(slot, start, start + length), length)
        self.state.window_start[slot] = start
        self.state.window_len[slot] = length
        self.state.pos[slot] = prefix
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
        host = self.state
        slots = host.on_device(n, self.device)
        pos, start, length = slots["pos"], slots["window_start"], slots["window_len"]
        codes = self.codes[:n]
        special = self.config.special_token

        rel_in = pos[:, None] - 1 - self.delays[None, :]
        frame_in = (start[:, None] + rel_in.clamp(min=0)).clamp(max=self.max_frames - 1)
        tokens = codes.gather(2, frame_in[..., None])[..., 0]
        tokens = torch.where((rel_in >= 0) & (rel_in < length[:, None]), tokens, torch.full_like(tokens, special))

        with torch.inference_mode():
            logits = self._lm_step(tokens.repeat_interleave(2, dim=0), pos.repeat_interleave(2), self.cache, 2 * n,
                                   int(host.pos[:n].max()) + 1)
        logits = logits.view(n, 2, *logits.shape[1:])
        guidance = slots["guidance"]
        guided = torch.where((guidance == 1)[:, None, None], logits[:, 0].float(), apply_guidance(logits, guidance))

        rel_out = pos[:, None] - self.delays[None, :]
        frame_out = (start[:, None] + rel_out.clamp(min=0)).clamp(max=self.max_frames - 1)
        emit = (rel_out >= 0) & (rel_out < length[:, None])
        forced = self.known[:n].gather(1, frame_out) | (frame_out < slots["settled"][:, None])
        candidates, ranked = sampling_plan(host.temperature[:n].tolist(), host.top_k[:n].tolist(),
                                           host.top_p[:n].tolist(), self.config.card)
        sampled = sample_tokens(
            guided, keys=stream_keys(slots["seed_key"], frame_out), temperature=slots["temperature"],
            top_k=slots["top_k"], top_p=slots["top_p"], num_candidates=candidates, ranked=ranked)
        current = codes.gather(2, frame_out[..., None])[..., 0]
        codes.scatter_(2, frame_out[..., None], torch.where(emit & ~forced, sampled, current)[..., None])

        host.pos[:n] += 1
        done = host.pos[:n] >= host.window_len[:n] + self.max_delay
        return np.flatnonzero(done).tolist()

    def finish_window(self, slot: int) -> bool:
        """Settle the finished window; start the next one if the clip continues. True when the clip is done."""
        state = self.state
        end = int(state.window_start[slot] + state.window_len[slot])
        state.settled[slot] = end
        if end >= state.total[slot]:
            return True
        self._start_window(slot, int(state.window_start[slot]) + self.stride)
        return False

    # ------------------------------------------------------------------ results and release
    def clip_codes(self, slot: int, frames: int | None = None, start: int = 0) -> torch.Tensor:
        """Codes [K, frames] of a slot's clip, copied to the CPU (a copy even on the CPU: the slot's buffer is
        reused by the next request while the audio thread still decodes these)."""
        stop = int(self.state.total[slot]) if frames is None else frames
        return self.codes[slot, :, start:stop].to("cpu", copy=True)

    def release(self, slot: int) -> None:
        """Free a slot; the last active slot moves into it."""
        last = self.active - 1
        if slot != last:
            self.cache.move(slice(2 * last, 2 * last + 2), slice(2 * slot, 2 * slot + 2), self.config.max_steps)
            self.codes[slot] = self.codes[last]
            self.known[slot] = self.known[last]
            self.state.copy_slot(last, slot)
            self.owners[slot] = self.owners[last]
        self.owners.pop()

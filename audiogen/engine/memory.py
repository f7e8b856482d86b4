"""Start-up memory check: refuse an engine whose KV cache cannot fit, with a message naming the knobs.

Failing at construction with "max_batch_slots=64 x max_steps_per_slot=504 needs 12.3 GiB" is far more useful
than an out-of-memory error (or swapping) in the middle of a job.
"""

from __future__ import annotations

import contextlib
import os

import torch

from audiogen.config import AudioGenConfig
from audiogen.errors import ResourceLimitError
from audiogen.kv_cache import KVCache

GIB = 1024**3


def available_memory(device: torch.device) -> int:
    """Free bytes on the device: CUDA's free memory, or the host's MemAvailable for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory_budget(config: AudioGenConfig, *, slots: int, steps: int, device: torch.device,
                        dtype: torch.dtype, fraction: float = 0.9) -> None:
    """Raise `ResourceLimitError` if the cache would take more than `fraction` of free memory."""
    needed = KVCache.bytes_needed(num_layers=config.num_layers, rows=2 * slots, num_heads=config.num_heads,
                                  head_dim=config.head_dim, max_steps=steps, text_tokens=config.max_text_tokens,
                                  dtype=dtype)
    budget = int(available_memory(device) * fraction)
    if needed > budget:
        raise ResourceLimitError(
            f"max_batch_slots={slots} x max_steps_per_slot={steps} needs {needed / GIB:.2f} GiB of KV cache "
            f"({dtype}) but only {budget / GIB:.2f} GiB ({fraction:.0%} of free memory) is available on {device}; "
            f"at most {max(0, int(budget // (needed / slots)))} slots fit")

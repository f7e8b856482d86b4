"""CPU thread placement for the engine.

PyTorch's CPU kernels parallelise with OpenMP, and every thread that runs a parallel kernel gets its own OpenMP
team. When the engine's loop thread and the caller's thread both own a team, there are more OpenMP threads than
cores and libgomp stops spinning between kernels, so each of the engine's ~100 small kernels per step pays a
thread wake-up: steps of a small model measured 2-3x slower on 2 cores.

The synchronous API (`Engine.run`, `AudioGen.generate`) avoids this by stepping in the calling thread: one team,
nothing to configure. Processes whose engine runs its background loop (Ray render actors and Serve replicas,
whose event loops await it) call `reserve_cores_for_engine()` before loading a model: the caller keeps one
thread, the loop thread gets the cores.
"""

from __future__ import annotations

import torch

_engine_threads: int | None = None


def reserve_cores_for_engine(threads: int | None = None) -> int:
    """Make the calling thread's kernels single-threaded and give `threads` (default: the current intra-op
    thread count) to engines created afterwards. Call it before the calling thread runs any torch kernel."""
    global _engine_threads
    _engine_threads = threads or _engine_threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return _engine_threads


def engine_threads() -> int:
    """Intra-op threads for an engine thread: what `reserve_cores_for_engine` set aside, else the default."""
    return _engine_threads or torch.get_num_threads()

"""Engine counters and snapshots for health checks, metrics endpoints, autoscaling, benchmarks and tests.

Counters are plain int/float writes from the stepping thread (readers may see one step's lag, never a torn value).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    cancelled: int = 0
    rejected: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    audio_seconds: float = 0.0
    occupied_slot_steps: int = 0
    max_occupancy: int = 0

    def record_step(self, active: int, seconds: float) -> None:
        self.steps += 1
        self.step_seconds += seconds
        self.occupied_slot_steps += active
        self.max_occupancy = max(self.max_occupancy, active)

    @property
    def mean_occupancy(self) -> float:
        """Average active slots per step (what continuous batching keeps high)."""
        return self.occupied_slot_steps / self.steps if self.steps else 0.0


@dataclass(frozen=True)
class EngineSnapshot:
    """An engine's state at one instant: what health checks, metrics and autoscaling read (never its internals).

    alive: accepting requests (False after `shutdown` or a failed step, whose message is `error`).
    busy_slots / max_slots: requests decoding now / at most; queue_depth / max_queued: waiting / at most.
    """

    alive: bool
    busy_slots: int
    max_slots: int
    queue_depth: int
    max_queued: int
    error: str | None
    mean_occupancy: float
    steps: int
    audio_seconds: float

    @property
    def in_flight(self) -> int:
        return self.busy_slots + self.queue_depth

    @property
    def capacity(self) -> int:
        return self.max_slots + self.max_queued

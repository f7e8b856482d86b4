"""Engine counters for metrics endpoints, benchmarks and tests (thread-safe enough: plain int/float writes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    max_slots: int
    submitted: int = 0
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    audio_seconds: float = 0.0
    occupied_slot_steps: int = 0
    max_occupancy: int = 0
    occupancy_histogram: dict[int, int] = field(default_factory=dict)

    def record_step(self, active: int, seconds: float) -> None:
        self.steps += 1
        self.step_seconds += seconds
        self.occupied_slot_steps += active
        self.max_occupancy = max(self.max_occupancy, active)
        self.occupancy_histogram[active] = self.occupancy_histogram.get(active, 0) + 1

    @property
    def mean_occupancy(self) -> float:
        """Average active slots per step (what continuous batching keeps high)."""
        return self.occupied_slot_steps / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"submitted": self.submitted, "admitted": self.admitted, "finished": self.finished,
                "cancelled": self.cancelled, "rejected": self.rejected, "steps": self.steps,
                "step_seconds": self.step_seconds, "audio_seconds": self.audio_seconds,
                "mean_occupancy": self.mean_occupancy, "max_occupancy": self.max_occupancy,
                "max_slots": self.max_slots}

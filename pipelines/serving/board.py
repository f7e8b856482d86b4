"""`EngineBoard`: where engine replicas post their state (engine snapshots and model descriptions) twice a second,
so that the ingress answers readiness, `/v1/models` and `/v1/stats` without calling an engine replica, which
Serve would queue behind generation requests when the replica is full. One replica, no CPU reservation."""

from __future__ import annotations

import time
from typing import Any

REPORT_PERIOD_S = 0.5
STALE_AFTER_S = 5.0  # a replica silent this long is gone (stopped, dead, or replaced)


class EngineBoard:
    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, dict[str, Any]]] = {}

    async def report(self, replica: str, models: dict[str, Any]) -> None:
        """`models`: model id -> {"snapshot": EngineSnapshot fields, "info": the model's description}."""
        self._reports[replica] = (time.monotonic(), models)

    async def view(self) -> dict[str, dict[str, Any]]:
        """Replica id -> its latest report, for the replicas heard from in the last `STALE_AFTER_S`."""
        now = time.monotonic()
        self._reports = {replica: (at, models) for replica, (at, models) in self._reports.items()
                         if now - at <= STALE_AFTER_S}
        return {replica: models for replica, (_, models) in self._reports.items()}

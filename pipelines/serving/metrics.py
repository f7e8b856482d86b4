"""Metrics through `ray.serve.metrics`, so Ray's Prometheus export carries every replica's series (tagged with
application, deployment and replica) and a cluster scrape aggregates them.

- Ingress: HTTP requests by route and status, latency to the last byte, time to the first audio byte.
- Engine replicas: per model, slots in use, queue depth, their limits, liveness, and counters of decoding steps,
  occupied slot-steps (occupancy = rate(slot_steps) / rate(steps)) and audio seconds generated.

Ray exports each node's series on that node's metrics port (every `metrics_report_interval_ms`, 10 s by default;
names get Ray's `ray_` prefix). `GET /metrics` of the ingress returns its own node's export, keeping the
`ray_audiogen_*` families and Serve's request, queue, replica and autoscaling ones (`EXPORTED_PREFIXES`): on one
machine that is the whole app; on a cluster, scrape every node's metrics port (Ray's Prometheus service discovery
file lists them).
"""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Any

import ray
from ray.serve import metrics

from audiogen.engine import EngineSnapshot

LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300]
EXPORTED_PREFIXES = ("ray_audiogen_", "ray_serve_deployment_", "ray_serve_num_", "ray_serve_http_",
                     "ray_serve_autoscaling_", "ray_serve_multiplexed_", "ray_serve_replica_processing_queries")
AUDIO_ROUTES = frozenset({"/v1/generate", "/v1/continue", "/v1/inpaint"})


class HttpMetrics:
    """ASGI middleware of the ingress: one place records every answer, streamed or not, including requests
    whose client went away (status `cancelled`). Routes outside `routes` count as `other` (bounded label values)."""

    def __init__(self, app: Any, routes: frozenset[str]) -> None:
        self.app = app
        self.routes = routes
        self.requests = metrics.Counter("audiogen_http_requests", description="HTTP requests by route and status",
                                        tag_keys=("route", "status"))
        self.latency = metrics.Histogram("audiogen_http_request_duration_seconds", boundaries=LATENCY_BUCKETS,
                                         description="Request latency to the last byte", tag_keys=("route",))
        self.first_byte = metrics.Histogram("audiogen_time_to_first_audio_seconds", boundaries=LATENCY_BUCKETS,
                                            description="Time to the first audio bytes of 200 answers",
                                            tag_keys=("route",))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        started = time.perf_counter()
        status: int | None = None  # None: no answer started
        first: float | None = None
        complete = False

        async def timed_send(message: dict[str, Any]) -> None:
            nonlocal status, first, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                first = first or (time.perf_counter() if message.get("body") else None)
                complete = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:  # Starlette's outermost middleware turns it into a 500
            status, complete = (500, True) if status is None else (status, complete)
            raise
        finally:  # an answer that never ended: the client left (or the stream broke) before its last byte
            label = str(status) if complete else "cancelled"
            self.requests.inc(tags={"route": route, "status": label})
            self.latency.observe(time.perf_counter() - started, tags={"route": route})
            if complete and status == 200 and first is not None and route in AUDIO_ROUTES:
                self.first_byte.observe(first - started, tags={"route": route})


class EngineMetrics:
    """An engine replica's per-model series, set from `Engine.snapshot()` by the replica's reporting loop."""

    def __init__(self) -> None:
        tags = ("model",)
        self.gauges = {name: metrics.Gauge(f"audiogen_engine_{name}", description=text, tag_keys=tags)
                       for name, text in (("slots_in_use", "Slots decoding a request now"),
                                          ("slots", "Decoding slots of the engine"),
                                          ("queue_depth", "Requests waiting for a slot"),
                                          ("queue_limit", "Requests that may wait for a slot"),
                                          ("alive", "1 while the engine accepts requests"))}
        self.counters = {name: metrics.Counter(f"audiogen_engine_{name}", description=text, tag_keys=tags)
                         for name, text in (("steps", "Decoding steps"),
                                            ("slot_steps", "Slots occupied, summed over steps"),
                                            ("audio_seconds", "Seconds of audio generated"))}
        self._last: dict[str, dict[str, float]] = {}

    def publish(self, model: str, snapshot: EngineSnapshot) -> None:
        tags = {"model": model}
        for name, value in (("slots_in_use", snapshot.busy_slots), ("slots", snapshot.max_slots),
                            ("queue_depth", snapshot.queue_depth), ("queue_limit", snapshot.max_queued),
                            ("alive", int(snapshot.alive))):
            self.gauges[name].set(value, tags=tags)
        totals = {"steps": snapshot.steps, "slot_steps": round(snapshot.mean_occupancy * snapshot.steps),
                  "audio_seconds": snapshot.audio_seconds}
        last = self._last.setdefault(model, dict.fromkeys(totals, 0))
        for name, total in totals.items():
            if total > last[name]:
                self.counters[name].inc(total - last[name], tags=tags)
                last[name] = total


def node_metrics_url() -> str:
    """Where Ray exports this node's metrics (Prometheus text)."""
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def scrape(url: str, timeout_s: float = 5.0) -> str:
    """The app's families of one node's export (blocking: run it in a worker thread)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (Ray's own endpoint)
        text = response.read().decode()
    kept = [line for line in text.splitlines() if re.sub("^# (HELP|TYPE) ", "", line).startswith(EXPORTED_PREFIXES)]
    return "\n".join(kept) + "\n"

"""Autoscaling the engine deployment on its engines' load instead of Serve's count of ongoing requests.

Each engine replica reports `engine_load` (requests in its engines: busy slots + queued) through Serve's
`record_autoscaling_stats` hook; this policy (serve_config.yaml: `autoscaling_config.policy.policy_function`)
asks for enough replicas to bring the load per replica, plus the requests waiting at handles for any replica, to
`target_ongoing_requests`. Serve applies min/max replicas, delays and scaling factors around it. Serve pickles
this module by value into its controller, so it imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

LOAD_KEY = "engine_load"
POLICY = "pipelines.serving.autoscaling:engine_load_policy"


def engine_load_policy(ctx: "AutoscalingContext") -> tuple[float, dict[str, Any]]:
    """Desired replicas = (engine load of every replica + requests queued at handles) / target per replica;
    before any engine has reported, Serve's own request count stands in for the engine load."""
    loads = (ctx.aggregated_metrics or {}).get(LOAD_KEY)
    demand = sum(loads.values()) + (ctx.total_queued_requests or 0) if loads else ctx.total_num_requests
    return demand / ctx.config.get_target_ongoing_requests(), {}

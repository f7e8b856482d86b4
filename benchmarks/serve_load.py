"""HTTP load test of the Serve app (pipelines/serving/): closed-loop clients against 127.0.0.1 for a bounded time.

Each client loops: POST /v1/generate (streamed WAV, so time to first byte is the first audio), read to the end,
repeat, until the time bound or the request budget is spent; after a 503 it pauses `--retry-pause` seconds.
Rows (same model, same engine replica resources):
- `serve (continuous batching)`: the app as deployed (one engine per replica, all its requests share steps), with
  queues deep enough for every client (no 503);
- `serve (1 request per call)`: the baseline, one request per replica call with no batching (max_batch_slots=1,
  max_ongoing_requests=1; the rest waits in Serve's queue);
- `overload (4x capacity)`: the app with its default proportions (engine queue = slots, max_ongoing_requests =
  2 x slots, Serve's queue = slots, so capacity = 3 x slots requests) and 4x as many clients as it holds. Goodput
  counts the audio of 200s only; `share_503` is the share of answers that were 503; latencies are those of the
  admitted (200) requests; `health_*` is GET /healthz, probed every 0.1 s during the run.

    python benchmarks/serve_load.py --clients 8 --seconds 30 --max-requests 200
    python benchmarks/serve_load.py --size small --clients 16 --slots 16      # random weights of a real size

Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import PROMPTS, environment, percentile, print_table, write_json

COLUMNS = ["system", "clients", "requests", "errors", "share_503", "wall_s", "req_per_s", "audio_s_per_s",
           "p50_latency_s", "p99_latency_s", "p50_ttfb_s", "p99_ttfb_s", "max_503_s", "health_p50_s",
           "health_p99_s", "mean_occupancy"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _client(http: Any, index: int, stop_at: float, budget: list[int], args: argparse.Namespace,
                  records: list[dict[str, Any]]) -> None:
    rng = np.random.default_rng(index)
    while time.perf_counter() < stop_at and budget[0] > 0:
        budget[0] -= 1
        duration = round(float(rng.uniform(args.min_clip, args.max_clip)), 2)
        body = {"prompt": PROMPTS[int(rng.integers(len(PROMPTS)))], "duration": duration,
                "seed": int(rng.integers(2**31)), "stream": True}
        started = time.perf_counter()
        first = None
        try:
            async with http.stream("POST", "/v1/generate", json=body) as response:
                async for chunk in response.aiter_raw():
                    if first is None and chunk:
                        first = time.perf_counter()
                status = response.status_code
        except Exception as error:
            status = type(error).__name__
        records.append({"status": status, "duration": duration, "latency": time.perf_counter() - started,
                        "ttfb": None if first is None else first - started})
        if status == 503:
            await asyncio.sleep(args.retry_pause)


async def _prober(http: Any, stop_at: float, latencies: list[float]) -> None:
    """GET /healthz every 0.1 s while the load runs (a timeout counts as its full 10 s)."""
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            ok = (await http.get("/healthz", timeout=10)).status_code == 200
        except Exception:
            ok = False
        latencies.append(time.perf_counter() - started if ok else 10.0)
        await asyncio.sleep(0.1)


async def _load(base: str, clients: int, requests: int, args: argparse.Namespace
                ) -> tuple[list[dict[str, Any]], list[float], float]:
    import httpx

    records: list[dict[str, Any]] = []
    health: list[float] = []
    budget = [requests]
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout, limits=limits) as http:
        started = time.perf_counter()
        stop_at = started + args.seconds
        await asyncio.gather(_prober(http, stop_at, health),
                             *(_client(http, i, stop_at, budget, args, records) for i in range(clients)))
        return records, health, time.perf_counter() - started


def _occupied(base: str) -> tuple[float, float]:
    """(decoding steps, occupied slot-steps) of every engine, from the app's /v1/stats."""
    import httpx

    time.sleep(1.0)  # the engines' state reaches /v1/stats within half a second
    replicas = httpx.get(f"{base}/v1/stats", timeout=30).json()["replicas"]
    engines = [engine for models in replicas.values() for engine in models.values()]
    return sum(e["steps"] for e in engines), sum(e["steps"] * e["mean_occupancy"] for e in engines)


def measure(name: str, app: Any, port: int, clients: int, args: argparse.Namespace, budget: int | None = None
            ) -> dict[str, Any]:
    import httpx
    from ray import serve

    serve.run(app, name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(2):  # warm up (first-call allocations, text encoder caches)
            httpx.post(f"{base}/v1/generate", json={"prompt": "warm up", "duration": 0.5}, timeout=60)
        steps_before, occupied_before = _occupied(base)
        records, health, wall = asyncio.run(_load(base, clients, budget or args.max_requests, args))
        steps_after, occupied_after = _occupied(base)
    finally:
        serve.delete("bench")
    ok = [r for r in records if r["status"] == 200]
    refused = [r for r in records if r["status"] == 503]
    steps = steps_after - steps_before
    return {"system": name, "clients": clients, "requests": len(records),
            "errors": len(records) - len(ok) - len(refused), "share_503": round(len(refused) / len(records), 3),
            "wall_s": round(wall, 2), "req_per_s": round(len(ok) / wall, 3),
            "audio_s_per_s": round(sum(r["duration"] for r in ok) / wall, 3),
            "p50_latency_s": round(percentile([r["latency"] for r in ok], 50), 3),
            "p99_latency_s": round(percentile([r["latency"] for r in ok], 99), 3),
            "p50_ttfb_s": round(percentile([r["ttfb"] for r in ok if r["ttfb"] is not None], 50), 3),
            "p99_ttfb_s": round(percentile([r["ttfb"] for r in ok if r["ttfb"] is not None], 99), 3),
            "max_503_s": round(max((r["latency"] for r in refused), default=float("nan")), 3),
            "health_p50_s": round(percentile(health, 50), 4), "health_p99_s": round(percentile(health, 99), 4),
            "mean_occupancy": round((occupied_after - occupied_before) / steps, 2) if steps else None,
            "error_statuses": sorted({str(r["status"]) for r in records if r["status"] not in (200, 503)})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients (first two rows)")
    parser.add_argument("--seconds", type=float, default=30.0, help="time bound of each row's run")
    parser.add_argument("--max-requests", type=int, default=200, help="request budget of each row's run (the "
                                                                      "overload row: 4x, 503s included)")
    parser.add_argument("--min-clip", type=float, default=1.0, help="shortest clip requested (s)")
    parser.add_argument("--max-clip", type=float, default=4.0, help="longest clip requested (s)")
    parser.add_argument("--slots", type=int, default=8, help="engine slots of the batching app")
    parser.add_argument("--retry-pause", type=float, default=0.25, help="a client's pause after a 503 (s)")
    parser.add_argument("--num-cpus", type=float, default=2, help="CPUs of the (single) engine replica")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="engine threads (default: the replica's CPUs; 1 is steadier on a busy machine)")
    parser.add_argument("--size", default="tiny", choices=["demo", "tiny", "small", "medium", "large"],
                        help="demo: the embedded demo model; tiny: the tiny random model of audiogen.scratch; "
                             "others: random weights of that size")
    parser.add_argument("--model", default=None, help="checkpoint directory (overrides --size)")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--rows", default="batched,unbatched,overload", help="comma-separated rows to run")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/serve_load_<size>_cpu.json")
    args = parser.parse_args()

    import ray
    from ray import serve

    from pipelines.serving.app import ENGINE, make_app

    model_path = args.model
    if model_path is None and args.size != "demo":
        from benchmarks.common import save_random_musicgen, save_tiny_model

        model_path = str(save_tiny_model() if args.size == "tiny" else save_random_musicgen(args.size))
    settings = {"model": model_path, "max_batch_slots": args.slots, "queue_per_engine": 2 * args.clients,
                "request_timeout_s": args.request_timeout, "cpu_threads": args.cpu_threads}
    # the first two rows: every client finds a place (the replica admits slots + queue, Serve queues the rest)
    roomy = {"num_replicas": 1, "ray_actor_options": {"num_cpus": args.num_cpus},
             "max_ongoing_requests": args.slots + 2 * args.clients, "max_queued_requests": 4 * args.clients}
    # the overload row: serve_config.yaml's proportions (8 slots, engine queue 8, max_ongoing 16, Serve queue 8)
    capacity = 3 * args.slots
    overload = ({**settings, "queue_per_engine": args.slots},
                {ENGINE: {**roomy, "max_ongoing_requests": 2 * args.slots, "max_queued_requests": args.slots}})
    rows_wanted = args.rows.split(",")
    port = _free_port()
    ray.init(address="local", num_cpus=max(2, int(np.ceil(args.num_cpus))), include_dashboard=False,
             log_to_driver=False)  # a fresh local instance, whatever else runs on the machine
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if "batched" in rows_wanted:
            rows.append(measure("serve (continuous batching)", make_app(settings, {ENGINE: roomy}), port,
                                args.clients, args))
        if "unbatched" in rows_wanted:
            unbatched = make_app({**settings, "max_batch_slots": 1, "queue_per_engine": 0},
                                 {ENGINE: {**roomy, "max_ongoing_requests": 1}})
            rows.append(measure("serve (1 request per call)", unbatched, port, args.clients, args))
        if "overload" in rows_wanted:
            rows.append(measure(f"overload (4x capacity of {capacity})", make_app(*overload), port,
                                4 * capacity, args, budget=4 * args.max_requests))
    finally:
        serve.shutdown()
        ray.shutdown()
    by_name = {row["system"]: row for row in rows}
    baseline = by_name.get("serve (1 request per call)")
    if baseline and baseline["audio_s_per_s"]:
        for row in rows:
            row["speedup"] = round(row["audio_s_per_s"] / baseline["audio_s_per_s"], 2)
    title = (f"HTTP load: clips {args.min_clip}-{args.max_clip} s, streamed WAV, "
             f"{args.size if args.model is None else args.model} model, 1 engine replica x {args.num_cpus:g} CPU, "
             f"{args.slots} slots")
    table = print_table(title, rows, COLUMNS + (["speedup"] if baseline else []))
    path = Path(args.json or Path(__file__).parent / "results" / f"serve_load_{args.size}_cpu.json")
    write_json(path, {"benchmark": "serve_load", "args": vars(args),
                      "environment": {**environment(), "load_average": os.getloadavg()},
                      "rows": rows, "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

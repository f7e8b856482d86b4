"""HTTP load test of the Serve app: N concurrent clients against 127.0.0.1 for a bounded time.

Each client loops: POST /v1/generate (streamed WAV, so time to first byte is the first audio), read to the end,
repeat, until the time bound or the request budget is spent. Rows (same model, same replica resources):
- `serve (continuous batching)`: the app as deployed (one engine per replica, all its requests share steps);
- `serve (1 request per call)`: the baseline, one request per replica call with no batching
  (`pipelines.serve.unbatched_app`: max_batch_slots=1, max_ongoing_requests=1; the rest waits at the proxy).

    python benchmarks/serve_load.py --clients 8 --seconds 30 --max-requests 200
    python benchmarks/serve_load.py --size small --clients 16 --slots 16      # random weights of a real size

Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import PROMPTS, environment, percentile, print_table, write_json

COLUMNS = ["system", "clients", "requests", "errors", "wall_s", "req_per_s", "audio_s_per_s", "p50_latency_s",
           "p99_latency_s", "p50_ttfb_s", "p99_ttfb_s", "mean_occupancy"]


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
        size = 0
        try:
            async with http.stream("POST", "/v1/generate", json=body) as response:
                async for chunk in response.aiter_raw():
                    if first is None and chunk:
                        first = time.perf_counter()
                    size += len(chunk)
                status = response.status_code
        except Exception as error:
            status = type(error).__name__
        records.append({"status": status, "duration": duration, "latency": time.perf_counter() - started,
                        "ttfb": None if first is None else first - started, "bytes": size})


async def _load(base: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], float]:
    import httpx

    records: list[dict[str, Any]] = []
    budget = [args.max_requests]
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout, limits=limits) as http:
        started = time.perf_counter()
        stop_at = started + args.seconds
        await asyncio.gather(*(_client(http, i, stop_at, budget, args, records) for i in range(args.clients)))
        return records, time.perf_counter() - started


def _stats(base: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{base}/v1/stats", timeout=30).json()


def measure(name: str, app: Any, port: int, args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from ray import serve

    serve.run(app, name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(2):  # warm up (first-call allocations, text encoder caches)
            httpx.post(f"{base}/v1/generate", json={"prompt": "warm up", "duration": 0.5}, timeout=60)
        before = _stats(base)
        records, wall = asyncio.run(_load(base, args))
        after = _stats(base)
    finally:
        serve.delete("bench")
    ok = [r for r in records if r["status"] == 200]
    steps = after["steps"] - before["steps"]
    occupied = after["mean_occupancy"] * after["steps"] - before["mean_occupancy"] * before["steps"]
    return {"system": name, "clients": args.clients, "requests": len(records), "errors": len(records) - len(ok),
            "wall_s": round(wall, 2), "req_per_s": round(len(ok) / wall, 3),
            "audio_s_per_s": round(sum(r["duration"] for r in ok) / wall, 3),
            "p50_latency_s": round(percentile([r["latency"] for r in ok], 50), 3),
            "p99_latency_s": round(percentile([r["latency"] for r in ok], 99), 3),
            "p50_ttfb_s": round(percentile([r["ttfb"] for r in ok if r["ttfb"] is not None], 50), 3),
            "p99_ttfb_s": round(percentile([r["ttfb"] for r in ok if r["ttfb"] is not None], 99), 3),
            "mean_occupancy": round(occupied / steps, 2) if steps else None,
            "error_statuses": sorted({str(r["status"]) for r in records if r["status"] != 200})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="time bound of each system's run")
    parser.add_argument("--max-requests", type=int, default=200, help="request budget of each system's run")
    parser.add_argument("--min-clip", type=float, default=1.0, help="shortest clip requested (s)")
    parser.add_argument("--max-clip", type=float, default=4.0, help="longest clip requested (s)")
    parser.add_argument("--slots", type=int, default=8, help="engine slots of the batching app")
    parser.add_argument("--num-cpus", type=float, default=2, help="CPUs of the (single) replica")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="engine threads (default: the replica's CPUs; 1 is steadier on a busy machine)")
    parser.add_argument("--size", default="tiny", choices=["demo", "tiny", "small", "medium", "large"],
                        help="demo: the embedded demo model; tiny: the tiny random model of audiogen.testing; "
                             "others: random weights of that size")
    parser.add_argument("--model", default=None, help="checkpoint directory (overrides --size)")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--skip-unbatched", action="store_true")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/serve_load_<size>_cpu.json")
    args = parser.parse_args()

    import ray
    from ray import serve

    from pipelines.serve import make_app, unbatched_app

    model_path = args.model
    if model_path is None and args.size != "demo":
        from benchmarks.common import save_random_musicgen, save_tiny_model

        model_path = str(save_tiny_model() if args.size == "tiny" else save_random_musicgen(args.size))
    settings = {"model_path": model_path, "max_batch_slots": args.slots, "max_queued_requests": 2 * args.clients,
                "request_timeout_s": args.request_timeout, "cpu_threads": args.cpu_threads}
    # the replica admits slots + queue; Serve's proxy queue holds any client beyond (no 503 in either run)
    options = {"num_replicas": 1, "ray_actor_options": {"num_cpus": args.num_cpus},
               "max_ongoing_requests": args.slots + 2 * args.clients, "max_queued_requests": 4 * args.clients}
    port = _free_port()
    ray.init(num_cpus=max(2, int(np.ceil(args.num_cpus))), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rows.append(measure("serve (continuous batching)", make_app(settings, options), port, args))
        if not args.skip_unbatched:
            rows.append(measure("serve (1 request per call)", unbatched_app(settings, options), port, args))
    finally:
        serve.shutdown()
        ray.shutdown()
    if len(rows) == 2 and rows[1]["audio_s_per_s"]:
        rows[0]["speedup"] = round(rows[0]["audio_s_per_s"] / rows[1]["audio_s_per_s"], 2)
        rows[1]["speedup"] = 1.0
    title = (f"HTTP load: {args.clients} clients, clips {args.min_clip}-{args.max_clip} s, streamed WAV, "
             f"{args.size if args.model is None else args.model} model, 1 replica x {args.num_cpus:g} CPU")
    table = print_table(title, rows, COLUMNS + (["speedup"] if len(rows) == 2 else []))
    path = Path(args.json or Path(__file__).parent / "results" / f"serve_load_{args.size}_cpu.json")
    import os

    write_json(path, {"benchmark": "serve_load", "args": vars(args),
                      "environment": {**environment(), "load_average": os.getloadavg()},
                      "rows": rows, "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Engine throughput/latency: continuous batching vs static batching (transformers' and our own).

Same weights for every row (a random transformers MusicGen saved with save_pretrained and loaded by audiogen).
Workloads: (a) offline, N requests with durations uniform in [low, high] s, all submitted at once;
(b) online, Poisson arrivals. Rows:
- `audiogen engine`: continuous batching (`Engine`; online requests stream, so their first-audio times are the
  first streamed chunk; offline ones do not stream, as a batch renderer would not); offline also
  `audiogen engine, longest first`, the admission order the batch renderer uses (`admission_order`);
- `transformers static`: `MusicgenForConditionalGeneration.generate`, batches of the same size, each batch
  generating its longest request's length, the next batch formed from what has arrived when it ends;
- `audiogen static`: our model and kernels with the same naive static batching (isolates the scheduling gain).

    python benchmarks/engine.py --size tiny --requests 64 --slots 16
    python benchmarks/engine.py --size small --requests 64 --slots 16 --json benchmarks/results/engine_small_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audiogen import GenerationRequest  # noqa: E402
from audiogen.sampling_params import SamplingParams
from audiogen.engine import Engine  # noqa: E402
from benchmarks.common import (Job, environment, in_fresh_process, load_ours, load_transformers,  # noqa: E402
                               offline_workload, poisson_workload, print_table, save_random_musicgen, summarize,
                               write_json)

COLUMNS = ["system", "requests", "audio_s", "wall_s", "audio_s_per_s", "p50_latency_s", "p99_latency_s",
           "p50_first_audio_s", "steps_per_s", "slot_occupancy"]
FRAME_RATE = 50


def _wait_until(t0: float, at: float) -> None:
    delay = t0 + at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_engine(directory: Path, device: str, dtype: str | None, jobs: list[Job], slots: int, top_k: int,
               stream: bool, admission_order: str = "arrival") -> dict:
    """Continuous batching. With `stream`, every request streams (first-audio = first chunk); without, a clip's
    first audio is the whole clip (what an offline renderer does). `admission_order` as in `Engine`."""
    model = load_ours(directory, device=device, dtype=dtype)
    engine = Engine(model, max_batch_slots=slots, admission_order=admission_order)
    first: dict[int, float] = {}
    lock = threading.Lock()
    try:
        t0 = time.perf_counter()
        handles = []
        for job in jobs:
            _wait_until(t0, job.arrival)

            def on_chunk(chunk, index=job.index):
                if chunk is not None:
                    with lock:
                        first.setdefault(index, time.perf_counter())

            request = GenerationRequest(prompt=job.prompt, duration=job.duration,
                                        sampling=SamplingParams(seed=job.seed, top_k=top_k))
            handles.append(engine.submit(request, on_chunk=on_chunk if stream else None))
        results = [h.result() for h in handles]
        wall = time.perf_counter() - t0
        stats = engine.stats
    finally:
        engine.shutdown()
    latencies = [r.timings.finished - (t0 + j.arrival) for r, j in zip(results, jobs)]
    first_audio = [first[j.index] - (t0 + j.arrival) for j in jobs] if stream else latencies
    label = "audiogen engine" + (" (streaming)" if stream else "") + (
        ", longest first" if admission_order == "longest_first" else "")
    return summarize(label, jobs, wall, latencies, first_audio,
                     steps=stats.steps, occupancy=stats.mean_occupancy / slots)


def _static_batches(jobs: list[Job], batch_size: int, t0: float, run_batch) -> tuple[list[float], int, int]:
    """Drive static batching: a batch is whatever has arrived (up to batch_size) when the previous one ends."""
    pending = sorted(jobs, key=lambda j: j.arrival)
    latencies: dict[int, float] = {}
    steps = frames_used = 0
    while pending:
        now = time.perf_counter() - t0
        ready = [j for j in pending if j.arrival <= now] or [pending[0]]
        batch = ready[:batch_size]
        _wait_until(t0, batch[-1].arrival)
        for job in batch:
            pending.remove(job)
        frames = max(int(j.duration * FRAME_RATE) for j in batch)
        run_batch(batch, frames)
        end = time.perf_counter()
        steps += frames + 3
        frames_used += sum(int(j.duration * FRAME_RATE) for j in batch)
        for job in batch:
            latencies[job.index] = end - (t0 + job.arrival)
    return [latencies[j.index] for j in jobs], steps, frames_used


def run_transformers_static(directory: Path, device: str, dtype: str | None, jobs: list[Job], batch_size: int,
                            top_k: int) -> dict:
    hf, tokenizer = load_transformers(directory, device=device, dtype=dtype)

    def run_batch(batch: list[Job], frames: int) -> None:
        inputs = tokenizer([j.prompt for j in batch], padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            hf.generate(**inputs, do_sample=True, top_k=top_k, guidance_scale=3.0, max_new_tokens=frames + 3)

    t0 = time.perf_counter()
    latencies, steps, _ = _static_batches(jobs, batch_size, t0, run_batch)
    wall = time.perf_counter() - t0
    occupancy = sum(int(j.duration * FRAME_RATE) for j in jobs) / (steps * batch_size)
    return summarize("transformers static", jobs, wall, latencies, latencies, steps=steps, occupancy=occupancy)


def run_our_static(directory: Path, device: str, dtype: str | None, jobs: list[Job], batch_size: int,
                   top_k: int) -> dict:
    model = load_ours(directory, device=device, dtype=dtype)
    engine = Engine(model, max_batch_slots=batch_size)

    def run_batch(batch: list[Job], frames: int) -> None:
        handles = [engine.submit(GenerationRequest(prompt=j.prompt, duration=frames / FRAME_RATE,
                                                   sampling=SamplingParams(seed=j.seed, top_k=top_k))) for j in batch]
        for handle in handles:
            handle.result()

    try:
        t0 = time.perf_counter()
        latencies, steps, _ = _static_batches(jobs, batch_size, t0, run_batch)
        wall = time.perf_counter() - t0
    finally:
        engine.shutdown()
    occupancy = sum(int(j.duration * FRAME_RATE) for j in jobs) / (steps * batch_size)
    return summarize("audiogen static", jobs, wall, latencies, latencies, steps=steps, occupancy=occupancy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "medium", "large"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16, help="engine slots = static batch size")
    parser.add_argument("--min-duration", type=float, default=1.0)
    parser.add_argument("--max-duration", type=float, default=10.0)
    parser.add_argument("--online-rate", type=float, default=None,
                        help="Poisson arrivals per second (default: 70%% of the engine's measured offline rate)")
    parser.add_argument("--online-requests", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformers", "static", "online", "longest-first"])
    parser.add_argument("--json", default=None, help="where to write the results (default benchmarks/results/...)")
    args = parser.parse_args()

    directory = save_random_musicgen(args.size)
    card = 64 if args.size == "tiny" else 2048
    top_k = min(args.top_k, card)
    offline = offline_workload(args.requests, args.min_duration, args.max_duration)
    print(f"# engine benchmark: size={args.size} device={args.device} dtype={args.dtype or 'default'} "
          f"slots={args.slots} requests={args.requests} durations {args.min_duration}-{args.max_duration} s; "
          f"each row in a fresh process", flush=True)
    common = (directory, args.device, args.dtype)

    def measure(workload: list[Job], stream: bool) -> list[dict]:
        rows = [in_fresh_process(run_engine, *common, workload, args.slots, top_k, False)]
        if not stream and "longest-first" not in args.skip:
            rows.append(in_fresh_process(run_engine, *common, workload, args.slots, top_k, False, "longest_first"))
        if stream:
            rows.append(in_fresh_process(run_engine, *common, workload, args.slots, top_k, True))
        if "transformers" not in args.skip:
            rows.append(in_fresh_process(run_transformers_static, *common, workload, args.slots, top_k))
        if "static" not in args.skip:
            rows.append(in_fresh_process(run_our_static, *common, workload, args.slots, top_k))
        _ratios(rows)
        return rows

    rows = measure(offline, stream=False)
    tables = [print_table("offline (all requests at t=0)", rows, COLUMNS + ["speedup_vs_transformers"])]

    online_rows: list[dict] = []
    if "online" not in args.skip:
        rate = args.online_rate or 0.7 * rows[0]["requests"] / rows[0]["wall_s"]
        online = poisson_workload(args.online_requests or args.requests, rate, args.min_duration, args.max_duration)
        online_rows = measure(online, stream=True)
        tables.append(print_table(f"online (Poisson arrivals, {rate:.2f} requests/s)", online_rows,
                                  COLUMNS + ["speedup_vs_transformers"]))
    path = args.json or f"benchmarks/results/engine_{args.size}_{args.device}.json"
    write_json(path, {"benchmark": "engine", "args": vars(args), "environment": environment(),
                      "offline": rows, "online": online_rows, "tables": tables})
    print(f"wrote {path}")


def _ratios(rows: list[dict]) -> None:
    reference = next((r for r in rows if r["system"] == "transformers static"), None)
    for row in rows:
        row["speedup_vs_transformers"] = (round(row["audio_s_per_s"] / reference["audio_s_per_s"], 2)
                                          if reference else None)


if __name__ == "__main__":
    main()

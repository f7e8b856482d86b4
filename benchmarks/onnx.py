"""CPU latency and throughput of the PyTorch and ONNX (onnxruntime) backends through the same engine.

The same weights (`audiogen.scratch.random_model(seed=0, size=SIZE)`: the LM of preset SIZE with the tiny T5 and
EnCodec) are saved in the native format and exported with `export_onnx`; each backend is then measured in a fresh
process (no shared thread pools):
- latency: one request of `--latency-duration` s alone in the engine (median of `--repeats`), with the mean
  time of one engine step (2 cache rows: the request and its CFG branch);
- throughput: `--requests` requests of `--duration` s submitted at once (continuous batching, `--slots` slots):
  wall time, audio seconds per second, mean step time and slot occupancy;
- parity: the greedy codes of the latency request are compared between the backends.
Both backends get the same intra-op thread count (torch's engine thread and onnxruntime's sessions). On a shared
machine other processes disturb single runs, so `--rounds` alternates the two backends and each row keeps its
best round (lowest latency and step times, highest throughput); every round is kept in the JSON.

    python benchmarks/onnx.py                                  # tiny
    python benchmarks/onnx.py --size small --requests 8 --duration 1 --latency-duration 1 --repeats 1
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder leads sys.path and its name would shadow the `onnx` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks.common import environment, in_fresh_process, print_table, write_json  # noqa: E402

COLUMNS = ["size", "backend", "latency_s", "latency_rtf", "step_ms_1req", "throughput_wall_s", "audio_s_per_s",
           "step_ms_batched", "mean_occupancy", "speedup_vs_torch", "codes_equal"]
PROMPTS = ["a dog barking in the rain", "a siren rising and falling", "rain on a tin roof", "a high beep repeating",
           "low rumbling noise fading out", "footsteps on gravel", "a crowd cheering", "church bells ringing"]


def measure(backend: str, directory: str, args: dict) -> dict:
    """One backend in this (fresh) process: warm-up, latency, throughput, greedy codes for the parity check."""
    from audiogen import AudioGen, GenerationRequest, SamplingParams
    from audiogen.engine.cpu import reserve_cores_for_engine

    threads = reserve_cores_for_engine()
    started = time.perf_counter()
    model = AudioGen.from_onnx(directory, threads=threads) if backend == "onnx" else \
        AudioGen.from_pretrained(directory, device="cpu")
    load_s = time.perf_counter() - started
    engine = model.start_engine(max_batch_slots=args["slots"])
    try:
        model.run([GenerationRequest(prompt="warm up", duration=0.2, sampling=SamplingParams(seed=0))])
        latencies, step_ms = [], []
        for repeat in range(args["repeats"]):
            steps, seconds = engine.stats.steps, engine.stats.step_seconds
            t0 = time.perf_counter()
            result = model.run([GenerationRequest(prompt=PROMPTS[0], duration=args["latency_duration"],
                                                  sampling=SamplingParams(temperature=0.0, seed=repeat))])[0]
            latencies.append(time.perf_counter() - t0)
            step_ms.append(1000 * (engine.stats.step_seconds - seconds) / max(1, engine.stats.steps - steps))
        codes = result.codes
        requests = [GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], duration=args["duration"],
                                      sampling=SamplingParams(seed=i))
                    for i in range(args["requests"])]
        steps, seconds, occupied = engine.stats.steps, engine.stats.step_seconds, engine.stats.occupied_slot_steps
        t0 = time.perf_counter()
        results = model.run(requests)
        wall = time.perf_counter() - t0
        batch_steps = max(1, engine.stats.steps - steps)
        audio = sum(r.codes.shape[1] for r in results) / model.frame_rate
        latency = statistics.median(latencies)
        return {"backend": backend, "load_s": round(load_s, 2), "latency_s": round(latency, 3),
                "latency_rtf": round(latency / args["latency_duration"], 3),
                "step_ms_1req": round(statistics.median(step_ms), 2), "throughput_wall_s": round(wall, 2),
                "audio_s_per_s": round(audio / wall, 3),
                "step_ms_batched": round(1000 * (engine.stats.step_seconds - seconds) / batch_steps, 2),
                "mean_occupancy": round((engine.stats.occupied_slot_steps - occupied) / batch_steps, 2),
                "threads": threads, "codes": codes.tolist()}
    finally:
        model.close()


def _best(runs: list[dict]) -> dict:
    """The best value of every metric over the rounds (interference only ever slows a run down)."""
    best = dict(runs[0])
    for key in ("load_s", "latency_s", "latency_rtf", "step_ms_1req", "throughput_wall_s", "step_ms_batched"):
        best[key] = min(run[key] for run in runs)
    best["audio_s_per_s"] = max(run["audio_s_per_s"] for run in runs)
    return best


def prepare(size: str, root: Path) -> tuple[Path, Path, dict]:
    from audiogen.onnx import export_onnx
    from audiogen.scratch import random_model as tiny_model

    model = tiny_model(seed=0, size=size)
    try:
        native = model.save_pretrained(root / "native")
        started = time.perf_counter()
        export_onnx(model, root / "onnx")
        export_s = time.perf_counter() - started
        sizes = {p.name: p.stat().st_size for p in (root / "onnx").iterdir() if p.suffix == ".onnx"}
        info = {"export_s": round(export_s, 1), "onnx_mb": round(sum(sizes.values()) / 2**20, 1),
                "lm_parameters": model.metadata()["parameters"]["lm"]}
    finally:
        model.close()
    return native, root / "onnx", info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["tiny"], choices=["tiny", "small"])
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests for the throughput run")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per throughput request")
    parser.add_argument("--latency-duration", type=float, default=3.0, help="seconds of the latency request")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="latency requests per round (median)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process runs per backend (best kept)")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/onnx_<sizes>_cpu.json")
    args = parser.parse_args()
    options = {k: getattr(args, k) for k in ("requests", "duration", "latency_duration", "slots", "repeats")}
    print(f"# ONNX vs PyTorch backend on CPU: {options}; each backend in a fresh process", flush=True)

    rows, exports, all_runs = [], {}, {}
    for size in args.size:
        root = Path(tempfile.mkdtemp(prefix=f"bench-onnx-{size}-"))
        try:
            native, onnx_dir, exports[size] = prepare(size, root)
            print(f"# {size}: exported in {exports[size]['export_s']} s ({exports[size]['onnx_mb']} MB of .onnx)",
                  flush=True)
            runs: dict[str, list[dict]] = {"torch": [], "onnx": []}
            for round_ in range(args.rounds):
                for backend in ("torch", "onnx") if round_ % 2 == 0 else ("onnx", "torch"):
                    runs[backend].append(in_fresh_process(measure, backend, str(
                        onnx_dir if backend == "onnx" else native), options))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        equal = all(run["codes"] == runs["torch"][0]["codes"] for run in runs["torch"] + runs["onnx"])
        for run in runs["torch"] + runs["onnx"]:
            run.pop("codes")
        all_runs[size] = runs
        torch_row, onnx_row = _best(runs["torch"]), _best(runs["onnx"])
        for row in (torch_row, onnx_row):
            row.update(size=size, codes_equal=equal,
                       speedup_vs_torch=round(row["audio_s_per_s"] / torch_row["audio_s_per_s"], 2))
            rows.append(row)
    table = print_table("ONNX vs PyTorch (CPU)", rows, COLUMNS + ["load_s"])
    path = args.json or f"benchmarks/results/onnx_{'_'.join(args.size)}_cpu.json"
    write_json(path, {"benchmark": "onnx", "args": vars(args), "environment": environment(), "exports": exports,
                      "rows": rows, "rounds": all_runs, "table": table})
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()

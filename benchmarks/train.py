"""Training throughput: scored codebook tokens per second of `pipelines.train` with 1 and 2 Ray Train workers.

Each row is one real `run_train` (TorchTrainer, DDP over gloo on CPU or NCCL on GPU) on random codes from a base
model with AudioGen's codebook layout (4 x 2048 codes, 50 Hz; tiny T5 and codec): throughput is the median of the
reported `tokens_per_s` windows after the first (start-up) window. Tokens = (codebook, frame) targets scored per
second, summed over workers; frames/s = tokens/s / 4.

Sizes: `tiny` (the test preset: dim 64, 2 layers) and `smallish` (preset `small` narrowed to dim 512, 4 layers,
8 heads: ~17 M LM parameters, what 2 CPU cores can train in a benchmark's time). Workers get `--cpus-per-worker`
CPUs each; with 2 workers on a 2-core machine, that is weak scaling at a fixed per-worker batch.

    python benchmarks/train.py                                   # tiny + smallish, 1 and 2 workers, CPU
    python benchmarks/train.py --sizes tiny --workers 1 2 4 --steps 40
    python benchmarks/train.py --use-gpu --sizes smallish small --workers 1 2   # one GPU per worker, bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, print_table, write_json  # noqa: E402

SIZES = {
    "tiny": ("tiny", {}),
    "smallish": ("small", {"dim": 512, "num_layers": 4, "num_heads": 8}),
    "small": ("small", {}),
}
COLUMNS = ["size", "lm_params_m", "workers", "cpus_per_worker", "device", "batch_per_worker", "frames",
           "steps", "tokens_per_s", "frames_per_s", "step_ms", "speedup", "final_loss", "wall_s"]


def make_base(directory: Path) -> Path:
    """A tiny-T5/tiny-codec model with AudioGen's 4 x 2048 codebooks, saved for the workers to load."""
    from audiogen.scratch import random_model as tiny_model
    from audiogen.training import single_thread

    with single_thread():
        model = tiny_model(seed=0, card=2048)
    path = model.save_pretrained(directory / "base")
    model.close()
    return path


def make_codes(directory: Path, base: Path, rows: int, frames: int, seed: int = 0) -> Path:
    import pyarrow.parquet as pq

    from audiogen.codec import Codec
    from pipelines.encode import codes_table

    checksum = Codec.from_pretrained(base / "codec").checksum()
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2048, (rows, 4, frames), dtype=np.int16)
    meta = [dict(id=f"r{i}", segment=0, n_segments=1, caption=f"random sound {i % 50}", path="", split="train",
                 offset=0.0, duration=frames / 50, n_frames=frames) for i in range(rows)]
    (directory / "data" / "codes").mkdir(parents=True, exist_ok=True)
    pq.write_table(codes_table(meta, codes, checksum), directory / "data" / "codes" / "part-0.parquet")
    return directory / "data"


def lm_parameters(size: str) -> float:
    from audiogen.config import AudioGenConfig
    from audiogen.lm import LanguageModel

    preset, overrides = SIZES[size]
    config = AudioGenConfig.preset(preset, card=2048, text_dim=32, top_k=250, **overrides)
    return sum(p.numel() for p in LanguageModel(config).parameters()) / 1e6


def run_one(size: str, workers: int, args: argparse.Namespace, data: Path, base: Path, storage: Path) -> dict:
    from pipelines.train import TrainOptions, run_train

    preset, overrides = SIZES[size]
    started = time.perf_counter()
    summary = run_train(TrainOptions(
        data=str(data), storage=str(storage), name=f"bench-{size}-{workers}w-{int(time.time())}", preset=preset,
        base=str(base), overrides=overrides, workers=workers, cpus_per_worker=args.cpus_per_worker,
        use_gpu=args.use_gpu, batch_size=args.batch_size, max_steps=args.steps, log_every=args.log_every,
        eval_every=args.steps, val_fraction=0.0, shuffle_buffer=0, keep=1,
        training={"lr": 1e-3, "warmup_steps": 5, "schedule": "constant"}))
    wall = time.perf_counter() - started
    windows = [h for h in summary["history"] if h["step"] > args.log_every]  # skip step 1 and the first window
    # the last window also holds the final checkpoint: use the steady windows before it when there are some
    steady = [h["tokens_per_s"] for h in windows if h["step"] < args.steps] or [h["tokens_per_s"] for h in windows]
    tokens = statistics.median(steady)
    per_step = args.batch_size * workers * 4 * args.frames
    return {"size": size, "lm_params_m": round(lm_parameters(size), 1), "workers": workers,
            "cpus_per_worker": args.cpus_per_worker, "device": "cuda" if args.use_gpu else "cpu",
            "batch_per_worker": args.batch_size, "frames": args.frames, "steps": args.steps,
            "tokens_per_s": round(tokens), "frames_per_s": round(tokens / 4), "step_ms": round(1000 * per_step / tokens, 1),
            "final_loss": round(summary["metrics"]["loss"], 3), "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "smallish"], choices=sorted(SIZES))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (bf16 autocast)")
    parser.add_argument("--batch-size", type=int, default=8, help="segments per worker and step")
    parser.add_argument("--frames", type=int, default=250, help="frames per segment (250 = 5 s at 50 Hz)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--json", default=None, help="default: benchmarks/results/train_<device>.json")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    rows = []
    with tempfile.TemporaryDirectory(prefix="audiogen-train-bench-") as tmp:
        tmp_path = Path(tmp)
        base = make_base(tmp_path)
        needed = args.batch_size * max(args.workers) * (args.steps + 2)
        data = make_codes(tmp_path, base, needed, args.frames)
        for size in args.sizes:
            first = None
            for workers in args.workers:
                row = run_one(size, workers, args, data, base, tmp_path / "runs")
                first = first or row["tokens_per_s"]
                row["speedup"] = round(row["tokens_per_s"] / first, 2)
                rows.append(row)
                print(row, flush=True)
    ray.shutdown()
    device = "gpu" if args.use_gpu else "cpu"
    table = print_table(f"training throughput ({device}, {os.cpu_count()} cores)", rows, COLUMNS)
    path = args.json or f"benchmarks/results/train_{device}.json"
    write_json(path, {"benchmark": "train", "args": vars(args), "environment": environment(), "rows": rows,
                      "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

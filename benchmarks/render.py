"""Batch rendering throughput: this pipeline vs a plain `map_batches` with static batching of the same model.

A mixed-duration manifest (default 1,000 rows, durations uniform in [low, high] s) rendered on a local Ray
instance with the tiny random model of `audiogen.scratch` (`--model` for another checkpoint), to local disk:
- `audiogen render`: `pipelines.render` (async engine actors holding 2-4x their slots in rows, continuous
  batching across batch boundaries, exactly-once commit of audio + metadata);
- `static map_batches`: a plain callable class that generates each Ray Data batch as one static batch (every
  row runs to the batch's longest duration, the next batch starts when it ends) and writes the WAVs.

    python benchmarks/render.py --rows 1000 --actors 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import PROMPTS, environment, print_table, save_tiny_model, write_json  # noqa: E402
from pipelines.render import RenderOptions, run_render  # noqa: E402

FRAME_RATE = 50


def make_manifest(directory: Path, rows: int, low: float, high: float) -> Path:
    rng = np.random.default_rng(0)
    path = directory / "manifest.parquet"
    pq.write_table(pa.table({"id": [f"row-{i:06d}" for i in range(rows)],
                             "prompt": [PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(rows)],
                             "duration": np.round(rng.uniform(low, high, rows), 2), "seed": np.arange(rows)}), path)
    return path


class StaticBatchRenderer:
    """The naive baseline: one static batch per Ray Data batch, padded to its longest clip."""

    def __init__(self, output: str, slots: int, model: str) -> None:
        from audiogen import AudioGen
        from audiogen.engine import Engine
        from audiogen.engine.cpu import reserve_cores_for_engine
        from pipelines.storage import Storage

        reserve_cores_for_engine()
        self.model = AudioGen.from_pretrained(model)
        self.engine = Engine(self.model, max_batch_slots=slots)
        self.storage = Storage(output)

    def __call__(self, batch: dict) -> dict:
        from audiogen import GenerationRequest, SamplingParams
        from audiogen.io import encode_audio

        longest = float(max(batch["duration"]))
        handles = [self.engine.submit(GenerationRequest(prompt=str(p), duration=longest,
                                                        sampling=SamplingParams(seed=int(s))))
                   for p, s in zip(batch["prompt"], batch["seed"])]
        seconds = []
        for handle, row_id, duration in zip(handles, batch["id"], batch["duration"]):
            audio = handle.result().audio[:, :int(duration * self.model.sample_rate)]
            self.storage.write_bytes(f"audio/{row_id}.wav", encode_audio(audio, self.model.sample_rate))
            seconds.append(audio.shape[-1] / self.model.sample_rate)
        return {"id": batch["id"], "audio_seconds": np.array(seconds)}


def run_static(manifest: Path, output: str, actors: int, batch_size: int, model: str) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    started = time.perf_counter()
    results = ray.data.read_parquet(str(manifest)).map_batches(
        StaticBatchRenderer, batch_size=batch_size, fn_constructor_kwargs={"output": output, "slots": batch_size,
                                                                          "model": model},
        compute=ActorPoolStrategy(size=actors), num_cpus=1).take_all()
    wall = time.perf_counter() - started
    return {"rows": len(results), "audio_s": sum(r["audio_seconds"] for r in results), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--min-duration", type=float, default=0.5)
    parser.add_argument("--max-duration", type=float, default=5.0)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="engine slots = static batch size")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the tiny random model)")
    parser.add_argument("--json", default="benchmarks/results/render_tiny_cpu.json")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=max(2, args.actors + 1), include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="bench-render-"))
    manifest = make_manifest(work, args.rows, args.min_duration, args.max_duration)
    model = args.model or str(save_tiny_model())
    print(f"# render benchmark: {args.rows} rows, durations {args.min_duration}-{args.max_duration} s, "
          f"{args.actors} actor(s), batch {args.batch_size}", flush=True)

    summary = run_render(RenderOptions(input=str(manifest), output=str(work / "pipeline"), min_actors=args.actors,
                                       max_actors=args.actors, max_batch_slots=args.batch_size, progress=False,
                                       model=model))
    static = run_static(manifest, str(work / "static"), args.actors, args.batch_size, model)
    rows = [
        {"system": "audiogen render", "rows": summary["rows_rendered"], "audio_s": summary["audio_seconds"],
         "wall_s": summary["wall_seconds"]},
        {"system": "static map_batches", "rows": static["rows"], "audio_s": round(static["audio_s"], 2),
         "wall_s": round(static["wall_s"], 2)},
    ]
    for row in rows:
        row["rows_per_s"] = round(row["rows"] / row["wall_s"], 2)
        row["audio_s_per_s"] = round(row["audio_s"] / row["wall_s"], 2)
        row["speedup"] = round(row["audio_s_per_s"] / (rows[1]["audio_s"] / rows[1]["wall_s"]), 2)
    table = print_table("batch rendering (tiny model, CPU, local disk)", rows,
                        ["system", "rows", "audio_s", "wall_s", "rows_per_s", "audio_s_per_s", "speedup"])
    write_json(args.json, {"benchmark": "render", "args": vars(args), "environment": environment(), "rows": rows,
                           "summary": summary, "table": table})
    print(f"wrote {args.json}")
    ray.shutdown()


if __name__ == "__main__":
    main()

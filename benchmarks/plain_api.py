"""The plain Python API against transformers: what a library user gets without any tuning call.

    python benchmarks/plain_api.py [--prompts 16] [--duration 4] [--repeats 3]

A user writes `AudioGen.from_pretrained(d).generate(prompts, duration=4, top_k=250, guidance_scale=3)` and
nothing else (no `reserve_cores_for_engine`, no engine options). The same weights (a random ~22 M-parameter
transformers MusicGen decoder saved with `save_pretrained`: dim 512, 4 layers, 8 heads, FFN 2048, 4 x 2048
codebooks) are run by:
- `audiogen generate`: `AudioGen.from_pretrained(d).generate(...)` in a fresh process, nothing else called;
- `audiogen generate, cores reserved`: the same after `reserve_cores_for_engine()` (the old way to avoid two
  OpenMP teams; shows the plain call is no longer slower than the tuned one);
- `transformers generate`: `MusicgenForConditionalGeneration.generate(do_sample=True, top_k=250,
  guidance_scale=3)` on the same prompts.
Each system runs in its own fresh process: one warm-up call (2 prompts, 0.2 s), then `--repeats` timed calls;
the table reports the median and the best. Results go to benchmarks/results/plain_api_cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (PROMPTS, environment, in_fresh_process, load_transformers,  # noqa: E402
                               print_table, save_random_musicgen, write_json)

DIMS = {"dim": 512, "num_layers": 4, "num_heads": 8, "ffn_dim": 2048}
FRAME_RATE = 50


def _timed(call, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def run_audiogen(directory: Path, prompts: list[str], duration: float, repeats: int, reserve: bool) -> dict:
    from audiogen import AudioGen

    if reserve:
        from audiogen.engine.cpu import reserve_cores_for_engine

        reserve_cores_for_engine()
    model = AudioGen.from_pretrained(directory, device="cpu")
    model.generate(prompts[:2], duration=0.2, top_k=250, guidance_scale=3.0, seed=0)
    times = _timed(lambda: model.generate(prompts, duration=duration, top_k=250, guidance_scale=3.0, seed=1),
                   repeats)
    parameters = sum(p.numel() for p in model.lm.parameters())
    model.close()
    name = "audiogen generate, cores reserved" if reserve else "audiogen generate"
    return {"system": name, "times": times, "lm_params_m": round(parameters / 1e6, 1)}


def run_transformers(directory: Path, prompts: list[str], duration: float, repeats: int) -> dict:
    hf, tokenizer = load_transformers(directory, device="cpu")

    def generate(batch: list[str], seconds: float) -> None:
        inputs = tokenizer(batch, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hf.generate(**inputs, do_sample=True, top_k=250, guidance_scale=3.0,
                        max_new_tokens=int(seconds * FRAME_RATE) + 3)

    generate(prompts[:2], 0.2)
    times = _timed(lambda: generate(prompts, duration), repeats)
    return {"system": "transformers generate", "times": times,
            "lm_params_m": round(sum(p.numel() for p in hf.decoder.parameters()) / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/plain_api_cpu.json")
    args = parser.parse_args()

    directory = save_random_musicgen("small", dims=DIMS)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    common = (directory, prompts, args.duration, args.repeats)
    rows = [in_fresh_process(run_audiogen, *common, False), in_fresh_process(run_audiogen, *common, True),
            in_fresh_process(run_transformers, *common)]
    reference = statistics.median(rows[-1]["times"])
    for row in rows:
        row["median_s"] = round(statistics.median(row["times"]), 3)
        row["best_s"] = round(min(row["times"]), 3)
        row["audio_s_per_s"] = round(args.prompts * args.duration / row["median_s"], 2)
        row["speedup_vs_transformers"] = round(reference / row["median_s"], 2)
    title = (f"plain API: {args.prompts} prompts x {args.duration} s, top_k 250, guidance 3, CPU "
             f"{torch.get_num_threads()} threads")
    table = print_table(title, rows, ["system", "lm_params_m", "median_s", "best_s", "audio_s_per_s",
                                      "speedup_vs_transformers"])
    write_json(args.json, {"benchmark": "plain_api", "args": vars(args), "dims": DIMS, "environment": environment(),
                           "rows": rows, "table": table})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

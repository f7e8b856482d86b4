"""Batch rendering at manifest scale: this design vs the previous one (a base commit), in the same run.

Each measurement runs `audiogen render` as its own command (`python -m audiogen.cli render ...`, a fresh local
Ray, the tiny random model of `audiogen.scratch`, 0.1 s clips, local disk) with the code of this tree, then with
the code of `--base` checked out into a temporary git worktree:
- time from the command's start to the first committed clip (a metadata part) and the driver's peak RSS, on
  manifests of `--sizes` rows (the command is stopped at its first commit or after `--limit-s`);
- the same on a `--huge`-row manifest, written streaming (the previous design is stopped at `--rss-cap-gb`);
- pipeline overhead: rows/s of a complete render of `--overhead-rows` rows (tiny model, 0.1 s clips, so the
  pipeline's own per-row cost dominates), stopped after `--overhead-limit-s`;
- the wall time of a rerun of that fully committed job (every row skipped as done).

    python benchmarks/render_scale.py                      # 100k + 1M + 10M manifests, 100k-row overhead run

Peak RSS is the kernel's high-water mark (VmHWM) of the driver process, sampled until it exits or is stopped;
the manifest planner of this design (a Ray worker on the driver's node) is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import PROMPTS, environment, print_table, save_tiny_model, write_json  # noqa: E402

CHUNK = 1_000_000


def write_manifest(path: Path, rows: int) -> Path:
    """`rows` rows of (id, prompt, duration 0.1 s, seed), written a million rows at a time (bounded memory)."""
    if path.exists():
        return path
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("duration", pa.float64()),
                        ("seed", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, CHUNK):
            index = np.arange(start, min(rows, start + CHUNK))
            writer.write_table(pa.table({
                "id": [f"row-{i:09d}" for i in index], "prompt": [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in index],
                "duration": np.full(len(index), 0.1), "seed": index}, schema=schema))
    return path


def _status(pid: int, key: str) -> int:
    """A `/proc/<pid>/status` memory field in bytes (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _committed_rows(output: Path) -> int:
    parts = [p for p in (output / "metadata").glob("*.parquet")] if (output / "metadata").is_dir() else []
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts)


def run_command(code: Path, manifest: Path, output: Path, model: Path, *, limit_s: float, stop_at_first_clip: bool,
                rss_cap: int) -> dict:
    """Run `audiogen render` with the code in `code`; watch its output and the driver's memory."""
    command = [sys.executable, "-m", "audiogen.cli", "render", str(manifest), "-o", str(output), "--model",
               str(model), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    load = os.getloadavg()[0]  # the machine's load when the run starts: these figures are only as quiet as it
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, start_new_session=True)
    first_clip = first_audio = None
    peak = planner_peak = 0
    stopped = None
    while process.poll() is None:
        elapsed = time.perf_counter() - started
        peak = max(peak, _status(process.pid, "VmHWM"))
        family = _descendants(process.pid)
        planner_peak = max([planner_peak] + [_status(p, "VmHWM") for p in family if "plan_manifest" in _cmdline(p)])
        if first_audio is None and (output / "audio").is_dir() and any((output / "audio").iterdir()):
            first_audio = elapsed
        if first_clip is None and (output / "metadata").is_dir() and any((output / "metadata").glob("*.parquet")):
            first_clip = elapsed
        if stop_at_first_clip and first_clip is not None:
            stopped = "first clip committed"
        elif elapsed > limit_s:
            stopped = f"time limit {limit_s:.0f} s"
        elif peak > rss_cap:
            stopped = f"driver RSS cap {rss_cap / 2**30:.1f} GiB"
        if stopped:
            for pid in [process.pid, *family]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        time.sleep(0.25)
    out, _ = process.communicate()
    wall = time.perf_counter() - started
    summary = None
    if stopped is None and out.strip():
        try:
            summary = json.loads(out[out.index("{"):])
        except ValueError:
            summary = None
    return {"wall_s": round(wall, 2), "first_clip_s": None if first_clip is None else round(first_clip, 2),
            "first_audio_s": None if first_audio is None else round(first_audio, 2),
            "driver_peak_rss_mb": round(peak / 2**20), "planner_peak_rss_mb": round(planner_peak / 2**20) or None,
            "stopped": stopped, "returncode": process.returncode, "committed_rows": _committed_rows(output),
            "load_average_at_start": round(load, 2), "summary": summary}


def base_worktree(base: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="render-base-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(directory), base], check=True,
                   capture_output=True)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="manifest sizes for time to first clip")
    parser.add_argument("--huge", type=int, default=10_000_000, help="a manifest written streaming (0 = skip)")
    parser.add_argument("--overhead-rows", type=int, default=100_000, help="rows of the complete render (0 = skip)")
    parser.add_argument("--limit-s", type=float, default=300, help="stop a first-clip run after this long")
    parser.add_argument("--overhead-limit-s", type=float, default=3600, help="stop a complete render after this long")
    parser.add_argument("--rss-cap-gb", type=float, default=5.0, help="stop a run whose driver exceeds this RSS")
    parser.add_argument("--base", default="8519c97", help="commit of the previous design")
    parser.add_argument("--work", default=None, help="directory for manifests and outputs (default: a temp dir)")
    parser.add_argument("--json", default="benchmarks/results/render_scale.json")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-render-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = save_tiny_model()
    base = base_worktree(args.base)
    designs = {"this design": ROOT, f"previous ({args.base})": base}
    cap = int(args.rss_cap_gb * 2**30)
    runs: list[dict] = []
    rows: list[dict] = []

    def measure(measure: str, size: int, manifest: Path, **kwargs) -> dict[str, dict]:
        results = {}
        for name, code in designs.items():
            output = work / f"out-{measure.split()[0]}-{size}-{'new' if code == ROOT else 'base'}"
            print(f"# {measure}, {size:,} rows, {name} ...", flush=True)
            results[name] = run_command(code, manifest, output, model, rss_cap=cap, **kwargs)
            results[name]["output"] = str(output)
            runs.append({"measure": measure, "rows": size, "design": name, **results[name]})
            print(f"  {json.dumps({k: v for k, v in results[name].items() if k != 'summary'})}", flush=True)
        return results

    def figure(result: dict, key: str, unit: str = "") -> str:
        value = result[key]
        if value is None:
            return f"none ({result['stopped']} at {result['wall_s']:.0f} s)" if result["stopped"] else "none"
        return f"{value}{unit}"

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s] + ([args.huge] if args.huge else [])
        for size in sizes:
            manifest = write_manifest(work / f"manifest-{size}.parquet", size)
            results = measure("first clip", size, manifest, limit_s=args.limit_s, stop_at_first_clip=True)
            rows.append({"measure": "first committed clip", "rows": size,
                         **{name: figure(r, "first_clip_s", " s") for name, r in results.items()}})
            rows.append({"measure": "driver peak RSS", "rows": size,
                         **{name: f"{r['driver_peak_rss_mb']} MB" for name, r in results.items()}})
            rows.append({"measure": "planner peak RSS", "rows": size,
                         **{name: f"{r['planner_peak_rss_mb']} MB" if r["planner_peak_rss_mb"] else "-"
                            for name, r in results.items()}})
        if args.overhead_rows:
            manifest = write_manifest(work / f"manifest-{args.overhead_rows}.parquet", args.overhead_rows)
            results = measure("complete render", args.overhead_rows, manifest, limit_s=args.overhead_limit_s,
                              stop_at_first_clip=False)
            rows.append({"measure": "pipeline rows/s (0.1 s clips)", "rows": args.overhead_rows,
                         **{name: (f"{r['committed_rows'] / r['wall_s']:.1f}" +
                                   ("" if r["stopped"] is None else f" ({r['committed_rows']:,} rows in "
                                                                    f"{r['wall_s']:.0f} s, stopped)"))
                            for name, r in results.items()}})
            reruns = {}
            for name, code in designs.items():
                if results[name]["stopped"] is not None:
                    reruns[name] = "not run: the first render did not finish"
                    continue
                print(f"# rerun of the committed job, {name} ...", flush=True)
                again = run_command(code, manifest, Path(results[name]["output"]), model, rss_cap=cap,
                                    limit_s=args.overhead_limit_s, stop_at_first_clip=False)
                runs.append({"measure": "rerun skip", "rows": args.overhead_rows, "design": name, **again})
                skipped = (again["summary"] or {}).get("rows_skipped_done")
                reruns[name] = f"{again['wall_s']} s ({skipped:,} skipped)" if skipped is not None \
                    else f"{again['wall_s']} s ({again['stopped'] or 'no summary'})"
            rows.append({"measure": "rerun skipping every committed row", "rows": args.overhead_rows, **reruns})
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    table = print_table("batch rendering at scale (tiny model, 0.1 s clips, local disk)", rows,
                        ["measure", "rows", *designs])
    write_json(args.json, {"benchmark": "render_scale", "args": vars(args), "environment": environment(),
                           "load_average": os.getloadavg(), "rows": rows, "runs": runs, "table": table})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

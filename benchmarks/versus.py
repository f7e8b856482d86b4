"""One benchmark script, this tree against an earlier commit, in the same run ("no slower than before").

    python benchmarks/versus.py --base 9434ae4 --rounds 2 -- engine.py --size tiny --skip online
    python benchmarks/versus.py --base 9434ae4 -- onnx.py --size tiny

The base commit is checked out into a temporary git worktree and each tree runs its own copy of the script (the
same arguments) in a fresh process, alternating this tree and the base for `--rounds` rounds so that a drift in
the machine's load hits both alike. Every row of the scripts' JSON results (lists of dicts named by `system` or
`backend`) is compared on its throughput and time fields: the median over rounds of each tree and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, print_table, write_json  # noqa: E402

HIGHER_IS_BETTER = ("audio_s_per_s", "steps_per_s")
LOWER_IS_BETTER = ("wall_s", "latency_s", "p50_latency_s", "p99_latency_s", "step_ms_1req", "step_ms_batched")


def result_rows(result: dict) -> dict[str, dict]:
    """`{label: row}` for every row of a benchmark's JSON (its lists of dicts named by `system`/`backend`)."""
    found = {}
    for key, value in result.items():
        if isinstance(value, list):
            for row in value:
                if isinstance(row, dict) and (row.get("system") or row.get("backend")):
                    found[f"{key}: {row.get('system') or row.get('backend')}"] = row
    return found


def run_script(tree: Path, script: list[str], output: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, str(tree / "benchmarks" / script[0]), *script[1:], "--json", str(output)],
                   cwd=tree, env=env, check=True)
    return json.loads(output.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="default: benchmarks/results/versus_<script>.json")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT.py [its arguments]")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    scratch = Path(tempfile.mkdtemp(prefix="versus-"))
    base = scratch / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True,
                   capture_output=True)
    trees = {"this tree": ROOT, f"base {args.base}": base}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                print(f"# round {round_ + 1}/{args.rounds}: {name}", flush=True)
                results[name].append(run_script(tree, script, scratch / f"{round_}-{len(results[name])}-"
                                                                        f"{name.split()[0]}.json"))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    (new, old), rows = results.values(), []
    for label in result_rows(new[0]):
        for metric in HIGHER_IS_BETTER + LOWER_IS_BETTER:
            ours = [result_rows(r)[label].get(metric) for r in new if label in result_rows(r)]
            theirs = [result_rows(r)[label].get(metric) for r in old if label in result_rows(r)]
            if not ours or not theirs or None in ours + theirs:
                continue
            a, b = statistics.median(ours), statistics.median(theirs)
            better = (a / b if metric in HIGHER_IS_BETTER else b / a) if a and b else float("nan")
            rows.append({"row": label, "metric": metric, "this tree": round(a, 4), f"base {args.base}": round(b, 4),
                         "this vs base (>1 = better)": round(better, 3)})
    table = print_table(f"{script[0]} {' '.join(script[1:])}: this tree vs {args.base}, median of {args.rounds}",
                        rows, ["row", "metric", *trees, "this vs base (>1 = better)"])
    path = args.json or f"benchmarks/results/versus_{Path(script[0]).stem}.json"
    write_json(path, {"benchmark": "versus", "script": script, "base": args.base, "environment": environment(),
                      "load_average": os.getloadavg(), "rows": rows, "runs": results, "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

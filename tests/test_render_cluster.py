"""Batch rendering on a multi-node local cluster (`ray.cluster_utils.Cluster`): a worker node is removed mid-job
and a new one joins; every row is still committed exactly once.

One Ray per process: the cluster runs in a subprocess (this file run as a script), so it never meets the
session's `ray_local` instance.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROWS = 48


def scenario(work: Path) -> dict:
    """Head (driver, planner, progress actor; no CPUs) + two 1-CPU workers with a render actor each; once some
    rows are committed, the node of one actor is removed and a fresh node is added."""
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.job import progress_actor_name
    from pipelines.render import RenderOptions, run_render
    from pipelines.storage import Storage

    manifest = work / "manifest.parquet"
    pq.write_table(pa.table({"id": [f"n-{i}" for i in range(ROWS)], "prompt": [f"tone {i}" for i in range(ROWS)],
                             "duration": [0.6] * ROWS, "seed": list(range(ROWS))}), manifest)
    output = str(work / "out")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    options = RenderOptions(input=str(manifest), output=output, max_batch_slots=2, part_rows=4, min_actors=2,
                            max_actors=2, num_cpus=0.75, progress=False)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run_render(options)))
    job.start()
    removed, committed_before = None, None
    deadline = time.time() + 240
    while removed is None and job.is_alive() and time.time() < deadline:
        try:
            snapshot = ray.get(ray.get_actor(progress_actor_name(output)).snapshot.remote(), timeout=10)
        except (ValueError, ray.exceptions.RayError):
            snapshot = {"rows": 0, "workers": {}}
        nodes = {w["node_id"] for w in snapshot["workers"].values()}
        victims = [node for node in workers if node.node_id in nodes]
        committed = Storage(output).read_tables("metadata", columns=["id"])
        if snapshot["rows"] >= 4 and victims and committed is not None:
            removed, committed_before = victims[0].node_id, committed.num_rows
            cluster.remove_node(victims[0])
            cluster.add_node(num_cpus=1)
        time.sleep(0.1)
    job.join(timeout=400)
    storage = Storage(output)
    metadata = storage.read_tables("metadata")
    audio_ok = all(hashlib.sha256(storage.read_bytes(f"audio/{row['file']}")).hexdigest() == row["sha256"]
                   for row in metadata.to_pylist())
    report = {"removed": removed, "committed_before": committed_before, "finished": not job.is_alive(),
              "summary": result, "ids": metadata["id"].to_pylist(), "audio": storage.list("audio"),
              "audio_ok": audio_ok}
    ray.shutdown()
    cluster.shutdown()
    return report


@pytest.mark.slow
def test_node_removed_mid_job_every_row_committed_exactly_once(tmp_path):
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=560,
                          env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["removed"], "a worker node holding a render actor was removed while the job ran"
    assert report["committed_before"] < ROWS, "rows were left to render when the node went away"
    assert report["finished"] and report["summary"]["rows_rendered"] == ROWS
    assert sorted(report["ids"]) == sorted(f"n-{i}" for i in range(ROWS)), "every row exactly once"
    assert sorted(report["audio"]) == sorted(f"n-{i}.wav" for i in range(ROWS)) and report["audio_ok"]


if __name__ == "__main__":
    print(json.dumps(scenario(Path(sys.argv[1]))))

"""Job mechanics shared by the Ray pipelines (render, encode, train): starting Ray, deterministic part names, the
JSON summary, placement on the driver's node, the progress actor, and remote models fetched once per node into a
local cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from filelock import FileLock

from audiogen.defaults import resolve_model_spec

MODEL_CACHE = Path("~/.cache/audiogen/models")
OFFLINE_ENV = {"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}  # the runtime env of workers


def ensure_ray(progress: bool | None = None) -> None:
    """Attach to the cluster in RAY_ADDRESS (set inside `ray job submit`), else start a local Ray. Workers never
    reach the Hugging Face hub: weights come from checkpoint directories. `progress` (when given) turns Ray Data's
    progress bars on or off."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, runtime_env=OFFLINE_ENV)
    if progress is not None:
        ray.data.DataContext.get_current().enable_progress_bars = progress


def part_name(keys: list[str]) -> str:
    """Name of a Parquet part from the keys of the rows it holds: a retried task writes the same rows under the
    same name, so it overwrites its part instead of adding a second copy."""
    return "part-" + hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24] + ".parquet"


def write_summary(storage: Any, name: str, summary: dict[str, Any]) -> None:
    storage.write_bytes(name, json.dumps(summary, indent=2, default=str).encode())


def on_driver_node() -> dict[str, str]:
    """A label selector pinning a task or actor to the driver's node: job state that must not be lost with a
    worker node (the manifest planner, the progress actor) lives where the job itself lives."""
    import ray

    return {"ray.io/node-id": ray.get_runtime_context().get_node_id()}


def progress_actor_name(output: str) -> str:
    """One progress actor per output location (two jobs on one cluster never share it)."""
    return "audiogen-job-" + hashlib.sha256(output.encode()).hexdigest()[:16]


class JobProgress:
    """A job's live counts (rows and audio seconds done) and its workers by actor id, pid and node: what an operator
    (or a fault test) needs to find them. Ids, not handles: a handle held here would keep an actor alive after
    Ray Data scales it down. Kept free of model imports, so its worker starts in a blink."""

    def __init__(self) -> None:
        self.rows = 0
        self.audio_seconds = 0.0
        self.workers: dict[str, dict[str, Any]] = {}

    def register(self, actor_id: str, pid: int, node_id: str) -> None:
        self.workers[actor_id] = {"pid": pid, "node_id": node_id}

    def add(self, rows: int, seconds: float) -> None:
        self.rows += rows
        self.audio_seconds += seconds

    def snapshot(self) -> dict[str, Any]:
        return {"rows": self.rows, "audio_seconds": self.audio_seconds, "workers": dict(self.workers)}


def fetch_model(spec: str, storage_options: dict[str, Any] | None = None, *, cache: Path | str = MODEL_CACHE) -> str:
    """A local path for a model spec: `tiny[:SEED]` and local directories as they are, `default` as the embedded
    demo model's directory, a remote directory (`s3://...`, reached with `storage_options`) as a copy in the
    node-local `cache`.

    Several actors on one node may ask at once: one downloads under a file lock into a temporary directory that
    is renamed into place when complete, so nobody ever loads a half-copied model and the download happens once.
    """
    spec = resolve_model_spec(spec)
    if "://" not in spec:  # tiny[:SEED] or a local directory
        return spec
    root = Path(cache).expanduser()
    target = root / hashlib.sha256(spec.encode()).hexdigest()[:16]
    if target.is_dir():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not target.is_dir():
            fs, path = fsspec.core.url_to_fs(spec, **(storage_options or {}))
            if not fs.isdir(path):
                raise FileNotFoundError(f"model directory {spec} does not exist")
            staging = tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".partial", dir=root)
            try:
                fs.get(path.rstrip("/") + "/", staging + "/", recursive=True)
                os.rename(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return str(target)

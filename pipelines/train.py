"""Train or fine-tune the LM on encoded (caption, codes) shards with Ray Train (`TorchTrainer`).

    from-scratch:  LM of a size preset (`tiny`, `small`, ...), freshly initialised; the T5 + tokenizer it is
                   conditioned on and the codec its codes come from are those of `base` (`default`: the embedded
                   demo model; `tiny`; or a model directory), which also fixes the codebook count, card, rates and
                   text width.
    fine-tune:     `init` is a model directory (any format `AudioGen.from_pretrained` reads): its LM and text
                   projection are trained further, its T5 and codec are kept.

The T5 is frozen in both cases (its outputs are cached per caption on each worker). The math and the loop live in
`audiogen.training` and `audiogen.train_loop`; this module only wires them into Ray:

- data: the `codes/` Parquet shards of `pipelines.encode` (local or `s3://`), read with Ray Data and materialised
  up front (10 s of 4 codebooks is 4 KB), split by the rows' `split` column (`val`/`valid`/`validation`/`test` =
  held out) or else by a hash of the file id (`val_fraction`), so all segments of one file land on the same side.
- workers: `ScalingConfig(num_workers, use_gpu)`; DDP (`prepare_model`) or FSDP2 (`strategy="fsdp"`).
- reports: the loop's rows, summed over the workers, go to `ray.train.report`; evaluation rows (every `eval_every`
  steps) carry the validation loss and a checkpoint in `storage`, keeping the `keep` best by `val_loss` and the
  latest.
- fault tolerance: `FailureConfig(max_failures)` restarts the worker group after a worker dies; every start
  resumes from the latest checkpoint: step counter, optimizer, schedule and the position in the epoch (its local
  shuffle order differs). Rerunning a job with the same `storage` and `name` resumes the same way.
- export: the final (or best) checkpoint + the base's T5 and codec -> `AudioGen.save_pretrained(export)`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from audiogen.config import PRESETS
from audiogen.data.manifest import expand_inputs
from audiogen.options import check_choices, option
from audiogen.validation import check_integer
from pipelines.encode import codes_from_arrow
from pipelines.job import OFFLINE_ENV, ensure_ray, fetch_model
from pipelines.storage import arrow_filesystem, storage_options_field

log = logging.getLogger(__name__)

VAL_SPLITS = frozenset({"val", "valid", "validation", "test"})
DATA_COLUMNS = ["id", "caption", "split", "n_frames", "codes"]


@dataclass
class TrainOptions:
    """The train command's options (the CLI is generated from these fields' `help`/`choices` metadata)."""

    data: str = option(help="output of `audiogen encode` (its codes/ is used) or codes Parquet file(s), "
                            "prefix or glob; local or s3://")
    storage: str = option(help="Ray Train storage for checkpoints: local directory or s3://bucket/prefix")
    name: str = option("audiogen-train", help="run name; rerunning a name in the same storage resumes it")
    preset: str | None = option(None, choices=PRESETS, help="train from scratch: LM size preset")
    init: str | None = option(None, help="fine-tune this model directory (any format AudioGen reads)")
    base: str = option("default", help="from scratch: the model whose T5, tokenizer and codec (that of the data) "
                                       "are used: 'default' (embedded demo), 'tiny[:SEED]' or a model directory")
    overrides: dict[str, Any] = option(factory=dict, help="model config fields of a from-scratch LM, e.g. dim=256")
    training: dict[str, Any] = option(factory=dict, help="audiogen.training.TrainingConfig fields (lr, schedule, "
                                                         "...); warmup_steps default: min(3000, max_steps // 10)")
    workers: int = option(2, help="Ray Train workers (data parallel)")
    use_gpu: bool = option(False, help="one GPU per worker (bf16 autocast)")
    cpus_per_worker: float = option(1.0, help="CPUs per worker (on CPU also its torch threads)")
    strategy: str = option("ddp", choices=("ddp", "fsdp"), help="data parallelism: replicas or sharded (FSDP2)")
    batch_size: int = option(16, help="micro-batch per worker")
    max_steps: int = option(1000, help="optimizer steps")
    log_every: int = option(10, help="report interval (steps): means over the window, all workers")
    eval_every: int = option(100, help="validation + checkpoint interval (steps)")
    max_val_batches: int | None = option(None, help="validation batches per worker and evaluation (default: all)")
    keep: int = option(3, help="checkpoints kept: the best by val_loss, plus always the latest")
    max_failures: int = option(2, help="worker-group restarts after a worker dies, each from the latest checkpoint "
                                       "(absorbs lost nodes; a crash that repeats still fails the run)")
    val_fraction: float = option(0.05, help="held-out fraction of files (by id hash) when rows have no split")
    val_data: str | None = option(None, help="a separate held-out set (then all of `data` is training)")
    max_frames: int | None = option(None, help="crop segments to this many frames")
    shuffle_buffer: int = option(256, help="rows in each worker's local shuffle buffer (0: no shuffling)")
    materialize: bool = option(True, help="read the (small) codes once, up front, instead of streaming them")
    skip_codec_check: bool = option(False, help="train even if the codes come from another codec than base's")
    export: str | None = option(None, help="save_pretrained destination of the trained model (local or s3://)")
    export_best: bool = option(False, help="export the best checkpoint by val_loss instead of the final one")
    storage_options: dict[str, Any] = storage_options_field()
    seed: int = option(0, help="seed of initialisation, shuffling and condition dropout")

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.init is None):
            raise ValueError("give exactly one of preset (train from scratch) or init (fine-tune a model)")
        if self.init is not None and self.overrides:
            raise ValueError("model config overrides only apply to from-scratch training (preset)")
        check_choices(self)
        for name in ("workers", "batch_size", "max_steps", "log_every", "eval_every", "keep"):
            check_integer(name, getattr(self, name), low=1, high=None)
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def model_spec(self) -> str:
        return self.init if self.init is not None else self.base

    def training_config(self) -> Any:
        from audiogen.training import TrainingConfig

        values = {"max_steps": self.max_steps, "seed": self.seed, "warmup_steps": min(3000, self.max_steps // 10),
                  **self.training}
        return TrainingConfig.from_dict(values)


# ---------------------------------------------------------------------------------------------------- Data
def data_files(url: str, storage_options: dict[str, Any]) -> tuple[Any, list[str]]:
    """The codes shards under `url` (its `codes/` when it is an encode output, else the Parquet files it names) as
    (pyarrow filesystem, paths on it), what Ray Data and pyarrow read."""
    filesystem, path = arrow_filesystem(url, storage_options)
    if filesystem.get_file_info(path.rstrip("/") + "/codes").type == pyarrow.fs.FileType.Directory:
        url = url.rstrip("/") + "/codes"
    return filesystem, expand_inputs(url, storage_options, ".parquet")


def is_val_row(row_id: str, split: str | None, fraction: float) -> bool:
    """A row's `split` label decides; unlabelled rows go by a hash of their file id (all of a file's segments
    land on the same side)."""
    if split:
        return split.strip().lower() in VAL_SPLITS
    digest = int(hashlib.sha256(row_id.encode()).hexdigest()[:12], 16)
    return digest / float(1 << 48) < fraction


def _select(batch: Any, *, val: bool, fraction: float) -> Any:
    keep = [is_val_row(i, s, fraction) == val for i, s in zip(batch["id"].to_pylist(), batch["split"].to_pylist())]
    return batch.filter(pa.array(keep, pa.bool_()))


def read_codes(url: str, storage_options: dict[str, Any]) -> Any:
    import ray

    filesystem, paths = data_files(url, storage_options)
    return ray.data.read_parquet(paths, filesystem=filesystem, columns=DATA_COLUMNS)


def build_datasets(options: TrainOptions) -> dict[str, Any]:
    data = read_codes(options.data, options.storage_options)
    if options.val_data:
        train, val = data, read_codes(options.val_data, options.storage_options)
    else:
        if options.materialize:
            data = data.materialize()  # read once, split twice
        train, val = (data.map_batches(_select, batch_format="pyarrow",
                                       fn_kwargs={"val": held_out, "fraction": options.val_fraction})
                      for held_out in (False, True))
    if options.materialize:
        train, val = train.materialize(), val.materialize()
    datasets = {"train": train}
    if val.count() > 0:
        datasets["val"] = val
    return datasets


# ----------------------------------------------------------------------------------------- The per-worker training loop
def _all_reduce(values: list[float], device: Any) -> list[float]:
    """Element-wise sum over the workers (the `reduce` of `audiogen.train_loop`)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _micro_batches(shard: Any, state: Any, options: TrainOptions, rank: int, position: dict[str, int]) -> Any:
    """Endless micro-batches from this worker's shard, epoch after epoch (an epoch's last incomplete batch is
    dropped). `position` ({"epoch", "batches_in_epoch"}: what a checkpoint records) counts the batches handed out;
    a resumed position skips its epoch's batches already trained on."""
    while True:
        batches = shard.iter_batches(
            batch_size=options.batch_size, batch_format="pyarrow", drop_last=True,
            local_shuffle_buffer_size=options.shuffle_buffer or None,
            local_shuffle_seed=(options.seed * 1_000_003 + position["epoch"] * 1009 + rank)
            if options.shuffle_buffer else None)
        for table in itertools.islice(batches, position["batches_in_epoch"], None):
            position["batches_in_epoch"] += 1
            yield _collate(table, state, options)
        if position["batches_in_epoch"] == 0:
            raise RuntimeError(f"worker {rank} got no training batch: the train split needs at least workers x "
                               f"batch_size rows (batch_size {options.batch_size})")
        position.update(epoch=position["epoch"] + 1, batches_in_epoch=0)


def _collate(table: Any, state: Any, options: TrainOptions) -> Any:
    return state.collate(codes_from_arrow(table["codes"]), table["caption"].to_pylist(),
                         table["n_frames"].to_pylist(), max_frames=options.max_frames)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """`audiogen.train_loop.run` on this worker's shard; the Ray parts are its hooks: rows are all-reduced over
    the workers and go to `ray.train.report`, evaluation rows with a checkpoint (every rank calls it: FSDP gathers
    the full state collectively; rank 0 writes it)."""
    import ray.train
    import ray.train.torch
    import torch

    from audiogen.config import AudioGenConfig
    from audiogen.train_loop import run
    from audiogen.training import (CaptionEncoder, TrainState, build_scratch_module, load_base_model,
                                   load_text_encoder_of, module_from_model, shard_fsdp)

    options: TrainOptions = config["options"]
    model_config = AudioGenConfig.from_dict(config["model_config"])
    training = options.training_config()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(options.cpus_per_worker)))

    spec = fetch_model(options.model_spec, options.storage_options)
    if options.init is not None:  # fine-tune: the model's LM, projection, T5 and tokenizer
        base = load_base_model(spec)
        module = module_from_model(base)
        t5, tokenizer = base.text.t5, base.text.tokenizer
    else:  # from scratch: only the base's T5 and tokenizer
        t5, tokenizer = load_text_encoder_of(spec)
        module = build_scratch_module(model_config, t5.config.d_model, seed=options.seed)
    # DDP through Ray's `prepare_model`; FSDP as torch's `fully_shard` (FSDP2, see `audiogen.training.shard_fsdp`),
    # which runs on CPU/gloo as well as on GPUs (Ray's FSDP1 wrapper refuses CPUs)
    if options.strategy == "fsdp" and world > 1:
        module = shard_fsdp(module.to(device))
    else:
        module = ray.train.torch.prepare_model(module, parallel_strategy="ddp")
    captions = CaptionEncoder(t5, tokenizer, model_config.max_text_tokens, cache_size=training.text_cache_size,
                              device=device)
    state = TrainState(module, captions, training, model_config=model_config,
                       device=device, rank=rank)

    history: list[dict[str, Any]] = []
    position = {"epoch": 0, "batches_in_epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            meta = state.load(directory)
        history = list(meta.get("history", []))
        position.update({key: int(meta.get(key, 0)) for key in position})
    start_step = state.step
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    reduce = functools.partial(_all_reduce, device=device)

    def evaluate() -> dict[str, float]:
        if val_shard is None:
            return {}
        tables = val_shard.iter_batches(batch_size=options.batch_size, batch_format="pyarrow")
        return state.evaluate((_collate(t, state, options) for t in itertools.islice(tables, options.max_val_batches)),
                              reduce)

    def on_row(row: dict[str, Any], evaluated: bool) -> None:
        row.update(epoch=position["epoch"], start_step=start_step, resumed=checkpoint is not None, world_size=world)
        if rank == 0:
            history.append(row)
            log.info("step %d: %s", state.step, json.dumps(row))
        if not evaluated:
            ray.train.report(row)
            return
        with tempfile.TemporaryDirectory(prefix="audiogen-ckpt-") as directory:
            if rank == 0 or options.strategy == "fsdp":  # FSDP gathers the full state collectively
                state.save(directory, write=rank == 0, meta={"history": history, **position, "metrics": row})
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)

    run(state, _micro_batches(ray.train.get_dataset_shard("train"), state, options, rank, position),
        max_steps=options.max_steps, grad_accum=training.grad_accum, log_every=options.log_every,
        eval_every=options.eval_every, on_row=on_row, evaluate=evaluate, reduce=reduce)
    return {"history": history, "start_step": start_step, "step": state.step, "resumed": checkpoint is not None,
            "text_cache": {"hits": captions.hits, "misses": captions.misses}}


# ---------------------------------------------------------------------------------------------------- Driver
def run_train(options: TrainOptions) -> dict[str, Any]:
    """Train (resuming the run `options.name` in `options.storage` if it has checkpoints), export, summarise."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from audiogen.training import load_base_model, scratch_config

    started = time.perf_counter()
    options.training_config()  # validate before starting anything
    ensure_ray()
    base = load_base_model(fetch_model(options.model_spec, options.storage_options))
    model_config = base.config if options.init is not None else scratch_config(
        options.preset, base.config, base.text.text_dim, **options.overrides)
    if not options.skip_codec_check:
        filesystem, paths = data_files(options.data, options.storage_options)
        checksums = set(pq.read_table(paths, filesystem=filesystem, columns=["codec_checksum"])["codec_checksum"]
                        .unique().to_pylist())
        if checksums != {base.codec.checksum()}:
            raise ValueError(f"the codes in {options.data} come from codec(s) {sorted(c[:12] for c in checksums)} "
                             f"but {options.model_spec!r} has codec {base.codec.checksum()[:12]}: encode the data "
                             f"with this model's codec (or pass skip_codec_check)")
    datasets = build_datasets(options)
    rows = datasets["train"].count()
    if rows < options.workers * options.batch_size:
        raise ValueError(f"train split has {rows} rows, fewer than workers x batch_size = "
                         f"{options.workers} x {options.batch_size}")
    score = "val_loss" if "val" in datasets else "loss"
    if "://" in options.storage:
        filesystem, path = arrow_filesystem(options.storage, options.storage_options)
    else:
        filesystem, path = None, os.path.abspath(os.path.expanduser(options.storage))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"options": options, "model_config": model_config.to_dict(), "has_val": "val" in datasets},
        scaling_config=ScalingConfig(num_workers=options.workers, use_gpu=options.use_gpu,
                                     resources_per_worker={"CPU": options.cpus_per_worker}),  # + 1 GPU with use_gpu
        run_config=RunConfig(
            name=options.name, storage_path=path, storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=options.keep, checkpoint_score_attribute=score,
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=options.max_failures), worker_runtime_env=OFFLINE_ENV),
        datasets=datasets)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    returned = result.return_value or {}
    summary: dict[str, Any] = {
        "run_path": result.path, "metrics": result.metrics, "score": score,
        "train_rows": rows, "val_rows": datasets["val"].count() if "val" in datasets else 0,
        "model_config": model_config.to_dict(), "history": returned.get("history", []),
        "start_step": returned.get("start_step"), "resumed": returned.get("resumed"),
        "text_cache": returned.get("text_cache"),
        "checkpoints": [c.path for c, _ in (result.best_checkpoints or [])],
    }
    if options.export:
        checkpoint = result.checkpoint
        if options.export_best and result.best_checkpoints:
            checkpoint = result.get_best_checkpoint(metric=score, mode="min") or checkpoint
        if checkpoint is None:
            raise RuntimeError(f"run {options.name!r} in {options.storage} has no checkpoint to export")
        summary["exported_checkpoint"] = checkpoint.path
        summary["export"] = export_checkpoint(checkpoint, base, options.export, options.storage_options)
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    return summary


def export_checkpoint(checkpoint: Any, base: Any, destination: str, storage_options: dict[str, Any]) -> str:
    """A Ray checkpoint -> `AudioGen.save_pretrained(destination)` (local directory or s3:// prefix)."""
    from audiogen.training import export_model

    with checkpoint.as_directory() as directory:
        model = export_model(directory, base, source={"checkpoint": checkpoint.path})
    try:
        if "://" not in destination:
            return str(model.save_pretrained(destination))
        with tempfile.TemporaryDirectory(prefix="audiogen-export-") as staging:
            local = model.save_pretrained(os.path.join(staging, "model"))
            fs, path = fsspec.core.url_to_fs(destination, **(storage_options or {}))
            fs.put(str(local) + "/", path.rstrip("/") + "/", recursive=True)
        return destination
    finally:
        model.close()

"""Train or fine-tune the LM on encoded (caption, codes) shards with Ray Train (`TorchTrainer`).

    from-scratch:  LM of a size preset (`tiny`, `small`, ...), freshly initialised; the T5 + tokenizer it is
                   conditioned on and the codec its codes come from are those of `base` (`default`: the embedded
                   demo model; `tiny`; or a model directory), which also fixes the codebook count, card, rates and
                   text width.
    fine-tune:     `init` is a model directory (any format `AudioGen.from_pretrained` reads): its LM and text
                   projection are trained further, its T5 and codec are kept.

The T5 is frozen in both cases (its outputs are cached per caption on each worker); the text projection and the
LM train. The math lives in `audiogen.training`; this module only wires it into Ray:

- data: the `codes/` Parquet shards of `pipelines.encode` (local or `s3://`), read with Ray Data and
  materialised up front (codes are small: 10 s of 4 codebooks is 4 KB), split by the rows' `split` column
  (`val`/`valid`/`validation`/`test` = held out) or else by a hash of the file id (`val_fraction`), so all
  segments of one file land on the same side. Workers read their shard with `ray.train.get_dataset_shard`.
- workers: `ScalingConfig(num_workers, use_gpu)`; `prepare_model` wraps DDP (or FSDP with one unit per
  transformer layer, `strategy="fsdp"`, for models that do not fit one device); bf16 autocast on GPU.
- reports: every `log_every` steps the loss (mean over the window, over all workers), per-codebook loss, learning
  rate, grad norm and tokens/s (scored codebook tokens per second, all workers); every `eval_every` steps also the
  validation loss and a checkpoint (`ray.train.report`) to `storage` (local or `s3://`), keeping the `keep` best
  by `val_loss` plus always the latest.
- fault tolerance: `FailureConfig(max_failures)` restarts the worker group after a worker dies; every start
  resumes from the latest checkpoint (`ray.train.get_checkpoint()`): step counter, optimizer, schedule and the
  position in the epoch (approximately: the local shuffle order of the resumed epoch differs). Rerunning a job
  with the same `storage` and `name` resumes the same way.
- export: the final (or best) checkpoint + the base's T5 and codec -> `AudioGen.save_pretrained(export)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

VAL_SPLITS = frozenset({"val", "valid", "validation", "test"})
CRASH_ENV = "AUDIOGEN_TEST_CRASH_AT_STEP"
DATA_COLUMNS = ["id", "caption", "split", "n_frames", "codes"]


@dataclass
class TrainOptions:
    data: str  # encode output (its codes/ is used) or Parquet file(s)/prefix/glob of codes rows
    storage: str  # Ray Train storage: local directory or s3://bucket/prefix
    name: str = "audiogen-train"
    preset: str | None = None  # from scratch: LM size preset
    init: str | None = None  # fine-tune: model to start from
    base: str = "default"  # T5 + tokenizer + codec for from-scratch runs: "default" (the embedded demo model),
    # "tiny[:SEED]" or a model directory
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields (from scratch)
    training: dict[str, Any] = field(default_factory=dict)  # audiogen.training.TrainingConfig fields
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    strategy: str = "ddp"  # "ddp" | "fsdp"
    batch_size: int = 16  # micro-batch per worker
    max_steps: int = 1000
    log_every: int = 10
    eval_every: int = 100  # validation + checkpoint interval (steps)
    max_val_batches: int | None = None  # per worker and evaluation
    keep: int = 3  # checkpoints kept (best by val_loss, plus always the latest)
    max_failures: int = 0
    val_fraction: float = 0.05
    val_data: str | None = None  # a separate held-out set (then `data` is all training)
    max_frames: int | None = None  # crop segments to this many frames
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer (0: no shuffling)
    materialize: bool = True
    skip_codec_check: bool = False
    export: str | None = None  # save_pretrained destination (local or s3://)
    export_best: bool = False  # export the best checkpoint by val_loss instead of the final one
    storage_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    crash_at_step: int | None = None  # test hook: rank 1 exits at this step on a run's first attempt

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.init is None):
            raise ValueError("give exactly one of preset (train from scratch) or init (fine-tune a model)")
        if self.init is not None and self.overrides:
            raise ValueError("model config overrides only apply to from-scratch training (preset)")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be ddp or fsdp, got {self.strategy!r}")
        for name in ("workers", "batch_size", "max_steps", "log_every", "eval_every", "keep"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def model_spec(self) -> str:
        return self.init if self.init is not None else self.base

    def training_config(self) -> Any:
        from audiogen.training import TrainingConfig

        values = dict(self.training)
        values.setdefault("max_steps", self.max_steps)
        values.setdefault("seed", self.seed)
        return TrainingConfig.from_dict(values)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def data_files(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Codes shards under `url`: its `codes/` when it is an encode output, else the Parquet files it names."""
    import fsspec

    from pipelines.storage import expand_inputs

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.isdir(path) and fs.isdir(path.rstrip("/") + "/codes"):
        url = url.rstrip("/") + "/codes"
    files = expand_inputs(url, storage_options, ".parquet")
    return files if "://" not in url else [fs.unstrip_protocol(f) for f in files]  # keep s3:// etc.


def is_val_row(row_id: str, split: str | None, fraction: float) -> bool:
    """A row's `split` label decides; unlabelled rows go by a hash of their file id (all of a file's segments
    land on the same side)."""
    if split:
        return split.strip().lower() in VAL_SPLITS
    digest = int(hashlib.sha256(row_id.encode()).hexdigest()[:12], 16)
    return digest / float(1 << 48) < fraction


def _select(batch: Any, *, val: bool, fraction: float) -> Any:
    import pyarrow as pa

    splits = batch["split"].to_pylist() if "split" in batch.column_names else [None] * batch.num_rows
    keep = [is_val_row(i, s, fraction) == val for i, s in zip(batch["id"].to_pylist(), splits)]
    return batch.filter(pa.array(keep, pa.bool_()))


def read_codes(files: list[str], storage_options: dict[str, Any]) -> Any:
    import ray

    from pipelines.storage import arrow_filesystem

    fs, _ = arrow_filesystem(files[0], storage_options)
    paths = [arrow_filesystem(f, storage_options)[1] for f in files]
    return ray.data.read_parquet(paths, filesystem=fs, columns=DATA_COLUMNS)


def dataset_checksums(files: list[str], storage_options: dict[str, Any]) -> set[str]:
    import fsspec
    import pyarrow.parquet as pq

    checksums: set[str] = set()
    for url in files:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        with fs.open(path, "rb") as handle:
            checksums.update(pq.read_table(handle, columns=["codec_checksum"])["codec_checksum"].unique().to_pylist())
    return checksums


def build_datasets(options: TrainOptions) -> dict[str, Any]:
    files = data_files(options.data, options.storage_options)
    data = read_codes(files, options.storage_options)
    if options.val_data:
        train = data
        val = read_codes(data_files(options.val_data, options.storage_options), options.storage_options)
    else:
        if options.materialize:
            data = data.materialize()  # read once, split twice
        train = data.map_batches(_select, batch_format="pyarrow", fn_kwargs={"val": False,
                                                                           "fraction": options.val_fraction})
        val = data.map_batches(_select, batch_format="pyarrow", fn_kwargs={"val": True,
                                                                         "fraction": options.val_fraction})
    if options.materialize:
        train, val = train.materialize(), val.materialize()
    datasets = {"train": train}
    if val.count() > 0:
        datasets["val"] = val
    return datasets


# ---------------------------------------------------------------------------------------------------------------
# Models on the driver and the workers
# ---------------------------------------------------------------------------------------------------------------
def local_model(spec: str, storage_options: dict[str, Any] | None = None) -> str:
    from pipelines.job import fetch_model as fetch

    return fetch(spec, storage_options)


def model_config_for(options: TrainOptions, base: Any) -> Any:
    from audiogen.training import scratch_config

    if options.init is not None:
        return base.config
    return scratch_config(options.preset, base.config, base.text.text_dim, **options.overrides)


# ---------------------------------------------------------------------------------------------------------------
# The per-worker training loop
# ---------------------------------------------------------------------------------------------------------------
def _all_reduce(values: list[float], device: Any) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _micro_batches(shard: Any, state: Any, options: TrainOptions, epoch: int, rank: int, skip: int):
    from pipelines.encode import codes_from_arrow

    batches = shard.iter_batches(batch_size=options.batch_size, batch_format="pyarrow", drop_last=True,
                                 local_shuffle_buffer_size=options.shuffle_buffer or None,
                                 local_shuffle_seed=(options.seed * 1_000_003 + epoch * 1009 + rank)
                                 if options.shuffle_buffer else None)
    for index, table in enumerate(batches):
        if index < skip:
            continue
        codes = codes_from_arrow(table["codes"])
        yield state.collate(codes, table["caption"].to_pylist(), table["n_frames"].to_pylist(),
                            max_frames=options.max_frames)


def _val_batches(shard: Any, state: Any, options: TrainOptions):
    from pipelines.encode import codes_from_arrow

    for index, table in enumerate(shard.iter_batches(batch_size=options.batch_size, batch_format="pyarrow")):
        if options.max_val_batches is not None and index >= options.max_val_batches:
            break
        yield state.collate(codes_from_arrow(table["codes"]), table["caption"].to_pylist(),
                            table["n_frames"].to_pylist(), max_frames=options.max_frames)


def _prepare(module: Any, options: TrainOptions, device: Any) -> Any:
    """DDP through Ray's `prepare_model`; FSDP as torch's `fully_shard` (FSDP2, see `audiogen.training.shard_fsdp`),
    which runs on CPU/gloo as well as on GPUs (Ray's FSDP1 wrapper refuses CPUs)."""
    import ray.train.torch
    import torch.distributed as dist

    if options.strategy == "fsdp" and dist.is_initialized() and dist.get_world_size() > 1:
        from audiogen.training import shard_fsdp

        return shard_fsdp(module.to(device))
    return ray.train.torch.prepare_model(module, parallel_strategy="ddp")


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch
    import torch

    from audiogen.config import AudioGenConfig
    from audiogen.training import (CaptionEncoder, TrainState, build_scratch_module, load_base_model,
                                   load_text_encoder_of, module_from_model)

    options: TrainOptions = config["options"]
    model_config = AudioGenConfig.from_dict(config["model_config"])
    training = options.training_config()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(options.cpus_per_worker)))

    spec = local_model(options.model_spec, options.storage_options)
    if options.init is not None:  # fine-tune: the model's LM, projection, T5 and tokenizer
        base = load_base_model(spec)
        module = module_from_model(base)
        t5, tokenizer = base.text.t5, base.text.tokenizer
    else:  # from scratch: only the base's T5 and tokenizer
        t5, tokenizer = load_text_encoder_of(spec)
        module = build_scratch_module(model_config, t5.config.d_model, seed=options.seed)
    captions = CaptionEncoder(t5, tokenizer, model_config.max_text_tokens, cache_size=training.text_cache_size,
                              device=device)
    module = _prepare(module, options, device)
    state = TrainState(module, captions, training, model_config=model_config, device=device, rank=rank)

    history: list[dict[str, Any]] = []
    epoch, consumed = 0, 0
    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            meta = state.load(directory)
        history = list(meta.get("history", []))
        epoch, consumed = int(meta.get("epoch", 0)), int(meta.get("batches_in_epoch", 0))
    start_step = state.step
    crash_at = options.crash_at_step if not resumed else None

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "grad_norm": 0.0,
              "per_codebook": [0.0] * model_config.num_codebooks, "started": time.perf_counter()}
    last_val: dict[str, Any] = {}
    pending: list[Any] = []

    def report(step_metrics: dict[str, Any], with_checkpoint: bool) -> None:
        nonlocal window
        k = model_config.num_codebooks
        sums = _all_reduce([window["loss"], window["steps"], window["tokens"], window["grad_norm"],
                            *window["per_codebook"]], device)
        elapsed = time.perf_counter() - window["started"]
        steps = max(sums[1], 1.0)
        metrics: dict[str, Any] = {
            "step": state.step, "epoch": epoch, "loss": sums[0] / steps, "lr": step_metrics["lr"],
            "grad_norm": sums[3] / steps, "tokens_per_s": sums[2] / max(elapsed, 1e-9),
            "start_step": start_step, "resumed": resumed, "world_size": world,
        }
        metrics.update({f"loss_q{i}": sums[4 + i] / steps for i in range(k)})
        if with_checkpoint and val_shard is not None:
            sums_val = state.evaluate(_val_batches(val_shard, state, options))
            reduced = _all_reduce([*sums_val["ce_sum"].tolist(), *sums_val["count"].tolist()], device)
            sums_val["ce_sum"] = torch.tensor(reduced[:k], dtype=torch.float64)
            sums_val["count"] = torch.tensor(reduced[k:], dtype=torch.float64)
            val = state.eval_metrics(sums_val)
            last_val.clear()
            last_val.update({"val_loss": val["val_loss"], "val_tokens": val["val_tokens"]})
            last_val.update({f"val_loss_q{i}": v for i, v in enumerate(val["val_loss_per_codebook"])})
        metrics.update(last_val)
        if rank == 0:
            history.append(dict(metrics))
            log.info("step %d: %s", state.step, json.dumps({k: v for k, v in metrics.items()
                                                            if isinstance(v, (int, float))}, default=str))
        if with_checkpoint:
            with tempfile.TemporaryDirectory(prefix="audiogen-ckpt-") as directory:
                if rank == 0 or options.strategy == "fsdp":  # FSDP gathers the full state collectively
                    state.save(directory, write=rank == 0, meta={
                        "history": history, "epoch": epoch, "batches_in_epoch": consumed,
                        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}})
                ckpt = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)
        window = {"loss": 0.0, "steps": 0, "tokens": 0, "grad_norm": 0.0,
                  "per_codebook": [0.0] * k, "started": time.perf_counter()}

    while state.step < options.max_steps:
        seen = 0
        for batch in _micro_batches(train_shard, state, options, epoch, rank, consumed):
            seen += 1
            consumed += 1
            pending.append(batch)
            if len(pending) < training.grad_accum:
                continue
            step_metrics = state.train_step(pending)
            pending = []
            window["loss"] += step_metrics["loss"]
            window["steps"] += 1
            window["tokens"] += step_metrics["tokens"]
            window["grad_norm"] += step_metrics["grad_norm"]
            window["per_codebook"] = [a + b for a, b in zip(window["per_codebook"], step_metrics["loss_per_codebook"])]
            if crash_at is not None and state.step == crash_at and rank == world - 1 and world > 1:
                # Give the controller time to register the checkpoints reported so far (it polls the workers
                # every couple of seconds), then die like a lost node would.
                log.warning("test hook %s: rank %d exits at step %d", CRASH_ENV, rank, state.step)
                time.sleep(3.0)
                os._exit(1)
            last = state.step >= options.max_steps
            if state.step % options.eval_every == 0 or last:
                report(step_metrics, with_checkpoint=True)
            elif state.step % options.log_every == 0 or state.step == start_step + 1:
                report(step_metrics, with_checkpoint=False)
            if last:
                break
        else:
            if seen == 0 and consumed == 0:
                raise RuntimeError(f"worker {rank} got no training batch: the train split needs at least "
                                   f"workers x batch_size = {world} x {options.batch_size} rows")
            epoch, consumed, pending = epoch + 1, 0, []
            continue
        break
    return {"history": history, "start_step": start_step, "step": state.step, "resumed": resumed,
            "text_cache": {"hits": captions.hits, "misses": captions.misses}}


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def _run_config(options: TrainOptions, score: str) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from pipelines.storage import arrow_filesystem

    if "://" in options.storage:
        filesystem, path = arrow_filesystem(options.storage, options.storage_options)
    else:
        filesystem, path = None, os.path.abspath(os.path.expanduser(options.storage))
    return RunConfig(
        name=options.name, storage_path=path, storage_filesystem=filesystem,
        checkpoint_config=CheckpointConfig(num_to_keep=options.keep, checkpoint_score_attribute=score,
                                           checkpoint_score_order="min"),
        failure_config=FailureConfig(max_failures=options.max_failures),
        worker_runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})


def run_train(options: TrainOptions) -> dict[str, Any]:
    """Train (resuming the run `options.name` in `options.storage` if it has checkpoints), export, summarise."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from audiogen.training import load_base_model

    started = time.perf_counter()
    if options.crash_at_step is None and os.environ.get(CRASH_ENV):
        options.crash_at_step = int(os.environ[CRASH_ENV])
    options.training_config()  # validate before starting anything
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    base = load_base_model(local_model(options.model_spec, options.storage_options))
    model_config = model_config_for(options, base)
    files = data_files(options.data, options.storage_options)
    if not options.skip_codec_check:
        checksums = dataset_checksums(files, options.storage_options)
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
    resources = {"CPU": options.cpus_per_worker}
    if options.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"options": options, "model_config": model_config.to_dict(), "has_val": "val" in datasets},
        scaling_config=ScalingConfig(num_workers=options.workers, use_gpu=options.use_gpu,
                                     resources_per_worker=resources),
        run_config=_run_config(options, score), datasets=datasets)
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
    import fsspec

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


def options_summary(options: TrainOptions) -> dict[str, Any]:
    data = asdict(options)
    data["storage_options"] = sorted(options.storage_options)  # keys only: values may be credentials
    return data

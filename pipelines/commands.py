"""The `audiogen` commands that run on Ray: render, encode, train, serve.

They register with `audiogen.cli` through the `audiogen.commands` entry point (pyproject.toml), so the library's
CLI finds them without importing `pipelines`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from audiogen.cli import add_model_arguments, command
from audiogen.errors import InvalidRequestError


def _storage_options(pairs: list[str]) -> dict[str, object]:
    """`key=value` pairs for fsspec (e.g. endpoint_url=http://127.0.0.1:9000, anon=true)."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequestError("storage-option", f"{pair!r} is not key=value")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def _storage_option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec/s3fs option, repeatable (credentials also come from the usual AWS variables)")


def _render_arguments(parser: argparse.ArgumentParser) -> None:
    from audiogen.cli_options import add_options
    from audiogen.sampling_params import SamplingParams
    from pipelines.render import RenderOptions

    parser.description = ("Exit code: 0 when every manifest row is committed, 1 when some rows failed (their "
                          "errors are in OUTPUT/errors/), 2 for bad arguments or an unreadable manifest.")
    parser.add_argument("input", nargs="?", default=None,
                        help="Parquet manifest: file, directory/prefix or glob, local or s3:// "
                             "(default: the embedded example manifest)")
    parser.add_argument("-o", "--output", default="renders", help="output directory or s3://bucket/prefix")
    add_options(parser, RenderOptions, exclude=("input", "output", "sampling", "storage_options"))
    add_options(parser.add_argument_group("job defaults for rows without a value"), SamplingParams,
                exclude=("seed",))  # a row without a seed gets one from its id
    _storage_option_argument(parser)


@command("render", _render_arguments)
def run_render_command(args: argparse.Namespace) -> int:
    """Render a prompt manifest to audio + metadata with Ray (local, or the cluster in RAY_ADDRESS)."""
    from audiogen.cli_options import from_args
    from audiogen.sampling_params import SamplingParams
    from pipelines.render import RenderOptions, run_render

    try:
        options = from_args(RenderOptions, args, input=args.input or _example_manifest(), output=args.output,
                            sampling=from_args(SamplingParams, args),
                            storage_options=_storage_options(args.storage_option))
        summary = run_render(options)
    except (ValueError, FileNotFoundError) as error:
        print(f"audiogen render: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0 if summary["rows_failed"] == 0 else 1


def _example_manifest() -> str:
    """The embedded example prompts as a Parquet manifest in a temp directory."""
    import tempfile
    from importlib import resources

    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = resources.files("audiogen.data").joinpath("example_prompts.txt").read_text().split("\n")
    prompts = [p.strip() for p in prompts if p.strip()]
    path = Path(tempfile.mkdtemp(prefix="audiogen-example-")) / "example_manifest.parquet"
    pq.write_table(pa.table({"prompt": prompts, "duration": [2.0 + (i % 3) for i in range(len(prompts))]}), path)
    return str(path)


def _encode_arguments(parser: argparse.ArgumentParser) -> None:
    from audiogen.cli_options import add_options
    from pipelines.encode import EncodeOptions

    parser.add_argument("manifest", help="Parquet or JSONL manifest (path/audio, caption, optional id, offset, "
                                         "duration, split), local or s3://")
    parser.add_argument("output", help="output directory or s3://bucket/prefix (codes/, errors/, summary.json)")
    add_options(parser, EncodeOptions, exclude=("manifest", "output", "storage_options"))
    _storage_option_argument(parser)


@command("encode", _encode_arguments)
def run_encode_command(args: argparse.Namespace) -> int:
    """Encode (audio, caption) pairs into codec-token Parquet shards for training, with Ray Data."""
    from audiogen.cli_options import from_args
    from pipelines.encode import EncodeOptions, run_encode

    try:
        summary = run_encode(from_args(EncodeOptions, args, manifest=args.manifest, output=args.output,
                                       storage_options=_storage_options(args.storage_option)))
    except (ValueError, FileNotFoundError) as error:
        print(f"audiogen encode: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="output of `audiogen encode` (or codes Parquet files), local or s3://")
    parser.add_argument("--storage", required=True, help="checkpoints: local directory or s3://bucket/prefix")
    parser.add_argument("--name", default="audiogen-train", help="run name; rerunning a name resumes it")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--preset", help="train from scratch: LM size (tiny, small, medium, large)")
    start.add_argument("--init", help="fine-tune this model directory")
    parser.add_argument("--base", default="default", help="from scratch: the model providing the T5, its tokenizer "
                        "and the codec the data was encoded with: 'default' (the embedded demo model), 'tiny' or a "
                        "model directory")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                        help="model config field for from-scratch runs, e.g. dim=256 or window_duration=10")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (bf16 autocast)")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch per worker")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--schedule", choices=["inverse_sqrt", "cosine", "constant"], default="inverse_sqrt")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: min(3000, max_steps // 10)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--cfg-dropout", type=float, default=0.1)
    parser.add_argument("--cfg-dropout-mode", choices=["sample", "batch"], default="sample")
    parser.add_argument("--loss-weighting", choices=["codebook", "token"], default="codebook")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=100, help="validation + checkpoint interval")
    parser.add_argument("--max-val-batches", type=int, default=None)
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept (best by val_loss + latest)")
    parser.add_argument("--max-failures", type=int, default=2, help="worker-group restarts after failures")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--val-data", default=None, help="separate held-out codes")
    parser.add_argument("--max-frames", type=int, default=None, help="crop segments to this many frames")
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", default=None, help="save_pretrained destination for the final model")
    parser.add_argument("--export-best", action="store_true", help="export the best checkpoint, not the last")
    parser.add_argument("--skip-codec-check", action="store_true")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")


@command("train", _train_arguments)
def run_train_command(args: argparse.Namespace) -> int:
    """Train an LM from scratch or fine-tune one on encoded data with Ray Train (DDP/FSDP, checkpoints)."""
    from pipelines.train import TrainOptions, run_train

    try:
        overrides = {}
        for pair in args.override:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"--override {pair!r} is not KEY=VALUE")
            try:
                overrides[key] = json.loads(value)
            except json.JSONDecodeError:
                overrides[key] = value
        training = {"lr": args.lr, "schedule": args.schedule, "min_lr_ratio": args.min_lr_ratio,
                    "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "grad_accum": args.grad_accum,
                    "cfg_dropout": args.cfg_dropout, "cfg_dropout_mode": args.cfg_dropout_mode,
                    "loss_weighting": args.loss_weighting, "precision": args.precision,
                    "warmup_steps": args.warmup_steps if args.warmup_steps is not None
                    else min(3000, args.max_steps // 10)}
        summary = run_train(TrainOptions(
            data=args.data, storage=args.storage, name=args.name, preset=args.preset, init=args.init,
            base=args.base, overrides=overrides, training=training, workers=args.workers,
            use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, strategy=args.strategy,
            batch_size=args.batch_size, max_steps=args.max_steps, log_every=args.log_every,
            eval_every=args.eval_every, max_val_batches=args.max_val_batches, keep=args.keep,
            max_failures=args.max_failures, val_fraction=args.val_fraction, val_data=args.val_data,
            max_frames=args.max_frames, shuffle_buffer=args.shuffle_buffer, seed=args.seed, export=args.export,
            export_best=args.export_best, skip_codec_check=args.skip_codec_check,
            storage_options=_storage_options(args.storage_option)))
    except (ValueError, FileNotFoundError) as error:
        print(f"audiogen train: error: {error}", file=sys.stderr)
        return 2
    summary.pop("history", None)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="Serve config file (default: ./serve_config.yaml if present); the flags below override it")
    parser.add_argument("--host", default=None, help="listen address (default: the config's, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, else 8000)")
    parser.add_argument("--max-batch-slots", type=int, default=None, help="requests decoded together per replica")
    parser.add_argument("--max-queued-requests", type=int, default=None, help="engine queue per replica (then 503)")
    parser.add_argument("--max-ongoing-requests", type=int, default=None, help="Serve's per-replica limit")
    parser.add_argument("--replicas", type=int, default=None, help="fixed replica count (replaces autoscaling)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs per replica")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica")
    parser.add_argument("--request-timeout", type=float, default=None, help="seconds per request (then 504)")
    add_model_arguments(parser)


@command("serve", _serve_arguments)
def run_serve(args: argparse.Namespace) -> int:
    """Serve the HTTP API on Ray Serve (blocks until Ctrl-C)."""
    from pipelines.serve import run_local

    config = args.config or ("serve_config.yaml" if Path("serve_config.yaml").is_file() else None)
    app_args = {"model_path": args.model, "text_encoder": args.text_encoder, "device": args.device,
                "dtype": args.dtype, "backend": args.backend, "max_batch_slots": args.max_batch_slots,
                "max_queued_requests": args.max_queued_requests, "request_timeout_s": args.request_timeout}
    actor = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    options = {"max_ongoing_requests": args.max_ongoing_requests, "num_replicas": args.replicas,
               "ray_actor_options": {k: v for k, v in actor.items() if v is not None} or None}
    http = {"host": args.host or (None if config else "127.0.0.1"), "port": args.port}
    run_local(config, args={k: v for k, v in app_args.items() if v is not None},
              deployment_options={k: v for k, v in options.items() if v is not None},
              http_options={k: v for k, v in http.items() if v is not None})
    return 0

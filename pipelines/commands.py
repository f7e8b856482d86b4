"""The `audiogen` commands that run on Ray: render, encode, train, serve.

They register with `audiogen.cli` through the `audiogen.commands` entry point (pyproject.toml), so the library's
CLI finds them without importing `pipelines`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from audiogen.cli import command
from audiogen.cli_options import add_options, from_args
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


def _render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", default=None,
                        help="Parquet manifest: file, directory/prefix or glob, local or s3:// "
                             "(default: the embedded example manifest)")
    parser.add_argument("-o", "--output", default="renders", help="output directory or s3://bucket/prefix")
    parser.add_argument("--model", default=None, help="checkpoint directory, local or s3:// (default: embedded)")
    parser.add_argument("--format", default="wav", help="wav, flac or ogg")
    parser.add_argument("--subtype", default=None, help="e.g. PCM_16, PCM_24, FLOAT, VORBIS")
    for name, kind in (("duration", float), ("temperature", float), ("top-k", int), ("top-p", float),
                       ("guidance-scale", float)):
        parser.add_argument(f"--{name}", type=kind, default=None, help=f"job default {name} for rows without one")
    parser.add_argument("--negative-prompt", default=None, help="job default negative prompt")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec/s3fs option, repeatable (credentials also come from the usual AWS variables)")
    parser.add_argument("--min-actors", type=int, default=1)
    parser.add_argument("--max-actors", type=int, default=1)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (0 = CPU actors)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per Ray Data batch / metadata part")
    parser.add_argument("--batches-per-actor", type=int, default=4, help="batches in flight per actor")
    parser.add_argument("--max-batch-slots", type=int, default=16, help="engine slots per actor")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default=None, choices=["torch", "onnx"],
                        help="default: onnx for a directory written by `audiogen export-onnx`, else torch")
    parser.add_argument("--limit", type=int, default=None, help="only the first N manifest rows")
    parser.add_argument("--no-progress", action="store_true")


@command("render", _render_arguments)
def run_render_command(args: argparse.Namespace) -> int:
    """Render a prompt manifest to audio + metadata with Ray (local, or the cluster in RAY_ADDRESS)."""
    from pipelines.manifest import RowDefaults
    from pipelines.render import RenderOptions, run_render

    manifest = args.input or _example_manifest()
    defaults = RowDefaults(negative_prompt=args.negative_prompt, duration=args.duration,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           guidance_scale=args.guidance_scale)
    summary = run_render(RenderOptions(
        input=manifest, output=args.output, model=args.model, format=args.format, subtype=args.subtype,
        defaults=defaults, storage_options=_storage_options(args.storage_option), min_actors=args.min_actors,
        max_actors=args.max_actors, num_cpus=args.num_cpus, num_gpus=args.num_gpus, batch_size=args.batch_size,
        batches_per_actor=args.batches_per_actor, max_batch_slots=args.max_batch_slots, dtype=args.dtype,
        backend=args.backend, limit=args.limit, progress=not args.no_progress))
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
    parser.add_argument("manifest", help="Parquet or JSONL manifest (path/audio, caption, optional id, offset, "
                                         "duration, split), local or s3://")
    parser.add_argument("output", help="output directory or s3://bucket/prefix (codes/, errors/, summary.json)")
    parser.add_argument("--codec", default="default", help="codec: 'default' (the embedded demo model's), 'tiny', "
                                                           "an EnCodec directory or a model directory")
    parser.add_argument("--segment-seconds", type=float, default=10.0)
    last = parser.add_mutually_exclusive_group()
    last.add_argument("--pad-last", dest="pad_last", action="store_true", default=True,
                      help="zero-pad the last short segment and mask its padding in training (default)")
    last.add_argument("--drop-last", dest="pad_last", action="store_false", help="drop the last short segment")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="shortest usable (last) segment")
    parser.add_argument("--silence-db", type=float, default=-60.0, help="segments with a lower peak are dropped")
    parser.add_argument("--max-seconds", type=float, default=None, help="refuse longer files")
    parser.add_argument("--encoders", type=int, default=1, help="codec actors")
    parser.add_argument("--encoder-cpus", type=float, default=1.0)
    parser.add_argument("--encoder-gpus", type=float, default=0.0)
    parser.add_argument("--read-cpus", type=float, default=1.0, help="CPUs per read/resample task")
    parser.add_argument("--read-batch", type=int, default=8, help="files per read task")
    parser.add_argument("--encode-batch", type=int, default=16, help="segments per codec batch and output shard")
    parser.add_argument("--retry-errors", action="store_true", help="read again the files listed in errors/")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")


@command("encode", _encode_arguments)
def run_encode_command(args: argparse.Namespace) -> int:
    """Encode (audio, caption) pairs into codec-token Parquet shards for training, with Ray Data."""
    from pipelines.encode import EncodeOptions, run_encode

    try:
        summary = run_encode(EncodeOptions(
            manifest=args.manifest, output=args.output, codec=args.codec, segment_seconds=args.segment_seconds,
            pad_last=args.pad_last, min_seconds=args.min_seconds, silence_db=args.silence_db,
            max_seconds=args.max_seconds, read_batch=args.read_batch, encode_batch=args.encode_batch,
            encoders=args.encoders, encoder_cpus=args.encoder_cpus, encoder_gpus=args.encoder_gpus,
            read_cpus=args.read_cpus, retry_errors=args.retry_errors,
            storage_options=_storage_options(args.storage_option), progress=not args.no_progress))
    except (ValueError, FileNotFoundError) as error:
        print(f"audiogen encode: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from audiogen.training import TrainingConfig
    from pipelines.train import TrainOptions

    parser.add_argument("data", help=_help(TrainOptions, "data"))
    add_options(parser, TrainOptions, exclude=("data", "training"))
    # TrainingConfig's fields, except those TrainOptions sets itself; warmup's default depends on --max-steps
    add_options(parser.add_argument_group("optimisation"), TrainingConfig, exclude=("max_steps", "seed"),
                defaults={"warmup_steps": None})


@command("train", _train_arguments)
def run_train_command(args: argparse.Namespace) -> int:
    """Train an LM from scratch or fine-tune one on encoded data with Ray Train (DDP/FSDP, checkpoints)."""
    from dataclasses import fields

    from audiogen.training import TrainingConfig
    from pipelines.train import TrainOptions, run_train

    training = {f.name: getattr(args, f.name) for f in fields(TrainingConfig)
                if f.name not in ("max_steps", "seed") and getattr(args, f.name) is not None}
    try:
        summary = run_train(from_args(TrainOptions, args, data=args.data, training=training))
    except (ValueError, FileNotFoundError) as error:
        print(f"audiogen train: error: {error}", file=sys.stderr)
        return 2
    summary.pop("history", None)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _help(cls: type, name: str) -> str:
    """The help text a field of an options dataclass carries (for positional arguments declared by hand)."""
    from dataclasses import fields

    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


class _UnsetFlagsAbsent:
    """What `add_options` adds flags to: the parser, except that a flag left unset stays off the namespace (its
    help still shows the dataclass default), so that the config file's value applies to it."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser

    def add_argument(self, *names: str, **options: object) -> argparse.Action:
        action = self.parser.add_argument(*names, **options)
        action.default = argparse.SUPPRESS
        return action


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.serving.settings import AppSettings, LaunchOptions

    parser.add_argument("--config", default=None, help="Serve config file (default: ./serve_config.yaml if present, "
                                                       "else the same defaults built in); the flags below override it")
    for options in (LaunchOptions, AppSettings):
        add_options(_UnsetFlagsAbsent(parser), options)  # type: ignore[arg-type]


@command("serve", _serve_arguments)
def run_serve(args: argparse.Namespace) -> int:
    """Serve the HTTP API on Ray Serve (blocks until Ctrl-C)."""
    from pipelines.serving.app import ServeConfig, run_local
    from pipelines.serving.settings import AppSettings, LaunchOptions

    path = args.config or ("serve_config.yaml" if Path("serve_config.yaml").is_file() else None)
    config = ServeConfig.read(path) if path else ServeConfig()

    def unless_given(values: dict[str, object]) -> dict[str, object]:
        return {key: value for key, value in values.items() if not hasattr(args, key)}

    settings = from_args(AppSettings, args, **unless_given(AppSettings.from_args(config.args).as_args()))
    launch = from_args(LaunchOptions, args, **unless_given(config.launch_options()))
    run_local(config.with_options(settings, launch))
    return 0

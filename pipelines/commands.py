"""The `audiogen` commands that run on Ray: render, encode, train, serve.

They register with `audiogen.cli` through the `audiogen.commands` entry point (pyproject.toml), so the library's
CLI finds them without importing `pipelines`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from audiogen.cli import command
from audiogen.cli_options import add_options, from_args


def _run_job(name: str, run: Callable[[], dict[str, Any]], exit_code: Callable[[dict[str, Any]], int]) -> int:
    """Run a job; print its summary as JSON. Bad arguments or an unreadable input: a one-line error, exit 2."""
    try:
        summary = run()
    except (ValueError, FileNotFoundError) as error:
        print(f"audiogen {name}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return exit_code(summary)


def _render_arguments(parser: argparse.ArgumentParser) -> None:
    from audiogen.sampling_params import SamplingParams
    from pipelines.render import RenderOptions

    parser.description = ("Exit code: 0 when every manifest row is committed, 1 when some rows failed (their "
                          "errors are in OUTPUT/errors/), 2 for bad arguments or an unreadable manifest.")
    parser.add_argument("input", nargs="?", default=None,
                        help="Parquet manifest: file, directory/prefix or glob, local or s3:// "
                             "(default: the embedded example manifest)")
    parser.add_argument("-o", "--output", default="renders", help="output directory or s3://bucket/prefix")
    add_options(parser, RenderOptions, exclude=("input", "output", "sampling"))
    add_options(parser.add_argument_group("job defaults for rows without a value"), SamplingParams,
                exclude=("seed",))  # a row without a seed gets one from its id


@command("render", _render_arguments)
def run_render_command(args: argparse.Namespace) -> int:
    """Render a prompt manifest to audio + metadata with Ray (local, or the cluster in RAY_ADDRESS)."""
    from audiogen.sampling_params import SamplingParams
    from pipelines.render import RenderOptions, run_render

    return _run_job("render", lambda: run_render(from_args(
        RenderOptions, args, input=args.input or _example_manifest(), output=args.output,
        sampling=from_args(SamplingParams, args))), lambda summary: 0 if summary["rows_failed"] == 0 else 1)


def _example_manifest() -> str:
    """The embedded example prompts as a Parquet manifest in a temp directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = resources.files("audiogen.data").joinpath("example_prompts.txt").read_text().split("\n")
    prompts = [p.strip() for p in prompts if p.strip()]
    path = Path(tempfile.mkdtemp(prefix="audiogen-example-")) / "example_manifest.parquet"
    pq.write_table(pa.table({"prompt": prompts, "duration": [2.0 + (i % 3) for i in range(len(prompts))]}), path)
    return str(path)


def _encode_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.encode import EncodeOptions

    parser.add_argument("manifest", help="Parquet or JSONL manifest (path/audio, caption, optional id, offset, "
                                         "duration, split), local or s3://")
    parser.add_argument("output", help="output directory or s3://bucket/prefix (codes/, errors/, summary.json)")
    add_options(parser, EncodeOptions, exclude=("manifest", "output"))


@command("encode", _encode_arguments)
def run_encode_command(args: argparse.Namespace) -> int:
    """Encode (audio, caption) pairs into codec-token Parquet shards for training, with Ray Data."""
    from pipelines.encode import EncodeOptions, run_encode

    return _run_job("encode", lambda: run_encode(from_args(EncodeOptions, args, manifest=args.manifest,
                                                           output=args.output)), lambda summary: 0)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from audiogen.training import TrainingConfig
    from pipelines.train import TrainOptions

    parser.add_argument("data", help=next(f.metadata["help"] for f in fields(TrainOptions) if f.name == "data"))
    add_options(parser, TrainOptions, exclude=("data", "training"))
    # TrainingConfig's fields, except those TrainOptions sets itself; warmup's default depends on --max-steps
    add_options(parser.add_argument_group("optimisation"), TrainingConfig, exclude=("max_steps", "seed"),
                defaults={"warmup_steps": None})


@command("train", _train_arguments)
def run_train_command(args: argparse.Namespace) -> int:
    """Train an LM from scratch or fine-tune one on encoded data with Ray Train (DDP/FSDP, checkpoints)."""
    from audiogen.training import TrainingConfig
    from pipelines.train import TrainOptions, run_train

    training = {f.name: getattr(args, f.name) for f in fields(TrainingConfig)
                if f.name not in ("max_steps", "seed") and getattr(args, f.name) is not None}

    def train() -> dict[str, Any]:
        summary = run_train(from_args(TrainOptions, args, data=args.data, training=training))
        summary.pop("history", None)  # one row per logging window: in the checkpoint, not on the terminal
        return summary

    return _run_job("train", train, lambda summary: 0)


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.serving.settings import AppSettings, LaunchOptions

    parser.add_argument("--config", default=None, help="Serve config file (default: ./serve_config.yaml if present, "
                                                       "else the same defaults built in); the flags below override it")
    for options in (LaunchOptions, AppSettings):
        add_options(parser, options)
        # an unset flag is None (its help still shows the dataclass default), so the config file's value applies
        parser.set_defaults(**{f.name: None for f in fields(options)})


@command("serve", _serve_arguments)
def run_serve(args: argparse.Namespace) -> int:
    """Serve the HTTP API on Ray Serve (blocks until Ctrl-C)."""
    from pipelines.serving.app import ServeConfig, run_local
    from pipelines.serving.settings import AppSettings, LaunchOptions

    path = args.config or ("serve_config.yaml" if Path("serve_config.yaml").is_file() else None)
    config = ServeConfig.read(path) if path else ServeConfig()

    def unless_given(values: dict[str, object]) -> dict[str, object]:
        return {key: value for key, value in values.items() if getattr(args, key) is None}

    settings = from_args(AppSettings, args, **unless_given(AppSettings.from_args(config.args).as_args()))
    launch = from_args(LaunchOptions, args, **unless_given(config.launch_options()))
    run_local(config.with_options(settings, launch))
    return 0

"""`audiogen` command line: thin wrappers over the library (and, through plugins, the Ray pipelines).

    audiogen generate "a dog barking" -o bark.wav --duration 5 --seed 1 [--model PATH]
    audiogen info [--model PATH]
    audiogen export-onnx MODEL OUT_DIR          # then: audiogen generate ... --model OUT_DIR --backend onnx
    audiogen render | encode | train | serve    # registered by `pipelines.commands` (entry point group
                                                # `audiogen.commands`)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from audiogen.cli_options import add_options, from_args
from audiogen.errors import CheckpointError, InvalidRequestError, MissingCheckpointFileError
from audiogen.sampling_params import SamplingParams

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
    def register(run: Command) -> Command:
        _COMMANDS[name] = (configure, run)
        return run

    return register


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (audiocraft, transformers MusicGen or audiogen format); "
                             "default: the embedded model")
    parser.add_argument("--text-encoder", default=None, help="override the T5 (local dir or cached HF name)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="LM precision (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--backend", default=None, choices=["torch", "onnx"],
                        help="run PyTorch, or onnxruntime on a directory written by `audiogen export-onnx` "
                             "(default: onnx for such a directory, else torch)")


def load_model(args: argparse.Namespace):
    """The model named by --model, or the embedded default, on the backend of --backend."""
    from audiogen.loading import open_model

    return open_model(args.model, backend=args.backend, text_encoder=args.text_encoder, device=args.device,
                      dtype=args.dtype)


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text description of the sound")
    parser.add_argument("-o", "--output", required=True, help="output file (.wav/.flac/.ogg, local or s3://)")
    parser.add_argument("--duration", type=float, default=None, help="seconds (default: the model's default)")
    add_options(parser, SamplingParams)
    parser.add_argument("--normalize", action="store_true", help="peak-normalise to -1 dBFS")
    add_model_arguments(parser)


@command("generate", _generate_arguments)
def run_generate(args: argparse.Namespace) -> int:
    """Generate one clip from a text prompt and write it to a file (local or s3://)."""
    from audiogen.engine import GenerationRequest
    from audiogen.io import peak_normalize, write_audio

    request = GenerationRequest(prompt=args.prompt, duration=args.duration, sampling=from_args(SamplingParams, args))
    with load_model(args) as model:
        result = model.run([request])[0]
    audio = peak_normalize(result.audio) if args.normalize else result.audio
    size = write_audio(args.output, audio, model.sample_rate)
    print(json.dumps({"output": args.output, "seed": result.seed, "duration": result.duration, "bytes": size,
                      "sample_rate": model.sample_rate}))
    return 0


@command("info", add_model_arguments)
def run_info(args: argparse.Namespace) -> int:
    """Print a model's metadata: sizes, parameter count, rates, limits and source checkpoint."""
    with load_model(args) as model:
        print(json.dumps(model.metadata(), indent=2, default=str))
    return 0


def _export_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory (any format --model takes), or `default` for the "
                                      "embedded model")
    parser.add_argument("output", help="directory for text_encoder.onnx, lm_step.onnx, audio_decoder.onnx, the "
                                       "tokenizer and audiogen_onnx.json")
    parser.add_argument("--text-encoder", default=None, help="override the T5 (local dir or cached HF name)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    parser.add_argument("--no-verify", action="store_true", help="skip running the graphs against PyTorch")


@command("export-onnx", _export_onnx_arguments)
def run_export_onnx(args: argparse.Namespace) -> int:
    """Export a model to ONNX: text encoder, LM step and audio decoder graphs, tokenizer and config."""
    from audiogen.loading import open_model
    from audiogen.onnx.export import export_onnx

    with open_model(args.model, backend="torch", text_encoder=args.text_encoder, device="cpu",
                    dtype="float32") as model:
        out = export_onnx(model, args.output, opset=args.opset, verify=not args.no_verify)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(json.dumps({"output": str(out), "files": files}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Import the modules that entry points of group `audiogen.commands` name (the Ray commands of `pipelines`
    # register themselves this way), so this library never imports `pipelines` itself.
    for entry_point in entry_points(group="audiogen.commands"):
        entry_point.load()
    parser = argparse.ArgumentParser(prog="audiogen", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, run) in _COMMANDS.items():
        child = sub.add_parser(name, help=(run.__doc__ or name).splitlines()[0])
        configure(child)
        child.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (InvalidRequestError, CheckpointError, MissingCheckpointFileError) as error:
        print(f"audiogen {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # `python -m audiogen.cli`: run the imported module, where plugins register
    from audiogen.cli import main as imported_main

    sys.exit(imported_main())

"""`audiogen` command line: thin wrappers over the library and the pipelines.

    audiogen generate "a dog barking" -o bark.wav --duration 5 --seed 1 [--model PATH]
    audiogen info [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from audiogen.errors import CheckpointError, InvalidRequestError, MissingCheckpointFileError

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


def load_model(args: argparse.Namespace):
    """The model named by --model, or the embedded default."""
    import torch

    from audiogen.defaults import default_model
    from audiogen.model import AudioGen

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.model is None:
        return default_model(device=args.device, dtype=dtype)
    return AudioGen.from_pretrained(args.model, text_encoder=args.text_encoder, device=args.device, dtype=dtype)


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text description of the sound")
    parser.add_argument("-o", "--output", required=True, help="output file (.wav/.flac/.ogg, local or s3://)")
    parser.add_argument("--duration", type=float, default=None, help="seconds (default: the model's default)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--normalize", action="store_true", help="peak-normalise to -1 dBFS")
    add_model_arguments(parser)


@command("generate", _generate_arguments)
def run_generate(args: argparse.Namespace) -> int:
    from audiogen.engine import GenerationRequest
    from audiogen.io import peak_normalize, write_audio

    model = load_model(args)
    with model:
        result = model.run([GenerationRequest(
            prompt=args.prompt, negative_prompt=args.negative_prompt, duration=args.duration, seed=args.seed,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            guidance_scale=args.guidance_scale)])[0]
    audio = peak_normalize(result.audio) if args.normalize else result.audio
    size = write_audio(args.output, audio, model.sample_rate)
    print(json.dumps({"output": args.output, "seed": result.seed, "duration": result.duration, "bytes": size,
                      "sample_rate": model.sample_rate}))
    return 0


@command("info", add_model_arguments)
def run_info(args: argparse.Namespace) -> int:
    model = load_model(args)
    print(json.dumps(model.metadata(), indent=2, default=str))
    model.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
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


if __name__ == "__main__":
    sys.exit(main())

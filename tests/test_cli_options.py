"""Command-line options generated from dataclasses: one declaration of each option's type, default and help."""

import argparse
from dataclasses import dataclass, field

import pytest

from audiogen.cli_options import add_options, from_args
from audiogen.errors import InvalidRequestError
from audiogen.sampling_params import SamplingParams


@dataclass
class JobOptions:
    input: str
    output: str
    workers: int = field(default=2, metadata={"help": "how many"})
    rate: float | None = None
    fast: bool = False
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    storage_options: dict[str, object] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    betas: tuple[float, float] = (0.9, 0.95)


def parse(argv: list[str]) -> JobOptions:
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    add_options(parser, JobOptions, exclude=("input",))
    args = parser.parse_args([*argv, "--output", "out"] if "--output" not in argv else argv)
    return from_args(JobOptions, args, input=args.input)


def test_defaults_come_from_the_dataclass():
    assert parse(["in.parquet"]) == JobOptions(input="in.parquet", output="out")


def test_every_field_kind_parses():
    options = parse(["x", "--workers", "4", "--rate", "0.5", "--fast", "--mode", "b", "--storage-option",
                     "anon=true", "--storage-option", "endpoint_url=http://h:1", "--storage-option", "retries=3",
                     "--tag", "p", "--tag", "q", "--betas", "0.8", "0.99"])
    assert options == JobOptions(input="x", output="out", workers=4, rate=0.5, fast=True, mode="b",
                                 storage_options={"anon": True, "endpoint_url": "http://h:1", "retries": 3},
                                 tags=("p", "q"), betas=(0.8, 0.99))


def test_bad_values_are_refused_by_the_parser(capsys):
    for argv in (["x", "--workers", "many"], ["x", "--mode", "c"], ["x", "--storage-option", "novalue"]):
        with pytest.raises(SystemExit):
            parse(argv)
    assert "invalid choice" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_options(parser, JobOptions)
    with pytest.raises(SystemExit):
        parser.parse_args([])  # input and output have no default: required
    assert "--input" in capsys.readouterr().err


def test_sampling_flags_build_validated_sampling_params():
    parser = argparse.ArgumentParser()
    add_options(parser, SamplingParams)
    args = parser.parse_args(["--top-k", "50", "--negative-prompt", "hum", "--seed", "9"])
    assert from_args(SamplingParams, args) == SamplingParams(top_k=50, negative_prompt="hum", seed=9)
    with pytest.raises(InvalidRequestError, match="top_p"):
        from_args(SamplingParams, parser.parse_args(["--top-p", "2"]))

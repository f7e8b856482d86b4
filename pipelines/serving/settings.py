"""What an operator sets, declared once: the app's args (`AppSettings`) and the launch options (`LaunchOptions`).

`AppSettings` are the `args:` of serve_config.yaml; `LaunchOptions` are the Serve deployment and HTTP settings the
`audiogen serve` command exposes as flags. Both are dataclasses whose fields become the command's flags
(`audiogen.cli_options`), and the code's defaults are the shipped serve_config.yaml's values (tests/test_serve.py
checks that they agree), so running without a config file gives the same bounded app as running with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from audiogen.errors import InvalidRequestError
from audiogen.options import option
from audiogen.validation import check_integer, check_number

DEFAULT_MODEL_ID = "default"


@dataclass(frozen=True)
class AppSettings:
    """Application args: which models a replica serves and how its engines are sized and bounded."""

    model: str | None = option(None, help=f"checkpoint directory of the model `{DEFAULT_MODEL_ID}` (audiocraft, "
                               "transformers MusicGen, audiogen or ONNX export; default: the embedded model)")
    models: dict[str, str] = option(factory=dict, help="more models by id, ID=DIR: requests choose one with their "
                                                       "`model` field")
    max_models_per_replica: int = option(2, help="models a replica keeps loaded, each with its own engine; the least "
                                                 "recently used is unloaded")
    text_encoder: str | None = option(None, help="override the T5 (local dir or cached HF name)")
    device: str | None = option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    dtype: str | None = option(None, help="LM precision (default: float32 on CPU, bfloat16 on GPU)",
                               choices=["float32", "bfloat16", "float16"])
    backend: str | None = option(None, help="torch or onnx (default: onnx for a directory written by `audiogen "
                                            "export-onnx`)", choices=["torch", "onnx"])
    max_batch_slots: int = option(8, help="requests decoded together by each engine")
    queue_per_engine: int = option(8, help="requests waiting for a slot in each engine; beyond it: 503 + Retry-After")
    compile: bool = option(False, help="torch.compile the decoding step (GPU)")
    cpu_threads: int | None = option(None, help="engine threads on CPU (default: the replica's cores)")
    stream_chunk_frames: int = option(25, help="frames per streamed chunk (50 frames = 1 s)")
    request_timeout_s: float = option(300.0, help="seconds per request, queueing included; then 504 (or the stream "
                                                  "ends)")
    retry_after_s: int = option(2, help="Retry-After of 503 answers")
    max_upload_bytes: int = option(16 * 2**20, help="largest multipart upload accepted")
    max_upload_seconds: float | None = option(None, help="longest uploaded recording (default: the model's "
                                                         "max_duration)")

    def __post_init__(self) -> None:
        for name in ("max_models_per_replica", "max_batch_slots", "stream_chunk_frames", "max_upload_bytes",
                     "cpu_threads"):
            check_integer(name, getattr(self, name), low=1, high=None)  # (None passes)
        for name in ("queue_per_engine", "retry_after_s"):
            check_integer(name, getattr(self, name), low=0, high=None)
        for name in ("request_timeout_s", "max_upload_seconds"):
            check_number(name, getattr(self, name), low=0.0, high=float("inf"), low_open=True, limit="> 0")
        if DEFAULT_MODEL_ID in self.models:
            raise InvalidRequestError("models", f"`{DEFAULT_MODEL_ID}` is the --model option's id",
                                      limit="other ids")

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> AppSettings:
        """From serve_config.yaml's `args:` (a dict): unknown keys are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args or {}) - known)
        if unknown:
            raise InvalidRequestError(unknown[0], "is not an app setting", limit=", ".join(sorted(known)))
        return cls(**(args or {}))

    def model_table(self) -> dict[str, str | None]:
        """Model id -> checkpoint (None: the embedded model)."""
        return {DEFAULT_MODEL_ID: self.model, **self.models}

    def as_args(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LaunchOptions:
    """`audiogen serve` flags for the HTTP listener and the engine deployment (serve_config.yaml's values)."""

    host: str = option("127.0.0.1", help="listen address (0.0.0.0: every interface)")
    port: int = option(8000, help="HTTP port")
    replicas: int | None = option(None, help="fixed engine replica count (default: autoscaling between the config's "
                                             "min and max)")
    max_ongoing_requests: int = option(16, help="requests an engine replica holds (Serve's bound; ~ slots + engine "
                                                "queue)")
    max_queued_requests: int = option(8, help="requests waiting for an engine replica at each caller (Serve's bound); "
                                              "beyond it: 503")
    num_cpus: float = option(2.0, help="CPUs per engine replica")
    num_gpus: float = option(0.0, help="GPUs per engine replica")

    def deployment_options(self) -> dict[str, Any]:
        """The engine deployment's options these flags set."""
        options: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests,
                                   "max_queued_requests": self.max_queued_requests,
                                   "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}
        if self.replicas is not None:
            options["num_replicas"] = self.replicas
        return options

"""One way to open a model for every entry point (CLI commands, render actors, Serve replicas)."""

from __future__ import annotations

from pathlib import Path

from audiogen.errors import InvalidRequestError


def open_model(model: str | None, *, backend: str | None = None, text_encoder: str | None = None,
               device: str | None = None, dtype: str | None = None):
    """Load a model for any command (generate, render actors, serve replicas): `model` is a checkpoint
    directory, an ONNX export directory, or None / `default` (the embedded default); `backend` is "torch", "onnx"
    or None (onnx exactly when `model` is a directory with `audiogen_onnx.json`)."""
    import torch

    from audiogen.defaults import DEFAULT_MODEL, resolve_model_spec
    from audiogen.model import AudioGen

    if backend is None:
        backend = "onnx" if model is not None and (Path(model).expanduser() / "audiogen_onnx.json").is_file() \
            else "torch"
    if backend == "onnx":
        if model is None:
            raise InvalidRequestError("backend", "onnx needs --model DIR, a directory written by "
                                      "`audiogen export-onnx MODEL DIR`")
        for name, value, allowed in (("text-encoder", text_encoder, (None,)), ("device", device, (None, "cpu")),
                                     ("dtype", dtype, (None, "float32"))):
            if value not in allowed:
                raise InvalidRequestError(name, f"{value!r} is not available with --backend onnx",
                                          limit=" or ".join(str(a) for a in allowed if a) or "not set")
        return AudioGen.from_onnx(model)
    if backend != "torch":
        raise InvalidRequestError("backend", f"unknown backend {backend!r}", limit="torch or onnx")
    torch_dtype = getattr(torch, dtype) if dtype else None
    return AudioGen.from_pretrained(resolve_model_spec(model or DEFAULT_MODEL), text_encoder=text_encoder,
                                    device=device, dtype=torch_dtype)

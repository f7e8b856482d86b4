"""Export an `AudioGen` to three ONNX graphs plus its tokenizer and a JSON description.

    audiogen export-onnx MODEL OUT_DIR          # MODEL: a checkpoint directory, or `default`
    export_onnx(model, "out/")                  # from Python

OUT_DIR then holds (the files a runtime without PyTorch loads, as the reference design names them:
`textEncoderPath`, `languageModelPath`, `audioDecoderPath` plus the matching tokenizer):

- `text_encoder.onnx`: input_ids [B, L] int64, attention_mask [B, L] int64 -> text [B, L, dim] (T5 + output
  projection, zero at padding), cross_keys / cross_values [layers, B, heads, L, head_dim] (the LM's
  cross-attention keys/values of that text, computed once per prompt);
- `lm_step.onnx`: tokens [R, K, S] int64, positions [R, S] int64, past_keys / past_values
  [layers, R, heads, T, head_dim], cross_keys / cross_values [layers, R, heads, Lt, head_dim], cross_mask [R, Lt]
  bool -> logits [R, K, card] (last new position), new_keys / new_values [layers, R, heads, S, head_dim]. Past key
  j is visible to row r iff j < positions[r, 0]; new positions attend causally among themselves. S = 1 is a
  decoding step, S = P with a masked one-position past is a prefill;
- `audio_decoder.onnx`: codes [B, K, T] int64 -> audio [B, channels, T * hop] float32;
- the tokenizer files (`tokenizer.save_pretrained`) and `audiogen_onnx.json` (model config, file names, opset,
  rates, stereo layout, input/output names, parameter counts, the source model's checksum).

Every batch, length and row axis is dynamic. Graphs are traced with PyTorch's TorchScript-based exporter
(`torch.onnx.export(..., dynamo=False)`): in torch 2.13 the default `dynamo=True` exporter needs the extra
`onnxscript` package, while the TorchScript one ships with torch and handles these three graphs' dynamic axes
(the step and decoder graphs are traced from the PyTorch model's own code, `LanguageModel.run` and
`Codec.synthesize`, written so that nothing shape-dependent is frozen at trace time). Every file is checked with `onnx.checker` (path-based, so >2 GB models with external data
work too) and, unless `verify=False`, run once with onnxruntime against the PyTorch model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiogen.errors import CheckpointError
from audiogen.onnx.graphs import AudioDecoderGraph, StepGraph, TextEncoderGraph

log = logging.getLogger(__name__)

FORMAT = "audiogen-onnx"
FORMAT_VERSION = 1
META_FILE = "audiogen_onnx.json"
TEXT_ENCODER_FILE = "text_encoder.onnx"
LM_STEP_FILE = "lm_step.onnx"
AUDIO_DECODER_FILE = "audio_decoder.onnx"
DEFAULT_OPSET = 17

TEXT_INPUTS = ["input_ids", "attention_mask"]
TEXT_OUTPUTS = ["text", "cross_keys", "cross_values"]
STEP_INPUTS = ["tokens", "positions", "past_keys", "past_values", "cross_keys", "cross_values", "cross_mask"]
STEP_OUTPUTS = ["logits", "new_keys", "new_values"]
DECODER_INPUTS = ["codes"]
DECODER_OUTPUTS = ["audio"]


def export_onnx(model: Any, directory: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET,
                verify: bool = True) -> Path:
    """Write the ONNX export of `model` (a PyTorch-backed `AudioGen`) into `directory`; returns the directory.

    The model is exported from float32 CPU weights (it is moved there for the export and moved back after).
    """
    import onnx

    if getattr(model, "backend", "torch") != "torch":
        raise CheckpointError("export_onnx needs a PyTorch-backed model (this one already runs on ONNX)")
    if opset < 17:
        raise CheckpointError(f"opset {opset} is too old: the graphs use LayerNormalization (opset >= 17)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = model.device, model.dtype
    model.to(device="cpu", lm_dtype=torch.float32)
    try:
        with torch.inference_mode(False), torch.no_grad():
            _export_text_encoder(model, out / TEXT_ENCODER_FILE, opset)
            _export_step(model, out / LM_STEP_FILE, opset)
            _export_decoder(model, out / AUDIO_DECODER_FILE, opset)
        for name in (TEXT_ENCODER_FILE, LM_STEP_FILE, AUDIO_DECODER_FILE):
            onnx.checker.check_model(str(out / name), full_check=True)
        model.text.tokenizer.save_pretrained(out)
        (out / META_FILE).write_text(json.dumps(_describe(model, opset), indent=2, sort_keys=True) + "\n")
        if verify:
            verify_export(model, out)
        log.info("exported %s to %s", model.config.name, out)
        return out
    finally:
        model.to(device=device, lm_dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
def _trace_export(module: torch.nn.Module, args: tuple[Any, ...], path: Path, opset: int, inputs: list[str],
                  outputs: list[str], axes: dict[str, dict[int, str]]) -> None:
    """Trace `module` into `path`. A graph over protobuf's 2 GB limit gets its weights in one `<name>.data` file
    beside it (the exporter would write one file per tensor, with generated names that the three graphs of one
    directory could share), so each graph is first written into a scratch folder of its own."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-") as scratch:
        traced = Path(scratch) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(module.eval(), args, str(traced), dynamo=False, opset_version=opset,
                              input_names=inputs, output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        if len(list(Path(scratch).iterdir())) == 1:
            os.replace(traced, path)
            return
        import onnx

        proto = onnx.load(str(traced), load_external_data=True)
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)


def _export_text_encoder(model: Any, path: Path, opset: int) -> None:
    t5 = model.text.t5
    previous = t5.config._attn_implementation
    t5.config._attn_implementation = "eager"  # plain matmul/softmax ops (sdpa's mask handling traces poorly)
    try:
        ids = torch.tensor([[5, 6, 7, 1], [8, 1, 0, 0]], dtype=torch.long)
        mask = (ids != 0).long()
        mask[0, -1] = 1
        _trace_export(TextEncoderGraph(model.text, model.lm), (ids, mask), path, opset, TEXT_INPUTS, TEXT_OUTPUTS,
                      {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                       "text": {0: "batch", 1: "tokens"}, "cross_keys": {1: "batch", 3: "tokens"},
                       "cross_values": {1: "batch", 3: "tokens"}})
    finally:
        t5.config._attn_implementation = previous


def step_example(config: Any, rows: int = 2, steps: int = 3, past: int = 5, text: int = 4) -> tuple[torch.Tensor, ...]:
    """Example inputs of the step graph (also used to verify an export)."""
    generator = torch.Generator().manual_seed(0)
    shape = (config.num_layers, rows, config.num_heads, past, config.head_dim)
    text_shape = (config.num_layers, rows, config.num_heads, text, config.head_dim)
    tokens = torch.randint(0, config.card + 1, (rows, config.num_codebooks, steps), generator=generator)
    starts = torch.tensor([max(0, past - 1 - 2 * row) for row in range(rows)])
    positions = starts[:, None] + torch.arange(steps)[None, :]
    cross_mask = torch.ones((rows, text), dtype=torch.bool)
    cross_mask[-1] = False
    return (tokens, positions, torch.randn(shape, generator=generator), torch.randn(shape, generator=generator),
            torch.randn(text_shape, generator=generator), torch.randn(text_shape, generator=generator), cross_mask)


def _export_step(model: Any, path: Path, opset: int) -> None:
    axes = {"tokens": {0: "rows", 2: "steps"}, "positions": {0: "rows", 1: "steps"},
            "past_keys": {1: "rows", 3: "past"}, "past_values": {1: "rows", 3: "past"},
            "cross_keys": {1: "rows", 3: "text_tokens"}, "cross_values": {1: "rows", 3: "text_tokens"},
            "cross_mask": {0: "rows", 1: "text_tokens"}, "logits": {0: "rows"},
            "new_keys": {1: "rows", 3: "steps"}, "new_values": {1: "rows", 3: "steps"}}
    _trace_export(StepGraph(model.lm), step_example(model.config), path, opset, STEP_INPUTS, STEP_OUTPUTS, axes)


def _export_decoder(model: Any, path: Path, opset: int) -> None:
    codes = torch.randint(0, model.config.card, (2, model.config.num_codebooks, 7),
                          generator=torch.Generator().manual_seed(0))
    _trace_export(AudioDecoderGraph(model.codec), (codes,), path, opset, DECODER_INPUTS, DECODER_OUTPUTS,
                  {"codes": {0: "batch", 2: "frames"}, "audio": {0: "batch", 2: "samples"}})


def _describe(model: Any, opset: int) -> dict[str, Any]:
    meta = model.metadata()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict(),
        "files": {"text_encoder": TEXT_ENCODER_FILE, "lm_step": LM_STEP_FILE, "audio_decoder": AUDIO_DECODER_FILE,
                  "tokenizer": "tokenizer_config.json"},
        "opset": opset, "exporter": "torch.onnx (TorchScript)", "torch_version": torch.__version__,
        "inputs": {"text_encoder": TEXT_INPUTS, "lm_step": STEP_INPUTS, "audio_decoder": DECODER_INPUTS},
        "outputs": {"text_encoder": TEXT_OUTPUTS, "lm_step": STEP_OUTPUTS, "audio_decoder": DECODER_OUTPUTS},
        "text": {"max_tokens": model.text.max_tokens, "text_dim": model.text.text_dim,
                 "projected": isinstance(model.text.output_proj, torch.nn.Linear)},
        "codec": {"sample_rate": model.codec.sample_rate, "frame_rate": model.codec.frame_rate,
                  "hop_length": model.codec.hop_length, "n_q": model.codec.n_q, "card": model.codec.card,
                  "channels": model.codec.channels, "stereo_interleaved": model.codec.stereo_interleaved},
        "parameters": meta["parameters"], "source": model.source, "source_checksum": meta["checksum"],
    }


# ---------------------------------------------------------------------------------------------------------------
def verify_export(model: Any, directory: str | os.PathLike[str], *, atol: float = 1e-4) -> dict[str, float]:
    """Run each exported graph once with onnxruntime next to the PyTorch model; raise `CheckpointError` when an
    output differs by more than `atol`. Returns the largest difference per graph."""
    import onnxruntime as ort

    directory = Path(directory)
    options = ort.SessionOptions()
    options.log_severity_level = 3

    def run(name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = ort.InferenceSession(str(directory / name), options, providers=["CPUExecutionProvider"])
        return session.run(None, feeds)

    errors: dict[str, float] = {}
    with torch.inference_mode():
        ids = model.text.tokenizer(["a dog barking", "rain"], padding=True, return_tensors="pt")
        want = TextEncoderGraph(model.text, model.lm)(ids["input_ids"], ids["attention_mask"])
        got = run(TEXT_ENCODER_FILE, {"input_ids": ids["input_ids"].numpy(),
                                      "attention_mask": ids["attention_mask"].numpy()})
        errors["text_encoder"] = _max_error(want, got)

        example = step_example(model.config, rows=3, steps=1, past=6, text=5)
        want = StepGraph(model.lm)(*example)
        got = run(LM_STEP_FILE, dict(zip(STEP_INPUTS, (t.numpy() for t in example))))
        errors["lm_step"] = _max_error(want, got)

        codes = torch.randint(0, model.config.card, (1, model.config.num_codebooks, 11),
                              generator=torch.Generator().manual_seed(1))
        want = model.codec.decode(codes)
        got = run(AUDIO_DECODER_FILE, {"codes": codes.numpy()})
        errors["audio_decoder"] = _max_error([want], got)
    bad = {name: error for name, error in errors.items() if not error <= atol}
    if bad:
        raise CheckpointError(f"ONNX export in {directory} does not reproduce the PyTorch model: max abs "
                              f"differences {bad} exceed {atol}")
    return errors


def _max_error(want: Any, got: list[np.ndarray]) -> float:
    return max(float(np.abs(w.float().numpy() - g).max()) if w.numel() else 0.0 for w, g in zip(want, got))


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()

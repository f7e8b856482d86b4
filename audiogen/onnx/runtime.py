"""Generation through onnxruntime with the unchanged engine: `AudioGen.from_onnx(directory)`.

The engine (`audiogen.engine.Engine`) and its model runner (`audiogen.engine.runner.SlotBatch`) only use a few
methods of the model's parts, so this backend supplies objects with exactly those methods, backed by the three
ONNX sessions, and everything else (scheduling, admission, CFG, seeded sampling, sliding windows, streaming,
cancellation, the Python API) is the same code as for PyTorch:

- `OnnxTextConditioner` (`model.text`): `token_ids(prompts)` and `__call__(prompts) -> (text, mask)` with the
  same length checks and prompt cache as `TextConditioner` (both are `audiogen.text.PromptEncoder`s). Its `text`
  is what this backend's LM consumes: the per-layer cross-attention keys/values that `text_encoder.onnx`
  computes, packed on the feature axis ([B, L, layers * 2 * dim]); the engine treats `text` as opaque and hands
  it to `lm.project_text`.
- `OnnxLanguageModel` (`model.lm`): `project_text` unpacks those keys/values; `step` and `prefill` run
  `lm_step.onnx` over the same `KVCache` (torch CPU float32 tensors) as the PyTorch LM: the attended part of the
  cache is handed to onnxruntime as numpy arrays and the graph's new keys/values are written back into it, at
  each row's own position.
- `OnnxCodec` (`model.codec`): `decode` runs `audio_decoder.onnx` (one exact-length decode per clip); rates and
  codebook sizes come from `audiogen_onnx.json`. There is no encoder graph, so audio prompts (`encode`,
  `continue_audio`, `inpaint_audio`) need the PyTorch backend; code prompts (`prefix_codes`, `inpaint_codes`) work.

The three are parameter-less `torch.nn.Module` shells so that `AudioGen`'s `.eval()` / `.to()` calls keep working;
`OnnxAudioGen` overrides the few `AudioGen` methods that read PyTorch weights (`to`, `dtype`, `checksum`, the
parameter counts of `metadata`, `save_pretrained`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer

from audiogen.codec import Codec
from audiogen.config import AudioGenConfig
from audiogen.engine.cpu import engine_threads
from audiogen.errors import CheckpointError, InvalidRequestError, MissingCheckpointFileError
from audiogen.kv_cache import KVCache
from audiogen.model import AudioGen
from audiogen.onnx.export import (AUDIO_DECODER_FILE, DECODER_INPUTS, DECODER_OUTPUTS, FORMAT, LM_STEP_FILE,
                                  META_FILE, STEP_INPUTS, STEP_OUTPUTS, TEXT_ENCODER_FILE, TEXT_INPUTS,
                                  TEXT_OUTPUTS, file_digest)
from audiogen.text import PromptEncoder

REQUIRED_FILES = {
    META_FILE: "the export description (config, file names, rates)",
    TEXT_ENCODER_FILE: "the text encoder graph",
    LM_STEP_FILE: "the language model step graph",
    AUDIO_DECODER_FILE: "the audio decoder graph",
    "tokenizer_config.json": "the tokenizer (written by tokenizer.save_pretrained)",
}


def load_onnx_model(directory: str | os.PathLike[str], *, providers: list[Any] | None = None,
                    threads: int | None = None) -> "OnnxAudioGen":
    """Load a directory written by `export_onnx` / `audiogen export-onnx`.

    providers: onnxruntime execution providers (default CPU). threads: intra-op threads per session (default:
    the engine's CPU threads, `audiogen.engine.cpu.engine_threads()`, so that onnxruntime and torch's kernels
    between steps use the same cores a process was given). A missing file raises `MissingCheckpointFileError` naming it;
    a file onnxruntime cannot load, or whose inputs/outputs are not the expected ones, `CheckpointError`.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise MissingCheckpointFileError(f"ONNX model directory {root} does not exist (write one with "
                                         f"`audiogen export-onnx MODEL {root}`)")
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        described = ", ".join(f"{name} ({REQUIRED_FILES[name]})" for name in missing)
        raise MissingCheckpointFileError(f"ONNX model directory {root} is incomplete: missing {described}. "
                                         f"Re-run `audiogen export-onnx MODEL {root}`")
    try:
        meta = json.loads((root / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{root / META_FILE} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{root / META_FILE} is not an audiogen ONNX description (expected format {FORMAT!r})")
    try:
        config = AudioGenConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{root / META_FILE} has no valid model config: {error}") from error
    sessions = OnnxSessions(root, providers=providers, threads=threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"cannot load the tokenizer in {root}: {error}") from error
    text = OnnxTextConditioner(sessions, tokenizer, config, max_tokens=int(meta.get("text", {}).get(
        "max_tokens", config.max_text_tokens)))
    codec = OnnxCodec(sessions, meta.get("codec", {}), config)
    lm = OnnxLanguageModel(sessions, config)
    source = {"format": FORMAT, "path": str(root), "exported_from": meta.get("source", {}),
              "exported_from_checksum": meta.get("source_checksum")}
    return OnnxAudioGen(config, lm, text, codec, source=source, directory=root, meta=meta)


class OnnxSessions:
    """The three onnxruntime sessions of an export directory, with their input/output names checked."""

    def __init__(self, root: Path, *, providers: list[Any] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = max(1, int(engine_threads() if threads is None else threads))
        options.inter_op_num_threads = 1
        # Workers that spin after a run compete with the engine's own work between runs (sampling, cache copies):
        # measured 3.8-7.3 ms per tiny-model step with spinning vs 0.6-1.3 ms without (2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.paths = {name: root / name for name in (TEXT_ENCODER_FILE, LM_STEP_FILE, AUDIO_DECODER_FILE)}
        self.text = self._open(ort, root / TEXT_ENCODER_FILE, options, TEXT_INPUTS, TEXT_OUTPUTS)
        self.step = self._open(ort, root / LM_STEP_FILE, options, STEP_INPUTS, STEP_OUTPUTS)
        self.decoder = self._open(ort, root / AUDIO_DECODER_FILE, options, DECODER_INPUTS, DECODER_OUTPUTS)

    def _open(self, ort: Any, path: Path, options: Any, inputs: list[str], outputs: list[str]) -> Any:
        try:
            session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as error:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise CheckpointError(f"{path.name} in {path.parent} is not a loadable ONNX model: "
                                  f"{type(error).__name__}: {str(error).strip()[:500]}") from error
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        if got_in != inputs or got_out != outputs:
            raise CheckpointError(f"{path.name} in {path.parent} has inputs {got_in} and outputs {got_out}; "
                                  f"expected {inputs} -> {outputs} (was it written by audiogen export-onnx?)")
        return session


# ---------------------------------------------------------------------------------------------------------------
class OnnxTextConditioner(PromptEncoder):
    """prompts -> (packed cross-attention keys/values [B, L, layers * 2 * dim], mask [B, L] bool)."""

    def __init__(self, sessions: OnnxSessions, tokenizer: Any, config: AudioGenConfig, *, max_tokens: int) -> None:
        super().__init__(tokenizer, max_tokens=max_tokens, width=config.num_layers * 2 * config.dim)
        self.sessions = sessions

    def _encode(self, prompts: list[str]) -> list[torch.Tensor]:
        ids = self.token_ids(prompts)
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="np")
        input_ids = np.ascontiguousarray(batch["input_ids"], dtype=np.int64)
        attention = np.ascontiguousarray(batch["attention_mask"], dtype=np.int64)
        _, keys, values = self.sessions.text.run(None, {"input_ids": input_ids, "attention_mask": attention})
        # [layers, B, H, L, hd] x2 -> [B, L, layers, 2, H, hd] -> [B, L, layers * 2 * dim]
        kv = np.stack([keys, values], axis=1).transpose(2, 4, 0, 1, 3, 5)
        packed = torch.from_numpy(np.ascontiguousarray(kv)).reshape(len(prompts), input_ids.shape[1], -1)
        return [packed[index, :int(attention[index].sum())].clone() for index in range(len(prompts))]


# ---------------------------------------------------------------------------------------------------------------
class OnnxLanguageModel(nn.Module):
    """`LanguageModel`'s decoding interface (`project_text`, `prefill`, `step`) over `lm_step.onnx`."""

    def __init__(self, sessions: OnnxSessions, config: AudioGenConfig) -> None:
        super().__init__()
        self.sessions = sessions
        self.config = config

    def project_text(self, packed: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Packed keys/values from `OnnxTextConditioner` -> per-layer (keys, values) [B, H, L, hd] (views)."""
        c = self.config
        batch, length, _ = packed.shape
        kv = packed.view(batch, length, c.num_layers, 2, c.num_heads, c.head_dim).permute(2, 3, 0, 4, 1, 5)
        return [(kv[layer, 0], kv[layer, 1]) for layer in range(c.num_layers)]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, num_rows: int,
             length: int) -> torch.Tensor:
        """Logits [R, K, card] for one new position per cache row 0..R-1 (as `LanguageModel.step`)."""
        rows = slice(0, num_rows)
        # The attended window 0..length-1 (the row's own position is masked in `past` and comes back as new_*).
        logits, keys, values = self._run(tokens[:, :, None], positions[:, None], cache.keys[:, rows, :, :length],
                                         cache.values[:, rows, :, :length], cache, rows)
        for layer in range(self.config.num_layers):
            cache.write_step(layer, positions, keys[layer], values[layer], length)
        return logits

    def prefill(self, tokens: torch.Tensor, cache: KVCache, rows: slice) -> None:
        """Write the keys/values of a known prefix (positions 0..P-1) of cache rows `rows` in one graph call."""
        c = self.config
        batch, _, length = tokens.shape
        past = torch.zeros((c.num_layers, batch, c.num_heads, 1, c.head_dim))
        positions = torch.arange(length, dtype=torch.long)[None, :].expand(batch, -1)
        _, keys, values = self._run(tokens, positions, past, past, cache, rows)
        for layer in range(c.num_layers):
            cache.write_prefix(layer, rows, keys[layer], values[layer])

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, past_keys: torch.Tensor,
             past_values: torch.Tensor, cache: KVCache, rows: slice) -> list[torch.Tensor]:
        """One `lm_step.onnx` call over cache rows `rows` -> (logits, new_keys, new_values) as torch tensors."""
        if cache.keys.device.type != "cpu" or cache.keys.dtype != torch.float32:
            raise InvalidRequestError("dtype", f"the ONNX backend needs a float32 CPU KV cache, got "
                                               f"{cache.keys.dtype} on {cache.keys.device}", limit="float32 on cpu")
        # The thread's remaining torch work (cache copies, sampling) runs on one core: onnxruntime's pool owns the
        # cores here. Beside it, an OpenMP pool of torch's, spinning after each parallel copy, kept onnxruntime's
        # workers from their cores: steps with 32 rows took 10-25 ms instead of 0.5 ms (tiny model, 2 cores).
        # `torch.set_num_threads` applies to the calling thread only (the engine's loop thread).
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        length = cache.text_length(rows)  # as `KVCache.text_view` cuts it, with all layers in one tensor
        feeds = {
            "tokens": _array(tokens, np.int64), "positions": _array(positions, np.int64),
            "past_keys": _array(past_keys), "past_values": _array(past_values),
            "cross_keys": _array(cache.text_keys[:, rows, :, :length]),
            "cross_values": _array(cache.text_values[:, rows, :, :length]),
            "cross_mask": _array(cache.text_mask[rows, :length], np.bool_),
        }
        return [torch.from_numpy(output) for output in self.sessions.step.run(None, feeds)]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("the ONNX backend runs generation only; teacher-forced scoring (lm(...)) needs "
                                  "the PyTorch backend")


_TORCH_DTYPES = {np.float32: torch.float32, np.int64: torch.int64, np.bool_: torch.bool}


def _array(tensor: torch.Tensor, dtype: Any = np.float32) -> np.ndarray:
    """A C-contiguous numpy array of `tensor`: a view when it already is one, else one (parallel) torch copy."""
    return tensor.detach().to(device="cpu", dtype=_TORCH_DTYPES[dtype]).contiguous().numpy()


# ---------------------------------------------------------------------------------------------------------------
class OnnxCodec(nn.Module):
    """`Codec`'s decoding interface over `audio_decoder.onnx`."""

    def __init__(self, sessions: OnnxSessions, meta: dict[str, Any], config: AudioGenConfig) -> None:
        super().__init__()
        self.sessions = sessions
        self.sample_rate = int(meta.get("sample_rate", config.sample_rate))
        self.hop_length = int(meta.get("hop_length", config.hop_length))
        self.frame_rate = self.sample_rate // self.hop_length
        self.n_q = int(meta.get("n_q", config.n_q))
        self.card = int(meta.get("card", config.card))
        self.stereo_interleaved = bool(meta.get("stereo_interleaved", config.audio_channels == 2))
        self.channels = 2 if self.stereo_interleaved else 1
        self.num_codebooks = self.n_q * self.channels

    _check_codes = Codec._check_codes  # same validation and messages as the PyTorch codec

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, num_codebooks, T] -> float32 audio [B, channels, T * hop_length]."""
        self._check_codes(codes)
        (audio,) = self.sessions.decoder.run(None, {"codes": _array(codes, np.int64)})
        return torch.from_numpy(audio)

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the ONNX export has no audio encoder: encode audio prompts with the PyTorch "
                                  "backend and pass their codes (prefix_codes / inpaint_codes)")

    def checksum(self) -> str:
        return file_digest(self.sessions.paths[AUDIO_DECODER_FILE])

    def extra_repr(self) -> str:
        return (f"onnx, sample_rate={self.sample_rate}, frame_rate={self.frame_rate}, n_q={self.n_q}, "
                f"card={self.card}, channels={self.channels}")


# ---------------------------------------------------------------------------------------------------------------
class OnnxAudioGen(AudioGen):
    """`AudioGen` whose text encoder, LM steps and audio decoder run in onnxruntime (CPU, float32)."""

    backend = "onnx"

    def __init__(self, config: AudioGenConfig, lm: OnnxLanguageModel, text: OnnxTextConditioner, codec: OnnxCodec,
                 *, source: dict[str, Any], directory: Path, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.onnx_meta = meta
        super().__init__(config, lm, text, codec, source=source, device="cpu", dtype=torch.float32)

    def to(self, device: torch.device | str | None = None, lm_dtype: torch.dtype | None = None) -> "OnnxAudioGen":
        """The ONNX backend keeps its cache and tensors on the CPU in float32 (onnxruntime's providers decide
        where the graphs run)."""
        if device is not None and torch.device(device).type != "cpu":
            raise InvalidRequestError("device", f"{device} is not available with the ONNX backend",
                                      limit="cpu (choose onnxruntime providers with providers=...)")
        if lm_dtype is not None and lm_dtype != torch.float32:
            raise InvalidRequestError("dtype", f"{lm_dtype} is not available with the ONNX backend",
                                      limit="float32")
        self.device = torch.device("cpu")
        return self

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        raise NotImplementedError("an ONNX-backed model cannot be saved in the PyTorch format; copy its export "
                                  f"directory {self.directory} instead")

    def _parameter_counts(self) -> dict[str, int]:
        return dict(self.onnx_meta.get("parameters", {}))

    def checksum(self) -> str:
        """sha256 over the export's graphs and description (identifies the model in render metadata)."""
        if getattr(self, "_checksum", None) is None:
            digest = hashlib.sha256()
            for name in (META_FILE, TEXT_ENCODER_FILE, LM_STEP_FILE, AUDIO_DECODER_FILE):
                digest.update(f"{name}:{file_digest(self.directory / name)}\n".encode())
            self._checksum = digest.hexdigest()
        return self._checksum

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["onnx"] = {"directory": str(self.directory), "opset": self.onnx_meta.get("opset"),
                        "providers": self.lm.sessions.providers}
        return meta

"""Checkpoint loading: every supported layout ends in the same native pieces (`LoadedCheckpoint`).

Layouts, detected from the files present:
- audiocraft: `state_dict.bin` + `compression_state_dict.bin` (facebook/audiogen-medium, facebook/musicgen-*);
- transformers: a `MusicgenForConditionalGeneration.save_pretrained` directory (config.json model_type musicgen);
- native: what `AudioGen.save_pretrained` writes (config.json with "format": "audiogen").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, T5EncoderModel

from audiogen.codec import Codec
from audiogen.config import AudioGenConfig
from audiogen.errors import CheckpointError, MissingCheckpointFileError


@dataclass
class LoadedCheckpoint:
    config: AudioGenConfig
    lm_state: dict[str, torch.Tensor]
    text_proj_state: dict[str, torch.Tensor] | None
    t5: T5EncoderModel
    tokenizer: PreTrainedTokenizerBase
    codec: Codec
    source: dict[str, Any] = field(default_factory=dict)


def detect_layout(path: Path) -> str:
    """'audiocraft', 'transformers' or 'native', from the files in `path`."""
    if not path.exists():
        raise MissingCheckpointFileError(f"checkpoint path {path} does not exist")
    if path.is_file():
        if path.name == "state_dict.bin":
            return "audiocraft"
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory")
    if (path / "state_dict.bin").exists():
        return "audiocraft"
    config_file = path / "config.json"
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{config_file} is not valid JSON: {error}") from error
        if config.get("format") == "audiogen":
            return "native"
        if config.get("model_type") == "musicgen":
            return "transformers"
        raise CheckpointError(
            f"{config_file} describes model_type={config.get('model_type')!r}, which is not supported: expected a "
            f"MusicgenForConditionalGeneration directory (model_type 'musicgen') or an audiogen directory")
    raise CheckpointError(
        f"unknown checkpoint layout at {path}: expected audiocraft's state_dict.bin + compression_state_dict.bin, "
        f"a transformers MusicGen directory (config.json + model.safetensors), or an audiogen save_pretrained "
        f"directory (config.json with format 'audiogen'); found {sorted(p.name for p in path.iterdir())[:20]}")


def load_checkpoint(path: str | os.PathLike[str], *, text_encoder: str | os.PathLike[str] | None = None,
                    codec: str | os.PathLike[str] | None = None) -> LoadedCheckpoint:
    """Read any supported layout. `text_encoder` / `codec` override where the T5 / EnCodec come from."""
    root = Path(path).expanduser()
    layout = detect_layout(root)
    if layout == "audiocraft":
        from audiogen.checkpoints.audiocraft import load_audiocraft

        loaded = load_audiocraft(root, text_encoder=text_encoder, codec=codec)
    elif layout == "transformers":
        from audiogen.checkpoints.hf import load_transformers_musicgen

        loaded = load_transformers_musicgen(root, text_encoder=text_encoder)
    else:
        from audiogen.checkpoints.native import load_native

        loaded = load_native(root, text_encoder=text_encoder)
    loaded.source.setdefault("path", str(root))
    return loaded


def describe_key_mismatch(missing: list[str], unexpected: list[str], wrong_shapes: list[str] = ()) -> str:
    """A readable diff of state-dict keys (and `wrong_shapes`, descriptions of mis-shaped ones) for error messages."""
    parts = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shapes)):
        if items:
            more = f", ... ({len(items) - 20} more)" if len(items) > 20 else ""
            parts.append(f"{what} ({len(items)}): {', '.join(sorted(items)[:20])}{more}")
    return "; ".join(parts)


def check_state(state: dict[str, Any], shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Refuse a `state` that does not hold exactly the keys of `shapes`, each a float tensor of that shape (the
    strict load the upstream model would do): a CheckpointError of `what` and the differences."""

    def fits(value: Any, shape: tuple[int, ...]) -> bool:
        return isinstance(value, torch.Tensor) and value.is_floating_point() and tuple(value.shape) == tuple(shape)

    def describe(value: Any) -> str:
        return f"{list(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__

    wrong = [f"{k}: expected {list(shape)}, got {describe(state[k])}" for k, shape in shapes.items()
             if k in state and not fits(state[k], shape)]
    missing, unexpected = [k for k in shapes if k not in state], [k for k in state if k not in shapes]
    problems = describe_key_mismatch(missing, unexpected, wrong)
    if problems:
        raise CheckpointError(f"{what}: {problems}")


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """`check_state` against `module`'s own keys and shapes, then load (load_state_dict casts to its dtypes)."""
    check_state(state, {key: tuple(value.shape) for key, value in module.state_dict().items()}, what)
    module.load_state_dict(state)

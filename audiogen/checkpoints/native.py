"""audiogen's own checkpoint format: self-contained, so a cluster node needs nothing but the directory.

```
config.json          {"format": "audiogen", "format_version": 1, "config": {...}, "text_projection": bool, ...}
model.safetensors    lm.* (native LM keys) and text_proj.* (T5 -> LM projection); float32, or float16/bfloat16
                     when saved with `weights_dtype` (loading casts them to the model's dtype)
text_encoder/        T5EncoderModel.save_pretrained + its tokenizer
codec/               EncodecModel.save_pretrained + audiogen_codec.json (see audiogen.codec)
```
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from audiogen.checkpoints import LoadedCheckpoint
from audiogen.codec import Codec
from audiogen.config import AudioGenConfig
from audiogen.errors import CheckpointError, MissingCheckpointFileError
from audiogen.text import load_text_encoder

FORMAT_VERSION = 1
REQUIRED = ("config.json", "model.safetensors", "text_encoder", "codec")
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def load_native(root: Path, *, text_encoder: str | os.PathLike[str] | None = None) -> LoadedCheckpoint:
    for name in REQUIRED:
        if not (root / name).exists() and not (name == "text_encoder" and text_encoder is not None):
            raise MissingCheckpointFileError(f"{root / name} is missing (audiogen checkpoint needs {', '.join(REQUIRED)})")
    meta = json.loads((root / "config.json").read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{root} has format_version {meta['format_version']}; this audiogen reads up to "
                              f"{FORMAT_VERSION}: upgrade audiogen")
    config = AudioGenConfig.from_dict(meta["config"])
    tensors = load_file(root / "model.safetensors")
    lm_state = {k[3:]: v for k, v in tensors.items() if k.startswith("lm.")}
    proj = {k[len("text_proj."):]: v for k, v in tensors.items() if k.startswith("text_proj.")} or None
    if bool(meta.get("text_projection", True)) != (proj is not None):
        raise CheckpointError(f"{root}: config says text_projection={meta.get('text_projection')} but the weights "
                              f"{'have' if proj else 'lack'} text_proj.*")
    t5, tokenizer = load_text_encoder(text_encoder or root / "text_encoder")
    codec = Codec.from_pretrained(root / "codec")
    return LoadedCheckpoint(config=config, lm_state=lm_state, text_proj_state=proj, t5=t5, tokenizer=tokenizer,
                            codec=codec, source=dict(meta.get("source", {}), format="native"))


def save_native(directory: str | os.PathLike[str], *, config: AudioGenConfig, lm_state: dict[str, torch.Tensor],
                text_proj_state: dict[str, torch.Tensor] | None, t5: Any, tokenizer: Any, codec: Codec,
                source: dict[str, Any], weights_dtype: torch.dtype = torch.float32) -> Path:
    """Write the directory atomically: everything goes to a sibling temp dir that replaces the target.

    `weights_dtype` is the storage type of the LM and projection weights: float16 halves the file of a model that
    ships inside the package (the demo model), at a rounding error far below what sampling notices."""
    if weights_dtype not in STORAGE_DTYPES:
        raise ValueError(f"weights_dtype must be one of {', '.join(map(str, STORAGE_DTYPES))}, got {weights_dtype}")
    target = Path(directory).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        parts = {"lm": lm_state, "text_proj": text_proj_state or {}}
        tensors = {f"{prefix}.{k}": v.detach().to("cpu", weights_dtype).contiguous()
                   for prefix, part in parts.items() for k, v in part.items()}
        save_file(tensors, staging / "model.safetensors", metadata={"format": "audiogen"})
        t5.save_pretrained(staging / "text_encoder")
        tokenizer.save_pretrained(staging / "text_encoder")
        codec.save_pretrained(staging / "codec")
        meta = {"format": "audiogen", "format_version": FORMAT_VERSION, "config": config.to_dict(),
                "text_projection": text_proj_state is not None, "source": source}
        (staging / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target

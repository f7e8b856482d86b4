"""Reader for transformers `MusicgenForConditionalGeneration.save_pretrained` directories.

Such a directory holds the T5 encoder, the EnCodec and the decoder in one set of safetensors (or a sharded /
legacy `pytorch_model.bin` set), plus usually the T5 tokenizer files. The decoder is mapped onto our native LM
keys (q/k/v projections fused as audiocraft stores them, see docs/INTERFACES.md).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, EncodecModel, MusicgenConfig, T5EncoderModel

from audiogen.checkpoints import LoadedCheckpoint, load_strict
from audiogen.codec import Codec
from audiogen.config import AudioGenConfig
from audiogen.errors import CheckpointError, MissingCheckpointFileError
from audiogen.text import check_tokenizer, load_text_encoder

_DECODER = "decoder.model.decoder."
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_RENAMED_PREFIXES = {_DECODER + "embed_tokens.": "embeddings.", _DECODER + "layer_norm.": "out_norm.",
                     "decoder.lm_heads.": "heads."}
# Native fused projection -> the transformers projections concatenated into it, in order.
_FUSED = {"self_attn.in_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "cross_attn.kv_proj": ("encoder_attn.k_proj", "encoder_attn.v_proj")}
_LAYER_RENAMES = {
    "self_attn_layer_norm": "self_attn_norm",
    "self_attn.out_proj": "self_attn.out_proj",
    "encoder_attn_layer_norm": "cross_attn_norm",
    "encoder_attn.q_proj": "cross_attn.q_proj",
    "encoder_attn.out_proj": "cross_attn.out_proj",
    "fc1": "ffn.linear1",
    "fc2": "ffn.linear2",
    "final_layer_norm": "ffn_norm",
}


def read_state_dict(root: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint directory (single or sharded safetensors, or legacy .bin)."""
    single = root / "model.safetensors"
    index = root / "model.safetensors.index.json"
    legacy = root / "pytorch_model.bin"
    if single.exists():
        return load_file(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {key: value for shard in shards for key, value in load_file(root / shard).items()}
    if legacy.exists():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise MissingCheckpointFileError(
        f"{root} has a MusicGen config.json but no weights: expected model.safetensors, "
        f"model.safetensors.index.json (+ shards) or pytorch_model.bin")


def musicgen_config(hf: MusicgenConfig, root: Path) -> AudioGenConfig:
    decoder, audio, text = hf.decoder, hf.audio_encoder, hf.text_encoder
    if decoder.activation_function != "gelu":
        raise CheckpointError(f"decoder.activation_function={decoder.activation_function!r} is not supported (gelu)")
    if decoder.scale_embedding:
        raise CheckpointError("decoder.scale_embedding=True is not supported")
    channels = decoder.audio_channels
    generation_file = root / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.exists() else {}
    frame_rate = audio.sampling_rate // audio.hop_length
    # MusicGen's window is its 30 s training segment; a generation_config.json may say otherwise (its
    # max_length counts frames plus the start token), unless it is transformers' generic default of 20.
    max_length = int(generation.get("max_length", 0))
    window = float(round(max_length / frame_rate)) if max_length >= frame_rate else 30.0
    return AudioGenConfig(
        dim=decoder.hidden_size, num_layers=decoder.num_hidden_layers, num_heads=decoder.num_attention_heads,
        ffn_dim=decoder.ffn_dim, n_q=decoder.num_codebooks // channels, card=decoder.vocab_size,
        audio_channels=channels, text_encoder=getattr(text, "_name_or_path", "") or "t5-base",
        text_dim=text.d_model, max_text_tokens=256, sample_rate=audio.sampling_rate, frame_rate=frame_rate,
        window_duration=window, max_duration=max(120.0, window), extend_stride=min(18.0, window / 2),
        default_duration=min(10.0, window), temperature=float(generation.get("temperature", 1.0)),
        top_k=min(int(generation.get("top_k", 250)), decoder.vocab_size), top_p=float(generation.get("top_p", 0.0)),
        guidance_scale=float(generation.get("guidance_scale", 3.0)), name="musicgen")


def split_decoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers decoder keys -> native LM keys (q/k/v fused for self-attention, k/v for cross)."""
    native: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        prefix = next((p for p in _RENAMED_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            native[_RENAMED_PREFIXES[prefix] + key[len(prefix):]] = value
        elif key.startswith(_DECODER + "layers."):
            match = _LAYER.match(key[len(_DECODER):])
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
    for index, parts in layers.items():
        for target, sources in _FUSED.items():
            for kind in ("weight", "bias"):
                pieces = [parts.pop(f"{source}.{kind}", None) for source in sources]
                if all(p is not None for p in pieces):
                    native[f"layers.{index}.{target}.{kind}"] = torch.cat(pieces, dim=0)
        for name, value in parts.items():
            module, _, kind = name.rpartition(".")
            if module not in _LAYER_RENAMES:
                raise CheckpointError(f"unexpected decoder key {_DECODER}layers.{index}.{name}")
            native[f"layers.{index}.{_LAYER_RENAMES[module]}.{kind}"] = value
    return native


def _submodule(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_transformers_musicgen(root: Path, *, text_encoder: str | os.PathLike[str] | None = None) -> LoadedCheckpoint:
    hf = MusicgenConfig.from_pretrained(root, local_files_only=True)
    config = musicgen_config(hf, root)
    state = read_state_dict(root)

    if text_encoder is not None:
        t5, tokenizer = load_text_encoder(text_encoder)
    else:
        t5 = T5EncoderModel(hf.text_encoder)
        t5_state = _submodule(state, "text_encoder.")
        t5_state.setdefault("encoder.embed_tokens.weight", t5_state.get("shared.weight"))
        load_strict(t5, t5_state, "text encoder weights do not match")
        try:
            tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        except (OSError, ValueError):
            _, tokenizer = load_text_encoder(config.text_encoder)
        check_tokenizer(t5, tokenizer)

    encodec = EncodecModel(hf.audio_encoder)
    load_strict(encodec, _submodule(state, "audio_encoder."), "audio encoder (EnCodec) weights do not match")
    codec = Codec(encodec.eval(), n_q=config.n_q, stereo_interleaved=config.audio_channels == 2)

    proj = _submodule(state, "enc_to_dec_proj.") or None
    if proj is not None and tuple(proj["weight"].shape) != (config.dim, t5.config.d_model):
        raise CheckpointError(f"enc_to_dec_proj.weight has shape {tuple(proj['weight'].shape)}, expected "
                              f"({config.dim}, {t5.config.d_model}) for this text encoder")
    lm_state = split_decoder(state)
    return LoadedCheckpoint(config=config, lm_state=lm_state, text_proj_state=proj, t5=t5.eval(),
                            tokenizer=tokenizer, codec=codec, source={"format": "transformers"})

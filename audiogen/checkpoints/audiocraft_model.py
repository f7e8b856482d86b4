"""Composes an audiocraft checkpoint directory: LM (`state_dict.bin`), codec (`compression_state_dict.bin`)
and the T5 that `xp.cfg` names (not stored in the checkpoint; resolved offline or overridden)."""

from __future__ import annotations

import os
from pathlib import Path

from audiogen.checkpoints import LoadedCheckpoint
from audiogen.checkpoints.audiocraft import read_audiocraft_lm
from audiogen.checkpoints.audiocraft_codec import load_audiocraft_codec
from audiogen.codec import Codec
from audiogen.errors import CheckpointError, MissingCheckpointFileError
from audiogen.text import load_text_encoder


def load_audiocraft(root: Path, *, text_encoder: str | os.PathLike[str] | None = None,
                    codec: str | os.PathLike[str] | None = None) -> LoadedCheckpoint:
    directory = root.parent if root.is_file() else root
    compression = directory / "compression_state_dict.bin"
    if not compression.exists() and codec is None:
        raise MissingCheckpointFileError(
            f"{compression} is missing: audiocraft checkpoints need state_dict.bin and compression_state_dict.bin "
            f"(or pass codec=<EnCodec directory>)")
    lm = read_audiocraft_lm(root)
    config = lm.config
    # audiocraft keeps the stereo layout in the LM's xp.cfg (interleave_stereo_codebooks): MusicGen's compression
    # file is often only {'pretrained': 'facebook/encodec_32khz'}, which cannot say it.
    stereo = config.audio_channels == 2
    if compression.exists():
        codec_model = load_audiocraft_codec(compression, codec_override=codec, stereo_interleaved=stereo)
    else:
        codec_model = Codec.from_pretrained(codec, stereo_interleaved=stereo)
    if codec_model.sample_rate != config.sample_rate or codec_model.frame_rate != config.frame_rate:
        raise CheckpointError(
            f"codec runs at {codec_model.sample_rate} Hz / {codec_model.frame_rate} frames/s but the LM expects "
            f"{config.sample_rate} Hz / {config.frame_rate} frames/s")
    if codec_model.num_codebooks != config.num_codebooks or codec_model.card != config.card:
        raise CheckpointError(
            f"codec has {codec_model.num_codebooks} codebooks of {codec_model.card} codes but the LM models "
            f"{config.num_codebooks} of {config.card}")
    t5, tokenizer = load_text_encoder(text_encoder or lm.text_encoder_name)
    return LoadedCheckpoint(config=config, lm_state=lm.lm_state, text_proj_state=lm.text_proj_state, t5=t5,
                            tokenizer=tokenizer, codec=codec_model, source=dict(lm.source, format="audiocraft"))

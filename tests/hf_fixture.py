"""Tiny random transformers MusicGen models saved in the exact `save_pretrained` layout, for loader/parity tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration)

from audiogen.scratch import small_t5_config as tiny_t5_config, word_tokenizer as tiny_tokenizer

CARD = 64


def tiny_encodec_config(card: int = CARD, n_q: int = 4) -> EncodecConfig:
    frame_rate, bits = 50, (card - 1).bit_length()
    return EncodecConfig(sampling_rate=16000, audio_channels=1, num_filters=4, hidden_size=16, num_lstm_layers=1,
                         upsampling_ratios=[8, 5, 4, 2], codebook_size=card, use_causal_conv=False,
                         pad_mode="constant", use_conv_shortcut=False, normalize=False,
                         target_bandwidths=[n_q * frame_rate * bits / 1000])


def tiny_hf_musicgen(seed: int = 0, *, stereo: bool = False, hidden: int = 64, layers: int = 2,
                     heads: int = 4) -> tuple[MusicgenForConditionalGeneration, object]:
    tokenizer = tiny_tokenizer()
    vocab = -(-len(tokenizer) // 8) * 8
    decoder = MusicgenDecoderConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    ffn_dim=2 * hidden, vocab_size=CARD, num_codebooks=8 if stereo else 4,
                                    audio_channels=2 if stereo else 1, max_position_embeddings=1024,
                                    dropout=0.0, pad_token_id=CARD, bos_token_id=CARD)
    config = MusicgenConfig(text_encoder=tiny_t5_config(vocab).to_dict(),
                            audio_encoder=tiny_encodec_config().to_dict(), decoder=decoder.to_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MusicgenForConditionalGeneration(config).eval()
        # random init leaves codebooks near-identical; spread them so encode/decode are meaningful
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    gen = model.generation_config
    gen.decoder_start_token_id = CARD
    gen.pad_token_id = CARD
    gen.bos_token_id = CARD
    gen.max_length = 10 * 50 + 1
    gen.guidance_scale = 3.0
    gen.do_sample = True
    gen.top_k = 16
    return model, tokenizer


def save_tiny_hf_musicgen(directory: Path, seed: int = 0, **options) -> tuple[Path, MusicgenForConditionalGeneration]:
    model, tokenizer = tiny_hf_musicgen(seed, **options)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model

"""Seeded random models to train from scratch from, and the smallest complete models (no download needed); the
same seed always gives the same weights.

- `word_tokenizer()`: a real `PreTrainedTokenizerFast` (WordPiece over the sound vocabulary of
  `audiogen/data/words.txt`, single characters so any text tokenizes, T5's `</s>` appended). With a frozen
  `random_text_encoder` it is the demo model's text side: every word's meaning is learned by the text projection.
- `scratch_model`: an AudioGen with a freshly initialised LM around a given T5 and codec; `random_model`: the
  `tiny` base of `audiogen train`/`encode` and the tests' model (`random_codec`, `random_text_encoder`).
"""

from __future__ import annotations

import string
from importlib import resources
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from audiogen.codec import Codec, build_encodec
from audiogen.config import AudioGenConfig
from audiogen.model import AudioGen
from audiogen.text import TextConditioner


def word_list() -> list[str]:
    return resources.files("audiogen.data").joinpath("words.txt").read_text().split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """WordPiece tokenizer: pad=0, </s>=1, <unk>=2, characters, then the word list."""
    pieces = ["<pad>", "</s>", "<unk>"]
    characters = string.ascii_lowercase + string.digits
    pieces += list(characters) + ["##" + c for c in characters] + list(string.punctuation)
    pieces += word_list()  # a word that is also a character or punctuation keeps its first id (dict.fromkeys)
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=64))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def small_t5_config(vocab_size: int, d_model: int = 32) -> T5Config:
    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                    feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def random_text_encoder(seed: int = 0, d_model: int = 32) -> tuple[T5EncoderModel, PreTrainedTokenizerFast]:
    tokenizer = word_tokenizer()
    vocab_size = -(-len(tokenizer) // 8) * 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(small_t5_config(vocab_size, d_model))
    return model.eval(), tokenizer


def random_codec(config: AudioGenConfig, seed: int = 0) -> Codec:
    return build_encodec(sample_rate=config.sample_rate, n_q=config.n_q, card=config.card, num_filters=4,
                         hidden_size=16, num_lstm_layers=1, audio_channels=config.audio_channels, seed=seed)


def scratch_model(config: AudioGenConfig, t5: torch.nn.Module, tokenizer: Any, codec: Codec, *, seed: int = 0,
                  source: dict[str, Any] | None = None, device: torch.device | str = "cpu") -> AudioGen:
    """An AudioGen around the given T5, tokenizer and codec whose LM and text projection are freshly initialised,
    exactly as a from-scratch training run initialises them (`audiogen.training.build_scratch_module`)."""
    from audiogen.training import build_scratch_module

    module = build_scratch_module(config, t5.config.d_model, seed=seed)
    text = TextConditioner(t5, tokenizer, dim=config.dim, max_tokens=config.max_text_tokens)
    text.output_proj.load_state_dict(module.text_proj.state_dict())
    return AudioGen(config, module.lm, text, codec, source=source, device=device)


def random_model(seed: int = 0, *, device: torch.device | str = "cpu", size: str = "tiny",
                 **overrides: Any) -> AudioGen:
    """A random but fully deterministic AudioGen of preset `size` (default `tiny`)."""
    config = AudioGenConfig.preset(size, **overrides)
    return scratch_model(config, *random_text_encoder(seed, d_model=config.text_dim), random_codec(config, seed),
                         seed=seed, source={"format": "tiny-random", "seed": seed}, device=device)

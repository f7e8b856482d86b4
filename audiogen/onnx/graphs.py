"""The `torch.nn.Module` wrappers that `audiogen.onnx.export` traces into the three ONNX graphs.

Each wrapper reuses the weights of the PyTorch model (no copy) and writes the computation with explicit
tensors in and out, the way a runtime without PyTorch has to drive it:

- `TextEncoderGraph`: token ids + attention mask -> projected text (T5 + output projection, zero at padding)
  and every layer's cross-attention keys/values of it (computed once per prompt, so the step graph never
  re-projects the text);
- `StepGraph`: S new positions per row over an explicit self-attention cache `past_*` and explicit
  cross-attention keys/values -> the last position's logits and the new positions' own keys/values (the
  runtime writes them into its cache). S = 1 is a decoding step (`LanguageModel.step`), S = P a prefill
  (`LanguageModel.prefill`) with a dummy one-position past that is masked out;
- `AudioDecoderGraph`: codes -> waveform (dequantize + SEANet decoder of EnCodec, stereo de-interleaving).

None of them re-implements the model: the step graph is `LanguageModel.run`, the one layer loop of the PyTorch
backend, and the decoder graph is `Codec.synthesize`, the codec's own decode path; the wrappers only adapt
explicit tensors in and out. The step graph swaps the attention op for `_attend` (explicit masked softmax):
`scaled_dot_product_attention` also exports at opset 17, but its decomposition adds q/k rescaling and a NaN
guard to every attention, which made the tiny step graph 15-30% slower in onnxruntime (2-32 rows). Logits
agree with the PyTorch backend to float32 rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from audiogen.codec import Codec
from audiogen.errors import CheckpointError
from audiogen.lm import LanguageModel
from audiogen.text import TextConditioner


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) where mask else -inf) v; every query has at least one visible key."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class TextEncoderGraph(nn.Module):
    """input_ids [B, L], attention_mask [B, L] -> text [B, L, dim], cross_keys/cross_values
    [layers, B, heads, L, head_dim]."""

    def __init__(self, text: TextConditioner, lm: LanguageModel) -> None:
        super().__init__()
        self.t5 = text.t5
        self.output_proj = text.output_proj
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.t5(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text = self.output_proj(hidden.float()) * attention_mask[..., None].to(torch.float32)
        text = text.to(self.lm.out_norm.weight.dtype)
        keys, values = zip(*self.lm.project_text(text))
        return text, torch.stack(keys), torch.stack(values)


class StepGraph(nn.Module):
    """One call of the LM over S new positions per row (see the module docstring): `LanguageModel.run` with the
    past as explicit tensors, each layer's new keys/values collected as outputs and concatenated after it.

    tokens [R, K, S] int64, positions [R, S] int64 (each row's new positions, consecutive; past keys j are
    visible to a row iff j < positions[r, 0]), past_keys/past_values [layers, R, heads, T, head_dim],
    cross_keys/cross_values [layers, R, heads, Lt, head_dim], cross_mask [R, Lt] bool
    -> logits [R, K, card] of the last new position, new_keys/new_values [layers, R, heads, S, head_dim].
    """

    def __init__(self, lm: LanguageModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, past_keys: torch.Tensor,
                past_values: torch.Tensor, cross_keys: torch.Tensor, cross_values: torch.Tensor,
                cross_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Self-attention mask [R, 1, S, T + S]: cached positions before the first new one, then causal.
        past_visible = torch.arange(past_keys.shape[3], device=positions.device)[None, None, :] < positions[:, :1, None]
        new_visible = positions[:, None, :] <= positions[:, :, None]
        mask = torch.cat([past_visible.expand(-1, positions.shape[1], -1), new_visible], dim=2)[:, None]

        new_keys, new_values = [], []

        def past(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            new_keys.append(k)
            new_values.append(v)
            return torch.cat([past_keys[layer], k], dim=2), torch.cat([past_values[layer], v], dim=2)

        cross = [(cross_keys[layer], cross_values[layer]) for layer in range(len(self.lm.layers))]
        hidden = self.lm.run(tokens, positions, mask, past, cross, cross_mask, attend=_attend)
        return self.lm.logits(hidden[:, -1:])[:, :, 0], torch.stack(new_keys), torch.stack(new_values)


class AudioDecoderGraph(nn.Module):
    """codes [B, K, T] int64 -> audio [B, channels, T * hop] float32: `Codec.synthesize` of exactly T frames for
    every clip and channel at once (what `Codec.decode`'s buckets reproduce), channels as `Codec.mono_codes`
    de-interleaves them."""

    def __init__(self, codec: Codec) -> None:
        super().__init__()
        if codec.model.config.pad_mode != "constant":
            raise CheckpointError(f"ONNX export supports zero-padded EnCodec decoders, this one pads with "
                                  f"{codec.model.config.pad_mode!r} (its short-input special case depends on the "
                                  f"length, which a trace would freeze)")
        self.codec = codec

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        audio = self.codec.synthesize(self.codec.mono_codes(codes))
        return audio.reshape(codes.shape[0], self.codec.channels, -1)

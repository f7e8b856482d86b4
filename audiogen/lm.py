"""The transformer language model over EnCodec codebooks (AudioGen/MusicGen architecture).

Pre-norm layers of causal self-attention, cross-attention to the projected text and a GELU feed-forward, over
the sum of one embedding per codebook plus sinusoidal positions; one output head per codebook.

One layer function (`TransformerLayer.forward`) and one loop over the layers (`LanguageModel.run`) serve every
use; the uses differ only in the positions, the self-attention mask and the `Past`, which receives each layer's
new keys/values and returns the ones they attend to:
- `forward`: the whole sequence at once from position 0 (training, teacher-forced scoring), causal, no past;
- `prefill`: the same over a known prefix, also writing its keys/values into rows of a `KVCache`;
- `step`: one new position for each active cache row, each row at its own position (continuous batching),
  attending to the row's cached positions;
- `audiogen.onnx.graphs.StepGraph`: new positions over explicit past key/value tensors, traced into ONNX (it
  also swaps the attention op, the only other variation point, for one that traces to plain ONNX operators).
Cross-attention keys/values are computed once per request (`project_text`) and reused by every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from audiogen.config import AudioGenConfig
from audiogen.kv_cache import KVCache

# (layer index, new keys, new values [B, H, S, hd]) -> the keys/values the new positions attend to. A cache
# stores the new ones and returns its view of the attended positions; the ONNX step graph collects them as outputs
# and concatenates them after its explicit past.
Past = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
LayerPast = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # `Past` of one layer
# (queries, keys, values, boolean mask or None for causal from position 0) -> attention output.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
TextKV = Sequence[tuple[torch.Tensor, torch.Tensor]]


def sinusoidal_table(num_positions: int, dim: int, max_period: float) -> torch.Tensor:
    """`cat(cos, sin)` positions with frequencies `max_period ** (-i / (dim/2 - 1))`, as audiocraft and
    transformers' MusicGen compute them (same float32 operations, so logits match theirs closely)."""
    half = dim // 2
    scale = math.log(max_period) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.int64).float() * -scale)
    phase = torch.arange(num_positions, dtype=torch.int64).float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)


def text_attention_mask(text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key mask [B, 1, 1, L] and output gate [B, 1, 1] for cross-attention.

    A row whose text is the null condition (empty prompt, CFG's unconditional branch) must contribute exactly
    zero, as in audiocraft (its projected text is all zeros) and transformers (fully masked). A fully masked
    softmax would be NaN, so such rows keep key 0 visible and are gated to zero instead. Written without
    in-place indexing, so that it traces into ONNX as it runs in PyTorch.
    """
    has_text = text_mask.any(dim=-1, keepdim=True)
    keys = text_mask | F.pad(~has_text, (0, text_mask.shape[-1] - 1))
    return keys[:, None, None, :], has_text.to(torch.float32)[:, :, None]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`scaled_dot_product_attention` with a boolean key mask, or causal from position 0 when `mask` is None
    (its fused causal kernel, which never materialises the mask)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def split_heads(x: torch.Tensor, shape: Sequence[int], parts: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    """[B, S, parts * dim] -> `parts` views [B, H, S, head_dim] (fused projections: q/k/v, k/v, or q alone).

    `shape` is (B, S), read once by `LanguageModel.run` for all layers: in an ONNX trace every read of a tensor's
    shape becomes its own chain of shape operators, and a split along the heads axis is one operator where
    unpacking a permuted [parts, ...] tensor is three per part."""
    heads = x.view(*shape, parts * num_heads, -1).transpose(1, 2)
    return heads.split(num_heads, dim=1) if parts > 1 else (heads,)


def merge_heads(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """[B, H, S, head_dim] -> [B, S, H * head_dim], `shape` = (B, S) as for `split_heads`."""
    return x.transpose(1, 2).reshape(*shape, -1)


# `Linear`'s CPU inference path: at most this many rows (measured faster up to 64; larger products, as in prefill
# and training, stay on the stock kernel) and weights at least this large (smaller ones stay in cache, where the
# stock kernel is as fast and the extra transposes would only add per-call overhead).
CPU_FEW_ROWS = 64
CPU_STREAMED_WEIGHT = 1 << 18


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict keys) whose CPU inference on few rows computes `W @ x.T`.

    Decoding steps multiply a handful of rows (2 per request with CFG) by every weight matrix, so on a CPU they
    are bound by streaming the weights from memory. With this torch CPU build `F.linear` on 2-4 rows streams
    them at ~10 GB/s on a 2-core machine, while the same product with the weight as the left operand reaches
    ~40 GB/s (and is 1.1-1.3x faster at 16-64 rows): the small model's single-request step went from 137 ms to
    about 80 ms. Training (grad enabled), GPUs, large products and cache-sized weights keep `F.linear`, and so
    does an ONNX export: a trace would freeze this path into the graph, where onnxruntime, which pre-packs a
    constant right-hand weight, ran `W @ x.T` several times slower than the plain product.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (x.device.type != "cpu" or torch.is_grad_enabled() or rows > CPU_FEW_ROWS
                or self.weight.numel() < CPU_STREAMED_WEIGHT or torch.jit.is_tracing()):
            return F.linear(x, self.weight, self.bias)
        # Contiguous, as F.linear's output is: a transposed view would give scaled_dot_product_attention queries
        # with a strided head dimension, which sends it down the math path that copies all cached keys and values.
        out = (self.weight @ x.reshape(rows, self.in_features).t()).t().contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (audiocraft's `in_proj_weight`)."""

    def __init__(self, config: AudioGenConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.in_proj = Linear(config.dim, 3 * config.dim, bias=config.bias_attn)
        self.out_proj = Linear(config.dim, config.dim, bias=config.bias_attn)

    def forward(self, x: torch.Tensor, shape: Sequence[int], mask: torch.Tensor | None, past: LayerPast | None,
                attend: Attend) -> torch.Tensor:
        """x [B, S, dim] -> [B, S, dim]; the new positions' keys/values [B, H, S, hd] go to `past`."""
        q, k, v = split_heads(self.in_proj(x), shape, 3, self.num_heads)
        keys, values = past(k, v) if past is not None else (k, v)
        return self.out_proj(merge_heads(attend(q, keys, values, mask), shape))


class CrossAttention(nn.Module):
    """Attention from audio positions to the projected text; keys/values are computed once per request."""

    def __init__(self, config: AudioGenConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.q_proj = Linear(config.dim, config.dim, bias=config.bias_attn)
        self.kv_proj = Linear(config.dim, 2 * config.dim, bias=config.bias_attn)
        self.out_proj = Linear(config.dim, config.dim, bias=config.bias_attn)

    def project(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text [B, L, dim] -> keys, values [B, H, L, hd]."""
        return split_heads(self.kv_proj(text), text.shape[:2], 2, self.num_heads)

    def forward(self, x: torch.Tensor, shape: Sequence[int], text_kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor, gate: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x [B, S, dim] -> [B, S, dim], attending to this layer's text keys/values [B, H, L, hd]."""
        q = split_heads(self.q_proj(x), shape, 1, self.num_heads)[0]
        out = merge_heads(attend(q, text_kv[0], text_kv[1], mask), shape)
        return self.out_proj(out * gate.to(out.dtype))


class FeedForward(nn.Module):
    def __init__(self, config: AudioGenConfig) -> None:
        super().__init__()
        self.linear1 = Linear(config.dim, config.ffn_dim, bias=config.bias_ff)
        self.linear2 = Linear(config.ffn_dim, config.dim, bias=config.bias_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class TransformerLayer(nn.Module):
    """`x + SA(norm(x))`, `x + CA(norm(x), text)`, `x + FF(norm(x))` (audiocraft's norm_first layer)."""

    def __init__(self, config: AudioGenConfig) -> None:
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.self_attn = SelfAttention(config)
        self.cross_attn_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.cross_attn = CrossAttention(config)
        self.ffn_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, shape: Sequence[int], self_mask: torch.Tensor | None,
                past: LayerPast | None, text_kv: tuple[torch.Tensor, torch.Tensor], text_mask: torch.Tensor,
                gate: torch.Tensor, attend: Attend = sdpa) -> torch.Tensor:
        """Hidden states [B, S, dim] of new positions -> their new hidden states.

        shape: (B, S) of x (see `split_heads`); self_mask: keys visible to each new position (None: causal from
        position 0); past: receives the new positions' keys/values [B, H, S, hd] and returns the ones attended to
        (None: only the new ones); text_kv, text_mask, gate: this layer's cross-attention keys/values and
        `text_attention_mask`.
        """
        x = x + self.self_attn(self.self_attn_norm(x), shape, self_mask, past, attend)
        x = x + self.cross_attn(self.cross_attn_norm(x), shape, text_kv, text_mask, gate, attend)
        return x + self.ffn(self.ffn_norm(x))


class LanguageModel(nn.Module):
    """Predicts the next position's token of every codebook from the delay-interleaved token sequence."""

    def __init__(self, config: AudioGenConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.ModuleList(nn.Embedding(config.card + 1, config.dim) for _ in range(config.num_codebooks))
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.out_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.heads = nn.ModuleList(Linear(config.dim, config.card, bias=False) for _ in range(config.num_codebooks))
        self.register_buffer(
            "positions", sinusoidal_table(config.max_steps, config.dim, config.positional_max_period), persistent=False
        )

    # ------------------------------------------------------------------ shared pieces
    def _position_table(self, length: int) -> torch.Tensor:
        if length > self.positions.shape[0]:
            self.positions = sinusoidal_table(length, self.config.dim, self.config.positional_max_period).to(
                self.positions.device)
        return self.positions

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B, K, S] + positions [B, S] (or [S]) -> [B, S, dim]."""
        x = self.embeddings[0](tokens[:, 0])
        for k in range(1, len(self.embeddings)):
            x = x + self.embeddings[k](tokens[:, k])
        table = self._position_table(int(positions.max()) + 1)
        return x + table[positions].to(x.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, dim] -> logits [B, K, S, card]."""
        hidden = self.out_norm(hidden)
        return torch.stack([head(hidden) for head in self.heads], dim=1)

    def project_text(self, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention keys/values [B, H, L, hd] for projected text [B, L, dim]."""
        return [layer.cross_attn.project(text) for layer in self.layers]

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, self_mask: torch.Tensor | None, past: Past | None,
            text_kv: TextKV, text_mask: torch.Tensor, attend: Attend = sdpa) -> torch.Tensor:
        """The one pass over the layers: tokens [B, K, S] at positions [B, S] (or [S]) -> hidden [B, S, dim]
        (see the module docstring for the uses)."""
        x = self.embed(tokens, positions)
        shape = x.shape[:2]
        mask, gate = text_attention_mask(text_mask)
        for index, layer in enumerate(self.layers):
            layer_past = None if past is None else partial(past, index)
            x = layer(x, shape, self_mask, layer_past, text_kv[index], mask, gate, attend)
        return x

    # ------------------------------------------------------------------ whole sequences
    def forward(self, tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, K, S, card] for tokens [B, K, S] starting at position 0."""
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        return self.logits(self.run(tokens, positions, None, None, self.project_text(text), text_mask))

    def prefill(self, tokens: torch.Tensor, cache: KVCache, rows: slice) -> None:
        """Run a known prefix (positions 0..S-1) for cache rows `rows`, whose text K/V are already stored,
        only to write their self-attention keys/values: the next `step` continues at position S."""
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        self.run(tokens, positions, None, lambda layer, k, v: cache.write_prefix(layer, rows, k, v),
                 *cache.text_view(rows))

    # ------------------------------------------------------------------ one step per row
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, num_rows: int,
             length: int) -> torch.Tensor:
        """Logits [R, K, card] for one new position per cache row 0..R-1.

        tokens [R, K] are the inputs at each row's own position `positions [R]`; rows attend to their cached
        positions 0..pos (`length` = max(pos) + 1 bounds the keys read, so early steps stay cheap).
        """
        self_mask = (torch.arange(length, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        rows = slice(0, num_rows)
        hidden = self.run(tokens[:, :, None], positions[:, None], self_mask,
                          lambda layer, k, v: cache.write_step(layer, positions, k, v, length), *cache.text_view(rows))
        return self.logits(hidden)[:, :, 0]

    # ------------------------------------------------------------------ training from scratch
    def reset_parameters(self, seed: int | None = None) -> None:
        """audiocraft's `gaussian` init with `current` depthwise scaling: truncated normal with
        std = 1/sqrt(fan_in), divided by sqrt(2 * (layer + 1)) inside layer `layer`; zero biases; unit norms."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None

        def init_linear(weight: torch.Tensor, depth: int | None) -> None:
            std = 1.0 / math.sqrt(weight.shape[1])
            if depth is not None:
                std /= math.sqrt(2 * (depth + 1))
            values = torch.empty(weight.shape, dtype=torch.float32)
            nn.init.trunc_normal_(values, std=std, a=-3 * std, b=3 * std, generator=generator)
            with torch.no_grad():
                weight.copy_(values)

        for module in [*self.embeddings, *self.heads]:
            init_linear(module.weight, None)
        for depth, layer in enumerate(self.layers):
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    init_linear(module.weight, depth)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        nn.init.ones_(self.out_norm.weight)
        nn.init.zeros_(self.out_norm.bias)

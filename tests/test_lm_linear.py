"""`audiogen.lm.Linear`: the CPU few-rows inference path computes the same product as `nn.Linear`, keeps its
state-dict keys, and is not taken where it does not apply (grad enabled, many rows, cache-sized weights)."""

import pytest
import torch
import torch.nn.functional as F

from audiogen import lm
from audiogen.config import AudioGenConfig
from audiogen.kv_cache import KVCache
from audiogen.lm import CPU_FEW_ROWS, CPU_STREAMED_WEIGHT, Linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 1024), (3, 1, 1024), (CPU_FEW_ROWS, 1024)])
def test_few_rows_path_matches_f_linear(bias, shape):
    torch.manual_seed(0)
    layer = Linear(1024, 512, bias=bias)
    assert layer.weight.numel() >= CPU_STREAMED_WEIGHT
    x = torch.randn(*shape)
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == (*shape[:-1], 512)
    assert out.is_contiguous(), "F.linear's output is contiguous; downstream kernels rely on it"
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_same_state_dict_keys_as_nn_linear():
    assert Linear(8, 4).state_dict().keys() == torch.nn.Linear(8, 4).state_dict().keys()
    assert isinstance(Linear(8, 4), torch.nn.Linear)


def test_stock_kernel_where_the_fast_path_does_not_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(lm.F, "linear", lambda *args: calls.append(args[0].shape) or torch.zeros(1))
    big, small = Linear(1024, 512), Linear(64, 64)
    with torch.no_grad():
        big(torch.randn(2, 1024))  # fast path: no F.linear call
        assert calls == []
        big(torch.randn(CPU_FEW_ROWS + 1, 1024))  # many rows
        small(torch.randn(2, 64))  # cache-sized weight
    big(torch.randn(2, 1024))  # grad enabled (training)
    assert len(calls) == 3


def test_decoding_step_gives_attention_queries_with_a_dense_head_dimension(monkeypatch):
    """A query whose head dimension is strided sends CPU scaled_dot_product_attention down its math path, which
    copies every cached key and value on each call (it made the small model's 32-row step ~2x slower). The fast
    path's transposed product must therefore not leak out of `Linear`."""
    config = AudioGenConfig.preset("tiny", dim=512, num_heads=8, num_layers=1, ffn_dim=512)
    model = lm.LanguageModel(config).eval()
    assert model.layers[0].self_attn.in_proj.weight.numel() >= CPU_STREAMED_WEIGHT  # the fast path applies
    rows, length = 4, 10
    cache = KVCache(num_layers=1, rows=rows, num_heads=8, head_dim=64, max_steps=config.max_steps, text_tokens=3,
                    device="cpu", dtype=torch.float32)
    cache.text_mask[:, :2] = True
    queries = []
    real_attention = lm.F.scaled_dot_product_attention
    def recording_attention(q, *args, **kwargs):
        queries.append(q.stride(-1) == 1)
        return real_attention(q, *args, **kwargs)

    monkeypatch.setattr(lm.F, "scaled_dot_product_attention", recording_attention)
    with torch.inference_mode():
        model.step(torch.zeros(rows, config.num_codebooks, dtype=torch.long), torch.full((rows,), length - 1), cache,
                   rows, length)
    assert queries == [True, True]  # self- and cross-attention


def test_a_trace_records_the_plain_product():
    """An ONNX export traces the module: the few-rows `W @ x.T` form must not be frozen into the graph, where
    onnxruntime (which pre-packs a constant right-hand weight) ran it about 2x slower."""
    layer = Linear(1024, 512).eval()
    assert layer.weight.numel() >= CPU_STREAMED_WEIGHT
    with torch.no_grad():
        graph = str(torch.jit.trace(layer, torch.randn(2, 1024)).graph)
    assert "aten::linear" in graph and "aten::matmul" not in graph, graph

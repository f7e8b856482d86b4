"""`audiogen.lm.Linear`: the CPU few-rows inference path computes the same product as `nn.Linear`, keeps its
state-dict keys, and is not taken where it does not apply (grad enabled, many rows, cache-sized weights)."""

import pytest
import torch
import torch.nn.functional as F

from audiogen import lm
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

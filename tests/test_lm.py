"""`LanguageModel`'s entry points are one layer loop: a prefill followed by steps, each row at its own position,
gives the teacher-forced `forward` logits of the same sequence."""

import pytest
import torch

from audiogen.config import AudioGenConfig
from audiogen.kv_cache import KVCache
from audiogen.lm import LanguageModel


@pytest.mark.parametrize("overrides", [{}, {"dim": 512, "num_heads": 8, "num_layers": 1, "ffn_dim": 512}],
                         ids=["tiny", "cpu-few-rows-linear"])
def test_prefill_then_steps_give_the_forward_logits(overrides):
    config = AudioGenConfig.preset("tiny", **overrides)
    lm = LanguageModel(config).eval()
    lm.reset_parameters(seed=0)
    generator = torch.Generator().manual_seed(0)
    rows, length = 4, 12
    tokens = torch.randint(0, config.card + 1, (rows, config.num_codebooks, length), generator=generator)
    text = torch.randn(rows, 5, config.dim, generator=generator)
    text_mask = torch.ones(rows, 5, dtype=torch.bool)
    text_mask[1, 3:] = False  # padded text
    text_mask[3] = False  # null condition (gated to zero)
    starts = torch.tensor([1, 2, 5, 5])
    cache = KVCache(num_layers=config.num_layers, rows=rows, num_heads=config.num_heads, head_dim=config.head_dim,
                    max_steps=config.max_steps, text_tokens=8, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        want = lm(tokens, text, text_mask)
        cache.store_text(slice(0, rows), lm.project_text(text), text_mask)
        for row, start in enumerate(starts.tolist()):
            lm.prefill(tokens[row:row + 1, :, :start], cache, slice(row, row + 1))
        for offset in range(length - int(starts.max())):
            positions = starts + offset
            got = lm.step(tokens[torch.arange(rows), :, positions], positions, cache, rows, int(positions.max()) + 1)
            torch.testing.assert_close(got, want[torch.arange(rows), :, positions], rtol=1e-4, atol=1e-4)

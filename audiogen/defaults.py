"""The embedded default model, used when no checkpoint is given (CLI, pipelines, smoke runs).

Until a trained demo model ships with the package, the default is the deterministic tiny random model: it
exercises every code path end to end, but its audio is noise.
"""

from __future__ import annotations

import torch

from audiogen.model import AudioGen


def default_model(*, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AudioGen:
    from audiogen.testing import tiny_model

    model = tiny_model(seed=0, device=device or "cpu")
    if dtype is not None:
        model.to(lm_dtype=dtype)
    return model

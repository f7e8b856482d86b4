import os

import pytest
import torch

# Tests never touch the network: transformers/huggingface_hub must resolve everything locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    """The deterministic tiny model (shared: tests must not mutate it)."""
    from audiogen.testing import tiny_model

    model = tiny_model(seed=0)
    yield model
    model.close()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A tiny random transformers MusicGen saved with save_pretrained, and the in-memory original."""
    from tests.hf_fixture import save_tiny_hf_musicgen

    directory, model = save_tiny_hf_musicgen(tmp_path_factory.mktemp("hf_musicgen"), seed=0)
    return directory, model

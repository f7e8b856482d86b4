"""Text conditioning: T5 encoder + its tokenizer + a projection to the LM width.

The T5 is frozen and runs in float32 (as audiocraft runs it). Padded positions are zeroed and masked; an empty
prompt is the null condition (no visible text, zero cross-attention output), which is also what the
unconditional branch of classifier-free guidance uses unless a negative prompt replaces it.

Unlike audiocraft (which pads a batch to its longest prompt and lets padding dilute attention), padded keys are
masked, so a prompt's conditioning never depends on the other prompts of its batch. For a single prompt the two
agree exactly: audiocraft's conditional row has no padding then.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from audiogen.codec import _hub_cache_dir
from audiogen.errors import CheckpointError, InvalidRequestError, MissingCheckpointFileError


def load_text_encoder(source: str | os.PathLike[str]) -> tuple[T5EncoderModel, PreTrainedTokenizerBase]:
    """Resolve a T5 encoder and tokenizer offline: a local directory, or a name in the Hugging Face cache.

    Weights are never downloaded at run time; a missing encoder fails with instructions instead.
    """
    source = str(source)
    local = Path(source).expanduser()
    target = str(local) if local.is_dir() else source
    # The cache is read from the environment now: transformers fixes its default when it is imported.
    cache = None if local.is_dir() else _hub_cache_dir()
    try:
        model = T5EncoderModel.from_pretrained(target, local_files_only=True, cache_dir=cache)
        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True, cache_dir=cache)
    except (OSError, ValueError) as error:
        where = f"directory {local}" if local.is_dir() else (
            f"{source!r}: not a local directory and not in the Hugging Face cache ({cache})")
        raise MissingCheckpointFileError(
            f"text encoder could not be loaded from {where}. audiogen never downloads weights at run time: "
            f"fetch it once (e.g. `huggingface-cli download {source}`) or pass text_encoder=<directory with a "
            f"T5 model and its tokenizer>. Cause: {error}") from error
    check_tokenizer(model, tokenizer)
    return model.eval(), tokenizer


def check_tokenizer(model: T5EncoderModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """A tokenizer with ids beyond the encoder's embedding table would index out of range at run time."""
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {len(tokenizer)} tokens but the text encoder's embedding has only "
            f"{model.config.vocab_size} rows: tokenizer and text encoder do not belong together")


class PromptEncoder(nn.Module):
    """What the PyTorch and ONNX text conditioners share: tokenization with the length limit, and prompts ->
    (rows [B, L, width] zero at padding, mask [B, L] bool) through a cache of encoded prompts (least recently
    used evicted beyond `cache_bytes`). Subclasses encode the missing prompts (`_encode`: one [L, width] row each).
    An empty/whitespace prompt is the null condition: no visible position."""

    def __init__(self, tokenizer: Any, *, max_tokens: int, width: int, cache_bytes: int = 256 << 20) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.width = width
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def token_ids(self, prompts: list[str], field: str = "prompt") -> list[list[int]]:
        """Tokenize and enforce the length limit, naming the offending prompt."""
        ids = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        for index, (prompt, tokens) in enumerate(zip(prompts, ids)):
            if len(tokens) > self.max_tokens:
                name = field if len(prompts) == 1 else f"{field}[{index}]"
                raise InvalidRequestError(name, f"prompt is {len(tokens)} tokens long", value=prompt[:80],
                                          limit=f"at most {self.max_tokens} tokens")
        return ids

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            missing = [p for p in dict.fromkeys(prompts) if p.strip() and p not in self._cache]
            encoded = dict(zip(missing, self._encode(missing))) if missing else {}
            rows = [None if not p.strip() else encoded[p] if p in encoded else self._cache[p] for p in prompts]
            for prompt, row in encoded.items():
                self._remember(prompt, row)
            for prompt in prompts:
                if prompt in self._cache:
                    self._cache.move_to_end(prompt)
        length = max([1] + [row.shape[0] for row in rows if row is not None])
        text = torch.zeros((len(prompts), length, self.width))
        mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for index, row in enumerate(rows):
            if row is not None:
                text[index, :row.shape[0]] = row
                mask[index, :row.shape[0]] = True
        return text, mask

    def _encode(self, prompts: list[str]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _remember(self, prompt: str, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if size > self._cache_bytes:
            return
        self._cache[prompt] = row
        self._cached_bytes += size
        while self._cached_bytes > self._cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()


class TextConditioner(PromptEncoder):
    """prompts -> (text [B, L, dim] zero at padding, mask [B, L]) for the LM's cross-attention."""

    def __init__(self, t5: T5EncoderModel, tokenizer: PreTrainedTokenizerBase, *, dim: int, max_tokens: int,
                 project: bool = True) -> None:
        check_tokenizer(t5, tokenizer)
        text_dim = t5.config.d_model
        if not project and text_dim != dim:
            raise CheckpointError(f"text encoder width {text_dim} != LM width {dim} and the checkpoint has no "
                                  f"projection")
        super().__init__(tokenizer, max_tokens=max_tokens, width=dim)
        self.t5 = t5.eval().requires_grad_(False)
        self.output_proj: nn.Module = nn.Linear(text_dim, dim) if project else nn.Identity()

    @property
    def text_dim(self) -> int:
        return self.t5.config.d_model

    @torch.inference_mode()
    def _encode(self, prompts: list[str]) -> list[torch.Tensor]:
        ids = self.token_ids(prompts)
        device = next(self.t5.parameters()).device
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        input_ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = self.t5(input_ids=input_ids, attention_mask=attention).last_hidden_state
        projected = self.output_proj(hidden.float()) * attention[..., None]
        return [projected[index, :int(attention[index].sum())].to("cpu", copy=True) for index in range(len(prompts))]

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
from collections import OrderedDict
from pathlib import Path

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


class TextConditioner(nn.Module):
    """prompts -> (text [B, L, dim] zero at padding, mask [B, L]) for the LM's cross-attention."""

    def __init__(self, t5: T5EncoderModel, tokenizer: PreTrainedTokenizerBase, *, dim: int, max_tokens: int,
                 project: bool = True, cache_size: int = 1024) -> None:
        super().__init__()
        check_tokenizer(t5, tokenizer)
        self.t5 = t5.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        text_dim = t5.config.d_model
        if not project and text_dim != dim:
            raise CheckpointError(f"text encoder width {text_dim} != LM width {dim} and the checkpoint has no projection")
        self.output_proj: nn.Module = nn.Linear(text_dim, dim) if project else nn.Identity()
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def text_dim(self) -> int:
        return self.t5.config.d_model

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
        """Encode prompts (empty/whitespace = null condition) -> (text [B, L, dim], mask [B, L] bool)."""
        missing = [p for p in dict.fromkeys(prompts) if p.strip() and p not in self._cache]
        if missing:
            self._encode_into_cache(missing)
        rows = [self._cache[p] if p.strip() else None for p in prompts]
        for prompt in prompts:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
        length = max([1] + [r[0].shape[0] for r in rows if r is not None])
        proj_dim = self._output_dim()
        text = torch.zeros((len(prompts), length, proj_dim))
        mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for index, row in enumerate(rows):
            if row is not None:
                text[index, :row[0].shape[0]] = row[0]
                mask[index, :row[1].shape[0]] = row[1]
        return text, mask

    def _output_dim(self) -> int:
        proj = self.output_proj
        return proj.out_features if isinstance(proj, nn.Linear) else self.text_dim

    @torch.inference_mode()
    def _encode_into_cache(self, prompts: list[str]) -> None:
        ids = self.token_ids(prompts)
        device = next(self.t5.parameters()).device
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        input_ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = self.t5(input_ids=input_ids, attention_mask=attention).last_hidden_state
        projected = self.output_proj(hidden.float()) * attention[..., None]
        for index, prompt in enumerate(prompts):
            length = int(attention[index].sum())
            self._cache[prompt] = (projected[index, :length].cpu(), attention[index, :length].bool().cpu())
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

"""Training the LM on (caption, codes) pairs: pure torch, importable without Ray.

The Ray job (`pipelines/train.py`) only moves data and processes around these pieces: `collate` (codes ->
delay-pattern batches), `lm_loss`, condition dropout (`drop_conditions`), the cached frozen T5 (`CaptionEncoder`),
`build_optimizer`, `TrainState` (the LM's `audiogen.train_loop.Stepper`, with evaluation and checkpoints, which
`train_loop.run` drives) and `export_model`.

Loss scaling under accumulation and data parallelism: each micro-batch's loss is its own masked mean, the step's
gradient is the average over micro-batches (and DDP averages over workers), as in audiocraft.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from audiogen.config import PRESETS, AudioGenConfig
from audiogen.errors import InvalidConfigError
from audiogen.lm import LanguageModel
from audiogen.options import check_choices, option
from audiogen.patterns import build_delay_pattern, pattern_frame_index
from audiogen.train_loop import SCHEDULES, Reduce, Schedule, Stepper

CHECKPOINT_STATE_FILE = "training_state.pt"
CHECKPOINT_META_FILE = "training_meta.json"
CHECKPOINT_FORMAT = "audiogen-train"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------- Configuration
@dataclass
class TrainingConfig:
    """Optimisation settings; defaults are audiocraft's AudioGen recipe except where noted."""

    lr: float = option(5e-4, help="peak learning rate")
    betas: tuple[float, float] = option((0.9, 0.95), help="AdamW betas")
    weight_decay: float = option(0.1, help="AdamW weight decay of matrices and embeddings (none on biases, norms)")
    eps: float = option(1e-8, help="AdamW epsilon")
    schedule: str = option("inverse_sqrt", help="learning rate after the linear warmup", choices=SCHEDULES)
    warmup_steps: int = option(3000, help="linear warmup steps")
    max_steps: int = option(100_000, help="the cosine schedule decays over this many steps")
    min_lr_ratio: float = option(0.0, help="cosine floor, as a fraction of lr")
    grad_clip: float = option(1.0, help="gradient norm clip (0: none)")
    grad_accum: int = option(1, help="micro-batches per optimizer step")
    cfg_dropout: float = option(0.1, help="probability of training on the null condition (classifier-free guidance)")
    cfg_dropout_mode: str = option("sample", choices=("sample", "batch"),
                                   help="drop per example (sample) or whole micro-batches (batch, audiocraft)")
    loss_weighting: str = option("codebook", choices=("codebook", "token"),
                                 help="mean of per-codebook means (codebook, audiocraft) or over all tokens (token)")
    precision: str = option("auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on GPU, fp32 on CPU")
    text_cache_size: int = option(4096, help="captions whose T5 output is kept in CPU memory (0: no cache)")
    seed: int = option(0, help="seed of the condition dropout")

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise InvalidConfigError(f"training.{name}", f"{rule} (got {getattr(self, name)!r})")

        check_choices(self, "training.")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.max_steps >= 1, "max_steps", "must be >= 1")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        need(isinstance(self.grad_accum, int) and self.grad_accum >= 1, "grad_accum", "must be an integer >= 1")
        need(0 <= self.cfg_dropout <= 1, "cfg_dropout", "must be in [0, 1]")
        need(self.text_cache_size >= 0, "text_cache_size", "must be >= 0")

    def lr_schedule(self) -> Schedule:
        return Schedule(self.schedule, self.warmup_steps, self.max_steps, self.min_lr_ratio)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingConfig":
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise InvalidConfigError(f"training.{unknown[0]}", f"unknown training option(s) {unknown}")
        return cls(**values)


# ---------------------------------------------------------------------------------------------------- Batches
@dataclass
class Batch:
    """One micro-batch: LM inputs, next-position targets and which targets count, plus the captions."""

    tokens: torch.Tensor  # [B, K, S] long: delay-pattern inputs (position 0 = start)
    targets: torch.Tensor  # [B, K, S] long: the token of position p + 1 (special where not a frame)
    mask: torch.Tensor  # [B, K, S] bool: the target is a real frame of the example
    captions: list[str]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.tokens.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                     self.mask.to(device, non_blocking=True), self.captions)


def collate(codes: Sequence[torch.Tensor | np.ndarray] | torch.Tensor, captions: Sequence[str],
            n_frames: Sequence[int] | torch.Tensor | None = None, *, delays: Sequence[int], card: int,
            max_frames: int | None = None) -> Batch:
    """Examples' codes [K, T_i] (T_i may differ) with `n_frames[i] <= T_i` real frames -> a `Batch`.

    Frames at or past `n_frames[i]` (padding of a short last segment) are never targets and never inputs: they
    become the special token `card`, as past the end of a generated clip. The batch is as long as its longest
    real example (at most `max_frames`, cropping from the start), plus `max(delays)` positions. A short segment
    thus has the pattern of a clip of its real length, padded with special tokens: its loss equals the loss of the
    short clip on its own.
    """
    delays = tuple(int(d) for d in delays)
    items = [torch.as_tensor(np.asarray(c) if not isinstance(c, torch.Tensor) else c) for c in codes]
    if not items:
        raise ValueError("collate needs at least one example")
    if len(captions) != len(items):
        raise ValueError(f"{len(items)} code arrays but {len(captions)} captions")
    lengths = [int(x) for x in (n_frames if n_frames is not None else [c.shape[-1] for c in items])]
    if len(lengths) != len(items):
        raise ValueError(f"{len(items)} code arrays but {len(lengths)} frame counts")
    for index, (item, length) in enumerate(zip(items, lengths)):
        if item.dim() != 2 or item.shape[0] != len(delays):
            raise ValueError(f"example {index}: codes have shape {tuple(item.shape)}, expected [{len(delays)}, T]")
        if not 1 <= length <= item.shape[-1]:
            raise ValueError(f"example {index}: n_frames={length} outside [1, {item.shape[-1]}]")
    if max_frames is not None:
        lengths = [min(length, int(max_frames)) for length in lengths]
    padded = torch.full((len(items), len(delays), max(lengths)), card, dtype=torch.long)
    for index, (item, length) in enumerate(zip(items, lengths)):
        real = item[:, :length].to(torch.long)
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= card):
            raise ValueError(f"example {index}: codes in [{int(real.min())}, {int(real.max())}], expected [0, {card})")
        padded[index, :, :length] = real
    sequence = build_delay_pattern(padded, delays, card)  # [B, K, frames + D + 1]
    index = pattern_frame_index(sequence.shape[-1], delays)[:, 1:]  # frame held by each target position
    mask = (index[None] >= 0) & (index[None] < torch.tensor(lengths)[:, None, None])
    return Batch(sequence[..., :-1].contiguous(), sequence[..., 1:].contiguous(), mask, list(captions))


def drop_conditions(captions: Sequence[str], p: float, mode: str, generator: torch.Generator) -> list[str]:
    """Classifier-free-guidance dropout: replace captions by "", the null condition the generator's unconditional
    branch uses, with probability p: each independently (`mode="sample"`) or all at once (`"batch"`, audiocraft).
    Per-sample dropout keeps every batch's gradient mixed (with audiocraft's per-batch draw a small batch is
    entirely unconditional one step in ten, a noisy gradient); the expected fraction of null conditions is p either
    way."""
    captions = list(captions)
    if p <= 0 or not captions:
        return captions
    if mode == "batch":
        return [""] * len(captions) if float(torch.rand((), generator=generator)) < p else captions
    draws = torch.rand(len(captions), generator=generator)
    return ["" if float(d) < p else c for c, d in zip(captions, draws)]


# ---------------------------------------------------------------------------------------------------- Loss
@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    per_codebook: torch.Tensor  # [K] detached mean CE per codebook
    ce_sum: torch.Tensor  # [K] detached sum of CE over valid positions
    count: torch.Tensor  # [K] valid positions per codebook


def combine_codebooks(ce_sum: torch.Tensor, count: torch.Tensor, weighting: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-codebook CE sums [K] and valid-position counts [K] -> (loss, mean CE per codebook [K]), weighted as
    `lm_loss` documents; one rule for a micro-batch and for a whole validation split."""
    per_codebook = ce_sum / count.clamp_min(1)
    if weighting == "token":
        return ce_sum.sum() / count.sum().clamp_min(1), per_codebook
    if weighting == "codebook":
        present = count > 0
        return (per_codebook * present).sum() / present.sum().clamp_min(1), per_codebook
    raise ValueError(f"unknown loss weighting {weighting!r}")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, weighting: str = "codebook"
            ) -> LossOutput:
    """Masked cross-entropy of logits [B, K, S, card] against targets [B, K, S] where mask [B, K, S].

    `codebook` (audiocraft): mean over codebooks (with any valid position) of each codebook's mean CE; `token`:
    the mean over all valid (codebook, position) pairs. The two differ only by how the few delay-padding positions
    count.
    """
    safe = torch.where(mask, targets, torch.zeros_like(targets))  # `collate` checked the real codes' range
    # [B*K*S, card] rows: the heads' stacked logits are contiguous in this order, so no copy (a class-dim-1
    # permute would copy the largest tensor of the step); float32 for the softmax under bf16 autocast
    card = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, card).float(), safe.reshape(-1), reduction="none").view(mask.shape)
    ce_sum, count = (ce * mask).sum(dim=(0, 2)), mask.sum(dim=(0, 2))
    loss, per_codebook = combine_codebooks(ce_sum, count, weighting)
    return LossOutput(loss, per_codebook.detach(), ce_sum.detach(), count.detach())


# ---------------------------------------------------------------------------------------------------- Modules
class ConditionedLM(nn.Module):
    """The trainable part: the text projection and the LM, in one module for DDP/FSDP.

    State-dict keys are `lm.*` (native LM keys) and `text_proj.*`, as in `model.safetensors`.
    """

    def __init__(self, lm: LanguageModel, text_proj: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.text_proj = text_proj

    def forward(self, tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """tokens [B, K, S], T5 output [B, L, text_dim], mask [B, L] -> logits [B, K, S, card]."""
        text = self.text_proj(text_hidden) * text_mask[..., None].to(text_hidden.dtype)
        return self.lm(tokens, text, text_mask)


class CaptionEncoder:
    """Frozen T5 + tokenizer -> (hidden [B, L, text_dim] float32, mask [B, L]); an empty caption is the null
    condition (no visible token). Outputs are cached per caption (LRU, on the CPU): captions repeat across the
    segments of a file and across epochs.

    Captions longer than `max_tokens` are truncated (the tokenizer keeps its end token), not refused: one long
    caption must not fail a training run.
    """

    def __init__(self, t5: nn.Module, tokenizer: Any, max_tokens: int, *, cache_size: int = 4096,
                 device: torch.device | str | None = None) -> None:
        self.t5 = t5.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        self.cache_size = int(cache_size)
        self.device = torch.device(device) if device is not None else next(t5.parameters()).device
        self.t5.to(self.device, dtype=torch.float32)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> list[torch.Tensor]:
        batch = self.tokenizer(captions, add_special_tokens=True, truncation=True, max_length=self.max_tokens,
                               padding=True, return_tensors="pt")
        ids, attention = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        hidden = self.t5(input_ids=ids, attention_mask=attention).last_hidden_state.float()
        return [hidden[i, :int(attention[i].sum())].cpu() for i in range(len(captions))]

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        wanted = [c for c in dict.fromkeys(captions) if c.strip()]
        rows = {c: self._cache[c] for c in wanted if c in self._cache}
        missing = [c for c in wanted if c not in rows]
        for caption in rows:
            self._cache.move_to_end(caption)
        self.hits += len(rows)
        self.misses += len(missing)
        if missing:
            rows.update(zip(missing, self._encode(missing)))
            if self.cache_size:
                self._cache.update((c, rows[c]) for c in missing)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        lengths = [rows[c].shape[0] if c in rows else 0 for c in captions]
        hidden = torch.zeros(len(captions), max([1, *lengths]), int(self.t5.config.d_model))
        for index, caption in enumerate(captions):
            if caption in rows:
                hidden[index, :lengths[index]] = rows[caption]
        mask = torch.arange(hidden.shape[1]) < torch.tensor(lengths, dtype=torch.long)[:, None]
        return hidden.to(self.device), mask.to(self.device)


# ---------------------------------------------------------------------------------------------------- Optimizer
def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings (>= 2-D), none on biases and norm gains (nanoGPT's split;
    audiocraft decays everything, which pulls LayerNorm gains towards zero)."""
    trained = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(module, config.weight_decay), lr=config.lr, betas=tuple(config.betas),
                             eps=config.eps, fused=any(p.is_cuda for p in module.parameters()) or None)


# --------------------------------------------------------------------------------------------------- The training state
class TrainState(Stepper):
    """The LM's `Stepper`: a micro-batch is a `Batch` whose captions go through condition dropout (seeded by
    seed, rank, step and micro-batch, so a resumed run drops the same ones), the frozen T5 and the LM under
    autocast; its metrics are `loss_q{k}` and the scored `tokens`. Adds evaluation and checkpoints."""

    def __init__(self, module: nn.Module, captions: CaptionEncoder, config: TrainingConfig, *,
                 model_config: AudioGenConfig, device: torch.device | str | None = None, rank: int = 0) -> None:
        super().__init__(module, build_optimizer(module, config), config.lr_schedule(), self._micro_batch_loss,
                         grad_clip=config.grad_clip, totals=("tokens",))
        self.captions = captions
        self.config = config
        self.model_config = model_config
        self.device = torch.device(device) if device is not None else next(module.parameters()).device
        self.rank = rank

    def collate(self, codes: Sequence[Any], captions: Sequence[str], n_frames: Sequence[int] | None = None,
                max_frames: int | None = None) -> Batch:
        return collate(codes, captions, n_frames, delays=self.model_config.delays, card=self.model_config.card,
                       max_frames=max_frames)

    def forward(self, batch: Batch, captions: Sequence[str] | None = None) -> LossOutput:
        """Loss of one micro-batch with the given (possibly dropped) captions."""
        batch = batch.to(self.device)
        hidden, text_mask = self.captions(list(batch.captions if captions is None else captions))
        bf16 = self.config.precision == "bf16" or (self.config.precision == "auto" and self.device.type == "cuda")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):  # fp32 softmax: `lm_loss`
            logits = self.module(batch.tokens, hidden, text_mask)
        return lm_loss(logits, batch.targets, batch.mask, self.config.loss_weighting)

    def _micro_batch_loss(self, batch: Batch, index: int) -> tuple[torch.Tensor, dict[str, float]]:
        digest = hashlib.sha256(f"{self.config.seed}:{self.rank}:{self.step}:{index}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        out = self.forward(batch, drop_conditions(batch.captions, self.config.cfg_dropout,
                                                  self.config.cfg_dropout_mode, generator))
        per_codebook = {f"loss_q{k}": value for k, value in enumerate(out.per_codebook.float().tolist())}
        return out.loss, {**per_codebook, "tokens": float(out.count.sum())}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch], reduce: Reduce | None = None) -> dict[str, float]:
        """Over `batches` with every caption kept (and over all workers' batches with `reduce`): `val_loss` (the
        training loss's weighting over the whole split, not a mean of batch means), `val_loss_q{k}`, `val_tokens`."""
        self.module.eval()
        sums = torch.zeros(2, self.model_config.num_codebooks, dtype=torch.float64)
        for batch in batches:
            out = self.forward(batch)
            sums += torch.stack([out.ce_sum.double(), out.count.double()]).cpu()
        self.module.train()
        if reduce is not None:
            sums = torch.tensor(reduce(sums.flatten().tolist()), dtype=torch.float64).view_as(sums)
        loss, per_codebook = combine_codebooks(sums[0], sums[1], self.config.loss_weighting)
        return {"val_loss": float(loss), **{f"val_loss_q{k}": v for k, v in enumerate(per_codebook.tolist())},
                "val_tokens": int(sums[1].sum())}

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | os.PathLike[str], *, meta: dict[str, Any] | None = None,
             write: bool = True) -> None:
        """Write a training checkpoint (full, unsharded model and optimizer state) into `directory`, only when
        `write`: gathering the state is collective under FSDP, every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not write:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step}
        torch.save({**header, "model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict()},
                   directory / CHECKPOINT_STATE_FILE)
        info = {**header, "model_config": self.model_config.to_dict(), "training_config": asdict(self.config),
                "text_projection": isinstance(getattr(self.module, "module", self.module).text_proj, nn.Linear),
                **(meta or {})}
        (directory / CHECKPOINT_META_FILE).write_text(json.dumps(info, indent=2, default=str))

    def load(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Restore model, optimizer, schedule and step from `directory`; returns its metadata."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        payload = read_checkpoint_state(directory)
        set_state_dict(self.module, self.optimizer, model_state_dict=payload["model"],
                       optim_state_dict=payload["optimizer"], options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(payload["scheduler"])
        self.step = int(payload["step"])
        return read_checkpoint_meta(directory)


def read_checkpoint_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / CHECKPOINT_STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not an audiogen training checkpoint")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT or int(payload.get("version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: not an audiogen training checkpoint of version <= {CHECKPOINT_VERSION}")
    return payload


def read_checkpoint_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(directory) / CHECKPOINT_META_FILE).read_text())


# -------------------------------------------------------------------------- Building models to train and exporting them
def scratch_config(preset: str, base: AudioGenConfig, text_dim: int, **overrides: Any) -> AudioGenConfig:
    """A `preset` LM size whose codec-facing fields (rates, codebooks, card, delays) and text encoder come from
    the base model that supplies the T5 and the codec; `overrides` change anything else."""
    values = {name: getattr(base, name) for name in ("n_q", "card", "audio_channels", "sample_rate", "frame_rate",
                                                     "delays")}
    values.update(text_encoder=base.text_encoder, text_dim=text_dim, max_text_tokens=base.max_text_tokens,
                  name=f"audiogen-{preset}")
    values.update(overrides)
    if "top_k" not in values and "top_k" not in PRESETS.get(preset, {}):
        values["top_k"] = min(AudioGenConfig.top_k, int(values["card"]))  # a small card caps the default
    return AudioGenConfig.preset(preset, **values)


def shard_fsdp(module: ConditionedLM) -> ConditionedLM:
    """Shard with FSDP2 (`torch.distributed.fsdp.fully_shard`, default process group): per layer one unit each for
    self-attention, cross-attention, its key/value projection and the feed-forward, and the root unit for the
    rest (embeddings, norms, heads, text projection). The key/value projection is its own unit because the LM
    projects the text for every layer before running them: a unit is gathered by its own forward call."""
    from torch.distributed.fsdp import fully_shard

    for layer in module.lm.layers:
        for unit in (layer.self_attn, layer.cross_attn.kv_proj, layer.cross_attn, layer.ffn):
            fully_shard(unit)
    fully_shard(module)
    return module


def build_scratch_module(config: AudioGenConfig, text_dim: int, seed: int = 0) -> ConditionedLM:
    """A freshly initialised LM (audiocraft's init) and text projection."""
    lm = LanguageModel(config)
    lm.reset_parameters(seed)
    proj = nn.Linear(text_dim, config.dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        proj.reset_parameters()
    return ConditionedLM(lm, proj)


def module_from_model(model: Any) -> ConditionedLM:
    """The trainable part of an `AudioGen` (fine-tuning), as float32 on the CPU (shares its parameters)."""
    model.to(device="cpu", lm_dtype=torch.float32)
    return ConditionedLM(model.lm, model.text.output_proj)


def export_model(checkpoint: str | os.PathLike[str], base: Any, *, source: dict[str, Any] | None = None) -> Any:
    """A training checkpoint + the `AudioGen` that supplied its T5, tokenizer and codec -> a new `AudioGen`
    (on the CPU, float32) carrying the trained LM and projection; `save_pretrained` it to publish."""
    from audiogen.model import AudioGen
    from audiogen.text import TextConditioner

    meta = read_checkpoint_meta(checkpoint)
    config = AudioGenConfig.from_dict(meta["model_config"])
    text = TextConditioner(base.text.t5, base.text.tokenizer, dim=config.dim, max_tokens=config.max_text_tokens,
                           project=bool(meta.get("text_projection", True)))
    lm = LanguageModel(config)
    ConditionedLM(lm, text.output_proj).load_state_dict(read_checkpoint_state(checkpoint)["model"], strict=True)
    info = {"format": CHECKPOINT_FORMAT, "step": meta.get("step"), "base": base.source, **(source or {})}
    return AudioGen(config, lm, text, base.codec, source=info, device="cpu", dtype=torch.float32)


def load_base_model(spec: str) -> Any:
    """`tiny` / `tiny:SEED` (the seeded random model of `audiogen.scratch`) or a checkpoint directory
    `AudioGen.from_pretrained` reads; float32 on the CPU."""
    from audiogen.model import AudioGen

    if spec == "tiny" or spec.startswith("tiny:"):
        from audiogen.scratch import random_model

        with single_thread():
            return random_model(seed=_tiny_seed(spec))
    return AudioGen.from_pretrained(spec, device="cpu", dtype=torch.float32)


def load_text_encoder_of(spec: str) -> tuple[nn.Module, Any]:
    """Only the (T5, tokenizer) of a base model spec (what a from-scratch worker needs): read directly from an
    audiogen directory's `text_encoder/`, otherwise taken from the loaded model."""
    from audiogen.text import load_text_encoder

    if spec == "tiny" or spec.startswith("tiny:"):
        from audiogen.scratch import random_text_encoder

        return random_text_encoder(_tiny_seed(spec))
    root = Path(spec).expanduser()
    config = root / "config.json"
    native = config.exists() and json.loads(config.read_text()).get("format") == "audiogen"
    if native and (root / "text_encoder").is_dir():
        return load_text_encoder(root / "text_encoder")
    model = load_base_model(spec)
    model.close()
    return model.text.t5, model.text.tokenizer


def _tiny_seed(spec: str) -> int:
    return int(spec.split(":", 1)[1]) if ":" in spec else 0


@contextlib.contextmanager
def single_thread() -> Any:
    """Run a block with one intra-op thread. The tiny codec's codebooks are drawn from an encoder forward pass,
    whose last bits depend on the thread count: built this way, `tiny` is the same codec (same checksum) in
    every process, whatever its thread settings."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

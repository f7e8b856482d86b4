"""The training loop both trainers run on: the LM (`audiogen.training.TrainState`, on Ray Train workers through
`pipelines.train`) and the codec (`audiogen.codec_training.train_codec`). Pure torch: what is distributed (gradient
all-reduce, metric sums over workers, checkpoints) comes in through the module wrapper and the hooks; what a
micro-batch's loss is, is the stepper's `loss_fn`'s.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SCHEDULES = ("inverse_sqrt", "cosine", "constant")
LossFn = Callable[[Any, int], tuple[torch.Tensor, dict[str, float]]]  # (micro-batch, index) -> (loss, metrics)
Reduce = Callable[[list[float]], list[float]]  # element-wise sum over data-parallel workers


@dataclass(frozen=True)
class Schedule:
    """The learning-rate multiplier: linear warmup, then inverse square root, cosine or constant."""

    kind: str = "constant"  # one of SCHEDULES, after the warmup
    warmup_steps: int = 0
    max_steps: int = 1  # the cosine decays over these
    min_lr_ratio: float = 0.0  # the cosine's floor, as a fraction of the peak

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr for the optimizer update number `step + 1` (0-based `step`): the last update
        of a cosine schedule runs at the floor."""
        s, warmup = step + 1, self.warmup_steps
        if warmup and s <= warmup:
            return s / warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "inverse_sqrt":
            return math.sqrt(max(warmup, 1) / s)
        progress = min(max((s - warmup) / max(self.max_steps - warmup, 1), 0.0), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce unless `sync` (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`)."""
    if sync:
        yield
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


class Stepper:
    """Module (possibly DDP/FSDP-wrapped), optimizer, schedule and step counter, with one-update training."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule, loss_fn: LossFn, *,
                 grad_clip: float = 0.0, totals: Iterable[str] = ()) -> None:
        self.module = module
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
        self.loss_fn = loss_fn
        self.grad_clip = grad_clip  # 0: no clipping (the norm is still measured)
        self.totals = frozenset(totals)  # metrics summed over micro-batches (and reported as rates), not averaged
        self.step = 0

    @property
    def lr(self) -> float:
        """The learning rate of the next update."""
        return float(self.optimizer.param_groups[0]["lr"])

    def update(self, micro_batches: Sequence[Any]) -> dict[str, float]:
        """One optimizer update over `micro_batches` (their number is this step's accumulation; the gradient is the
        mean of theirs, all-reduced on the last one only): their `loss` and metrics (means; `totals` summed) and
        `grad_norm` (before clipping)."""
        if not micro_batches:
            raise ValueError("an update needs at least one micro-batch")
        self.module.train()
        count = len(micro_batches)
        sums: Counter[str] = Counter()
        for index, batch in enumerate(micro_batches):
            with gradient_sync(self.module, index == count - 1):
                loss, metrics = self.loss_fn(batch, index)
                (loss / count).backward()
            sums.update({key: float(value) for key, value in {"loss": loss.detach(), **metrics}.items()})
        result = {key: value if key in self.totals else value / count for key, value in sums.items()}
        # plain, DDP or FSDP2 (DTensor gradients: the norm is reduced over the shards)
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip or float("inf"))
        result["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return result


class Window:
    """The metrics of the steps since the last row: their means, and per-second rates of the `totals` (tokens,
    segments)."""

    def __init__(self, totals: Iterable[str] = ()) -> None:
        self.totals = frozenset(totals)
        self.sums: Counter[str] = Counter()
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, float]) -> None:
        self.sums.update(metrics)
        self.steps += 1

    def summary(self, reduce: Reduce | None = None) -> dict[str, float]:
        """Means per step (over all workers' steps with `reduce`) and `<total>_per_s` rates. Every worker must call
        it with the same metrics (the sums are reduced in sorted key order)."""
        keys = sorted(self.sums)
        values = [float(self.steps), *(self.sums[key] for key in keys)]
        if reduce is not None:
            values = reduce(values)
        steps, elapsed = max(values[0], 1.0), max(time.perf_counter() - self.started, 1e-9)
        return {f"{key}_per_s" if key in self.totals else key: value / (elapsed if key in self.totals else steps)
                for key, value in zip(keys, values[1:])}


def run(stepper: Stepper, micro_batches: Iterable[Any], *, max_steps: int, log_every: int,
        on_row: Callable[[dict[str, Any], bool], None], grad_accum: int = 1, eval_every: int = 0,
        evaluate: Callable[[], dict[str, float]] | None = None, reduce: Reduce | None = None) -> None:
    """Train from `stepper.step` (a resumed run continues its count) until `stepper.step == max_steps`,
    `grad_accum` micro-batches per update (`micro_batches` must not run out). A row on the first step (the starting
    loss is on record), every `log_every` steps and at the end: `on_row(row, evaluated)` gets `step`, `lr` (of the
    row's last update), the window's metrics, `seconds` since this call and the latest `evaluate()` metrics
    (repeated until the next evaluation); `evaluated` says this row's step evaluated (the hook checkpoints then:
    every `eval_every` steps, 0 = only the last, and the last)."""
    batches, window = iter(micro_batches), Window(stepper.totals)
    first, started = stepper.step + 1, time.perf_counter()
    latest: dict[str, float] = {}
    while stepper.step < max_steps:
        lr = stepper.lr
        group = list(itertools.islice(batches, grad_accum))
        if len(group) < grad_accum:
            raise RuntimeError(f"the micro-batches ran out at step {stepper.step} of {max_steps}")
        window.add(stepper.update(group))
        step = stepper.step
        evaluated = step >= max_steps or bool(eval_every) and step % eval_every == 0
        if not (evaluated or step % log_every == 0 or step == first):
            continue
        row: dict[str, Any] = {"step": step, "lr": lr, **window.summary(reduce),
                               "seconds": time.perf_counter() - started}
        window = Window(stepper.totals)
        if evaluated and evaluate is not None:
            latest = evaluate()
        on_row({**row, **latest}, evaluated)

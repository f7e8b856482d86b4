"""The shared training loop (audiogen.train_loop) on a linear regression: row and evaluation cadence, resuming,
window means and rates, accumulation and clipping. The LM- and codec-specific behaviour is tested with them."""

import itertools
import math

import pytest
import torch

from audiogen.train_loop import Schedule, Stepper, Window, run


def _stepper(lr=0.1, clip=0.0, schedule=Schedule()):
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)

    def loss_fn(batch, index):
        x, y = batch
        return torch.nn.functional.mse_loss(module(x), y), {"rows": float(len(x)), "index": float(index)}

    return Stepper(module, torch.optim.SGD(module.parameters(), lr=lr), schedule, loss_fn, grad_clip=clip,
                   totals=("rows",))


def _data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.tensor([[1.0], [-2.0], [0.5]])
    while True:
        x = torch.randn(8, 3, generator=generator)
        yield x, x @ weight


def test_rows_evaluations_and_resume_follow_the_cadence():
    stepper, rows, evaluations = _stepper(), [], []

    def evaluate():
        evaluations.append(stepper.step)
        return {"val": float(stepper.step)}

    run(stepper, _data(), max_steps=10, log_every=4, eval_every=6, grad_accum=2, evaluate=evaluate,
        on_row=lambda row, evaluated: rows.append((row, evaluated)))
    assert [(row["step"], evaluated) for row, evaluated in rows] == [(1, False), (4, False), (6, True), (8, False),
                                                                    (10, True)]
    assert evaluations == [6, 10] and stepper.step == 10
    assert "val" not in rows[1][0] and rows[3][0]["val"] == 6.0  # the latest evaluation is repeated until the next
    assert all(row["index"] == 0.5 and row["rows_per_s"] > 0 for row, _ in rows)  # 2 micro-batches a step
    assert rows[-1][0]["loss"] < 0.5 * rows[0][0]["loss"]
    resumed = []
    run(stepper, _data(1), max_steps=13, log_every=4, on_row=lambda row, evaluated: resumed.append(row["step"]))
    assert resumed == [11, 12, 13] and stepper.step == 13  # first row after a restart, the cadence, the end
    with pytest.raises(RuntimeError, match="ran out at step 14"):
        run(stepper, itertools.islice(_data(), 3), max_steps=20, log_every=1, grad_accum=2,
            on_row=lambda row, evaluated: None)


def test_an_update_averages_micro_batch_gradients_and_clips():
    stepper = _stepper(lr=0.0)
    batches = list(itertools.islice(_data(), 2))
    expected = torch.autograd.grad(sum(stepper.loss_fn(b, 0)[0] for b in batches) / 2, stepper.module.weight)[0]
    stepper.optimizer.zero_grad = lambda *a, **k: None  # keep the gradient for inspection
    metrics = stepper.update(batches)
    torch.testing.assert_close(stepper.module.weight.grad, expected)
    assert metrics["rows"] == 16 and metrics["index"] == 0.5  # totals summed, other metrics averaged
    norm = metrics["grad_norm"]
    clipped = _stepper(lr=1.0, clip=norm / 4)
    before = torch.cat([p.detach().flatten() for p in clipped.module.parameters()])
    assert clipped.update(batches)["grad_norm"] == pytest.approx(norm)  # the norm before clipping
    after = torch.cat([p.detach().flatten() for p in clipped.module.parameters()])
    assert float(torch.linalg.vector_norm(after - before)) == pytest.approx(norm / 4, rel=1e-4)  # SGD, lr 1


def test_schedule_drives_the_optimizer_learning_rate():
    stepper = _stepper(lr=1.0, schedule=Schedule("cosine", warmup_steps=2, max_steps=6, min_lr_ratio=0.2))
    lrs = []
    for batch in itertools.islice(_data(), 6):
        lrs.append(stepper.lr)
        stepper.update([batch])
    assert lrs[:2] == [0.5, 1.0] and lrs[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[3] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))


def test_window_means_rates_and_reduction_over_workers():
    window = Window(totals=("tokens",))
    window.add({"loss": 2.0, "tokens": 100.0})
    window.add({"loss": 4.0, "tokens": 300.0})
    assert window.summary()["loss"] == 3.0
    window = Window(totals=("tokens",))
    window.add({"loss": 2.0, "tokens": 100.0})
    two_workers = window.summary(reduce=lambda values: [2 * v for v in values])  # an identical second worker
    assert two_workers["loss"] == 2.0 and two_workers["tokens_per_s"] > 0

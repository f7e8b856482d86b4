"""Library-level training pieces (no Ray): collate, loss, gradient check, dropout, schedules, checkpoints, export."""

import math

import numpy as np
import pytest
import torch

from audiogen import AudioGen
from audiogen.patterns import build_delay_pattern, target_mask
from audiogen.train_loop import Schedule
from audiogen.training import (CHECKPOINT_STATE_FILE, CaptionEncoder, TrainingConfig, TrainState,
                               build_scratch_module, collate, drop_conditions, export_model, lm_loss, load_base_model,
                               load_text_encoder_of, module_from_model, parameter_groups, scratch_config)

CAPTIONS = ["a low beep", "a high beep", "rain on a roof", "a dog barking"]


@pytest.fixture(scope="module")
def base():
    model = load_base_model("tiny")
    yield model
    model.close()


def _state(base, **overrides):
    config = scratch_config("tiny", base.config, base.text.text_dim)
    module = build_scratch_module(config, base.text.text_dim, seed=0)
    captions = CaptionEncoder(base.text.t5, base.text.tokenizer, config.max_text_tokens)
    values = dict(lr=3e-3, warmup_steps=2, schedule="constant", cfg_dropout=0.0)
    values.update(overrides)
    return TrainState(module, captions, TrainingConfig(**values), model_config=config, device="cpu")


def _codes(seed, n=4, frames=12, card=64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, card, (4, frames), generator=generator) for _ in range(n)]


# ------------------------------------------------------------------ collate
def test_collate_matches_the_delay_pattern_and_masks_padding():
    delays, card = (0, 1, 2, 3), 64
    codes = _codes(0)
    batch = collate(codes, CAPTIONS, [12, 12, 7, 1], delays=delays, card=card)
    assert batch.tokens.shape == batch.targets.shape == batch.mask.shape == (4, 4, 12 + 3)
    full = build_delay_pattern(torch.stack(codes), delays, card)
    assert torch.equal(batch.tokens[0], full[0, :, :-1]) and torch.equal(batch.targets[0], full[0, :, 1:])
    assert torch.equal(batch.mask[0], target_mask(15, 12, delays))
    # the short example is the pattern of its own 7 frames, then special tokens: padding is never seen
    short = build_delay_pattern(codes[2][None, :, :7], delays, card)[0]
    assert torch.equal(batch.tokens[2, :, :short.shape[-1]], short)
    assert (batch.tokens[2, :, short.shape[-1]:] == card).all()
    assert torch.equal(batch.mask[2], target_mask(15, 7, delays))
    assert int(batch.mask.sum()) == 4 * (12 + 12 + 7 + 1)
    # every masked-in target is a real code, every masked-out one the special token
    assert (batch.targets[batch.mask] < card).all() and (batch.targets[~batch.mask] == card).all()


def test_collate_rejects_bad_codes():
    with pytest.raises(ValueError, match="expected \\[0, 64\\)"):
        collate([torch.full((4, 5), 64)], ["x"], delays=(0, 1, 2, 3), card=64)
    with pytest.raises(ValueError, match="shape"):
        collate([torch.zeros(3, 5, dtype=torch.long)], ["x"], delays=(0, 1, 2, 3), card=64)
    with pytest.raises(ValueError, match="n_frames"):
        collate([torch.zeros(4, 5, dtype=torch.long)], ["x"], [6], delays=(0, 1, 2, 3), card=64)


def test_short_segment_loss_equals_its_loss_alone(base):
    """Padding a short segment into a longer batch changes nothing about its loss (masked + causal)."""
    state = _state(base)
    codes = _codes(1, n=2, frames=20)
    both = state.collate(codes, CAPTIONS[:2], [20, 9])
    alone = state.collate([codes[1][:, :9]], CAPTIONS[1:2])
    with torch.no_grad():
        hidden, mask = state.captions(both.captions)
        logits = state.module(both.tokens, hidden, mask)
        padded = lm_loss(logits[1:], both.targets[1:], both.mask[1:])
        single = state.forward(alone)
    torch.testing.assert_close(padded.per_codebook, single.per_codebook, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ loss and gradient check
@pytest.mark.parametrize("weighting", ["codebook", "token"])
def test_gradient_check_loss_is_the_sum_of_per_position_cross_entropies(base, weighting):
    """The training loss equals per-position CE computed independently from teacher-forced logits, and so do
    its gradients."""
    state = _state(base, loss_weighting=weighting)
    batch = state.collate(_codes(2, frames=10), CAPTIONS, [10, 6, 10, 3])
    params = [p for p in state.module.parameters() if p.requires_grad]

    out = state.forward(batch)
    grads = torch.autograd.grad(out.loss, params)

    hidden, text_mask = state.captions(batch.captions)
    logits = state.module(batch.tokens, hidden, text_mask)  # teacher-forced logits [B, K, S, card]
    per_k_sum = [logits.new_zeros(()) for _ in range(4)]
    per_k_n = [0] * 4
    for b in range(logits.shape[0]):
        for k in range(4):
            for p in range(logits.shape[2]):
                if batch.mask[b, k, p]:
                    ce = -torch.log_softmax(logits[b, k, p].double(), -1)[batch.targets[b, k, p]]
                    per_k_sum[k] = per_k_sum[k] + ce
                    per_k_n[k] += 1
    assert per_k_n == batch.mask.sum((0, 2)).tolist()
    if weighting == "codebook":
        reference = sum(s / n for s, n in zip(per_k_sum, per_k_n)) / 4
    else:
        reference = sum(per_k_sum) / sum(per_k_n)
    assert abs(out.loss.item() - reference.item()) < 1e-5
    expected = [s / n for s, n in zip(per_k_sum, per_k_n)]
    torch.testing.assert_close(out.per_codebook.double(), torch.stack(expected).detach(), rtol=1e-5, atol=1e-5)
    reference_grads = torch.autograd.grad(reference.float(), params)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_averages_micro_batches(base):
    state = _state(base, grad_clip=0.0)
    first = state.collate(_codes(3), CAPTIONS)
    second = state.collate(_codes(4, frames=8), CAPTIONS, [8, 8, 5, 8])
    params = [p for p in state.module.parameters() if p.requires_grad]
    expected = torch.autograd.grad((state.forward(first).loss + state.forward(second).loss) / 2, params)
    state.optimizer.zero_grad = lambda *a, **k: None  # keep the accumulated gradient for inspection
    state.optimizer.param_groups[0]["lr"] = state.optimizer.param_groups[1]["lr"] = 0.0  # and the weights
    metrics = state.update([first, second])
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected]))
    assert math.isclose(metrics["grad_norm"], float(norm), rel_tol=1e-4)
    assert metrics["tokens"] == int(first.mask.sum() + second.mask.sum()) and state.step == 1


def test_loss_drops_when_overfitting_a_batch(base):
    state = _state(base, lr=1e-2)
    batch = state.collate(_codes(5, frames=16), CAPTIONS)
    losses = [state.update([batch])["loss"] for _ in range(40)]
    assert losses[0] > 4.0 and losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------ conditioning and dropout
def test_caption_encoder_matches_the_conditioner_and_caches(base):
    encoder = CaptionEncoder(base.text.t5, base.text.tokenizer, base.config.max_text_tokens)
    prompts = ["a dog barking", "", "rain", "a dog barking"]
    hidden, mask = encoder(prompts)
    with torch.no_grad():
        projected = base.text.output_proj(hidden) * mask[..., None]
    want, want_mask = base.text(prompts)  # the conditioner generation uses
    assert torch.equal(mask, want_mask) and not mask[1].any()
    torch.testing.assert_close(projected, want, rtol=1e-5, atol=1e-5)
    assert (encoder.hits, encoder.misses) == (0, 2)
    encoder(["rain", "wind"])
    assert (encoder.hits, encoder.misses) == (1, 3)
    long = " ".join(["beep"] * 100)
    assert encoder([long])[1].sum() == base.config.max_text_tokens  # truncated, not refused


def test_condition_dropout_modes():
    generator = torch.Generator().manual_seed(0)
    captions = [f"c{i}" for i in range(4000)]
    dropped = drop_conditions(captions, 0.1, "sample", generator)
    fraction = sum(1 for c in dropped if c == "") / len(captions)
    assert 0.08 < fraction < 0.12
    batches = [drop_conditions(["a", "b", "c"], 0.5, "batch", generator) for _ in range(200)]
    assert all(b in (["a", "b", "c"], ["", "", ""]) for b in batches)
    assert 60 < sum(b[0] == "" for b in batches) < 140
    assert drop_conditions(["a"], 0.0, "sample", generator) == ["a"]


# ------------------------------------------------------------------ optimizer and schedules
def test_schedules():
    inv = TrainingConfig(warmup_steps=4, schedule="inverse_sqrt").lr_schedule()
    assert [inv.factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(inv.factor(15), math.sqrt(4 / 16))
    cos = Schedule("cosine", warmup_steps=2, max_steps=12, min_lr_ratio=0.1)
    assert cos.factor(1) == 1.0 and math.isclose(cos.factor(11), 0.1)
    assert math.isclose(cos.factor(6), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert Schedule("constant").factor(100) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        TrainingConfig(schedule="linear")
    with pytest.raises(ValueError, match="schedule"):
        Schedule("linear")


def test_weight_decay_only_on_matrices(base):
    module = module_from_model(load_base_model("tiny"))
    groups = parameter_groups(module, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in module.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert groups[1]["weight_decay"] == 0.0


# ------------------------------------------------------------------ checkpoints and export
def test_checkpoint_roundtrip_resumes_exactly(base, tmp_path):
    batches = [_state(base).collate(_codes(10 + i), CAPTIONS) for i in range(4)]
    straight = _state(base, cfg_dropout=0.5)
    for batch in batches:
        straight.update([batch])

    first = _state(base, cfg_dropout=0.5)
    for batch in batches[:2]:
        first.update([batch])
    first.save(tmp_path / "ckpt", meta={"history": [{"step": 2}]})
    payload = torch.load(tmp_path / "ckpt" / CHECKPOINT_STATE_FILE, weights_only=True)
    assert payload["step"] == 2 and any(k.startswith("text_proj.") for k in payload["model"])

    resumed = _state(base, cfg_dropout=0.5)
    meta = resumed.load(tmp_path / "ckpt")
    assert resumed.step == 2 and meta["history"] == [{"step": 2}]
    assert resumed.lr == first.lr
    for batch in batches[2:]:
        resumed.update([batch])
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_loads_and_generates(base, tmp_path):
    state = _state(base)
    batch = state.collate(_codes(20), CAPTIONS)
    for _ in range(3):
        state.update([batch])
    state.save(tmp_path / "ckpt")
    exported = export_model(tmp_path / "ckpt", base)
    exported.save_pretrained(tmp_path / "model")
    exported.close()
    loaded = AudioGen.from_pretrained(tmp_path / "model", device="cpu")
    try:
        for key, value in state.module.lm.state_dict().items():
            assert torch.equal(loaded.lm.state_dict()[key], value), key
        assert torch.equal(loaded.text.output_proj.weight, state.module.text_proj.weight)
        assert loaded.codec.checksum() == base.codec.checksum()
        t5, tokenizer = load_text_encoder_of(str(tmp_path / "model"))  # what a from-scratch worker loads
        assert torch.equal(t5.shared.weight, base.text.t5.shared.weight) and len(tokenizer) == len(base.text.tokenizer)
        clip = loaded.generate("a low beep", duration=0.4, seed=1)[0]
        assert clip.shape == (1, int(0.4 * loaded.sample_rate)) and np.isfinite(clip).all()
    finally:
        loaded.close()


def test_fine_tune_module_shares_the_model_weights():
    model = load_base_model("tiny")
    module = module_from_model(model)
    assert module.lm is model.lm and module.text_proj is model.text.output_proj
    assert all(p.dtype == torch.float32 for p in module.parameters())
    model.close()


def test_scratch_config_takes_codec_fields_from_the_base(base):
    config = scratch_config("small", base.config, base.text.text_dim, num_layers=2)
    assert (config.dim, config.num_layers, config.card, config.n_q, config.text_dim) == (1024, 2, 64, 4, 32)
    assert config.top_k <= config.card

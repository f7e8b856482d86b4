"""Codec training (audiogen.codec_training): the RVQ's EMA codebooks, the spectral loss and a short run on the synth
corpus. A short run cannot reach demo quality; it checks that every part moves in the right direction and that the
trained state survives `save_pretrained` exactly (the quantizer's EMA buffers are what encoding uses)."""

from __future__ import annotations

import numpy as np
import torch

from audiogen.codec import Codec, build_encodec
from audiogen.codec_training import (MultiScaleSpectralLoss, RVQTrainer, batch_si_snr, evaluate_codec,
                                     train_codec)
from audiogen.data import synth

SMALL_CODEC = dict(card=32, num_filters=4, hidden_size=16)


def _clips(n: int, seed: int = 0) -> list[np.ndarray]:
    return [item.audio for item in synth.iter_corpus(n, seed, duration=1.0)]


def test_spectral_loss_is_zero_for_identical_audio_and_grows_with_distortion() -> None:
    loss = MultiScaleSpectralLoss(16_000)
    reference = torch.from_numpy(_clips(2)[0])[None]
    assert float(loss(reference, reference)) < 1e-6
    slightly, badly = reference * 0.9, reference + 0.3 * torch.randn_like(reference)
    assert 0 < float(loss(slightly, reference)) < float(loss(badly, reference))


def test_batch_si_snr_rewards_the_waveform_not_only_its_spectrum() -> None:
    reference = torch.from_numpy(np.stack(_clips(2)))[:, None]
    assert float(batch_si_snr(0.5 * reference, reference)) > 60  # scale-invariant: a gain change is perfect
    reversed_phase = torch.fft.irfft(torch.fft.rfft(reference) * 1j, n=reference.shape[-1])  # same magnitudes
    assert float(batch_si_snr(reversed_phase, reference)) < -20
    estimate = (reference + 0.1 * torch.randn_like(reference)).requires_grad_()
    batch_si_snr(estimate, reference).backward()
    assert torch.isfinite(estimate.grad).all() and estimate.grad.abs().sum() > 0
    silent = torch.zeros_like(reference)
    assert float(batch_si_snr(reference, torch.cat([silent[:1], reference[1:]]))) > 60  # silent rows skipped


def test_rvq_kmeans_init_and_ema_updates_move_codebooks_towards_the_data() -> None:
    codec = build_encodec(sample_rate=16_000, n_q=4, seed=0, **SMALL_CODEC)
    rvq = RVQTrainer(codec, decay=0.5, kmeans_iters=5, dead_code_fraction=0.25,
                     generator=torch.Generator().manual_seed(0))
    embeddings = torch.randn(4, codec.model.config.hidden_size, 25, requires_grad=True)
    quantized, codes, commitment = rvq(embeddings)
    assert rvq.initialised and all(bool(cb.inited) for cb in rvq.codebooks)
    assert codes.shape == (4, codec.n_q, 25) and int(codes.max()) < codec.card
    assert quantized.shape == embeddings.shape and commitment.item() > 0
    # Straight-through: the gradient reaches the encoder's output unchanged.
    quantized.sum().backward()
    assert torch.allclose(embeddings.grad, torch.ones_like(embeddings))
    # More residual layers fit the data better: the quantization error falls with each layer.
    with torch.no_grad():
        errors = []
        flat = embeddings.detach().transpose(1, 2).reshape(-1, embeddings.shape[1])
        residual = flat.clone()
        for cb in rvq.codebooks:
            residual = residual - cb.embed[RVQTrainer._nearest(residual, cb.embed)]
            errors.append(float(residual.pow(2).mean()))
    assert errors == sorted(errors, reverse=True), errors


class _FixedBatch:
    """An iterable of one fixed [B, N] batch (as a DataLoader would yield): `train_codec` cycles it, so a short run
    overfits it, which shows the whole training step (encoder, RVQ, decoder, losses, optimiser) learns."""

    def __init__(self, clips: list[np.ndarray]) -> None:
        self.batch = torch.from_numpy(np.stack(clips))

    def __iter__(self):
        return iter([self.batch])


def test_short_codec_run_lowers_the_loss_and_round_trips_through_save_pretrained(tmp_path) -> None:
    clips = [clip[:8000] for clip in _clips(4)]
    codec, report = train_codec(_FixedBatch(clips), steps=100, codec_options=SMALL_CODEC, lr=1e-2, log_every=20,
                                warmup_steps=5, kmeans_iters=5, seed=0)
    assert [row["step"] for row in report.history] == [1, 20, 40, 60, 80, 100]
    # Measured (2 threads): loss (spectral + L1 + commitment - SI-SNR/10) 12.4 at step 1 -> 3.6 over steps
    # 81-100, spectral 5.0 -> 2.7. The float path of a CPU changes the trajectory, not these large drops.
    first, last = report.history[0], report.history[-1]
    assert last["loss"] < 0.75 * first["loss"] and last["spectral"] < 0.9 * first["spectral"], report.history
    assert all(np.isfinite(row["loss"]) for row in report.history)
    # Dead-code replacement keeps the codebook from collapsing onto a few codes (a collapsed codebook uses 1 of
    # the 32 codes, perplexity 1). How many survive a 100-step run on 100 vectors depends on the float path: 22
    # codes in the last window (perplexity 11) measured here, 12 on a CPU where a "more than half" assertion
    # failed; at least 4 codes and perplexity 2 hold on both and still fail a collapsed codebook.
    assert sum(row["replaced_q0"] for row in report.history) > 0, report.history
    assert last["used_q0"] * SMALL_CODEC["card"] >= 4 and last["perplexity_q0"] > 2, last

    before = evaluate_codec(codec, clips[:3])
    codec.save_pretrained(tmp_path / "codec")
    reloaded = Codec.from_pretrained(tmp_path / "codec")
    wave = torch.from_numpy(clips[0])[None, None]
    assert torch.equal(codec.encode(wave), reloaded.encode(wave))
    after = evaluate_codec(reloaded, clips[:3])
    assert np.allclose(before["si_snr"], after["si_snr"], atol=1e-4)

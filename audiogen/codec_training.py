"""Training an EnCodec-architecture codec (transformers' `EncodecModel` inside our `Codec`) from scratch.

transformers implements EnCodec's inference only: its quantizer has no training logic, so this module supplies the
residual vector quantizer's training the way audiocraft's `core_vq.py` does it, on transformers' own buffers:

- straight-through estimation: the decoder sees `emb + (quantized - emb).detach()`, so the reconstruction gradient
  reaches the encoder unchanged; each layer quantizes the (detached) residual the previous layers left;
- codebooks are not trained by gradients but by exponential moving averages (decay 0.99): `cluster_size` (EMA of
  the codes' counts) and `embed_avg` (EMA of the sums of the vectors assigned to each code), and `embed` =
  `embed_avg / cluster_size` (Laplace-smoothed). Those are exactly the buffers `EncodecEuclideanCodebook` has, so
  `Codec.save_pretrained` writes the whole quantizer state and a loaded codec encodes identically;
- k-means initialisation of every layer from the first batch (layer by layer, on the residual of the layers
  before), as audiocraft's `kmeans_init`;
- dead-code replacement: a code whose EMA count falls below `dead_code_fraction` of the average count per code
  (vectors per batch / card) is moved onto a random vector of the current batch's residual (its `embed_avg` and
  `cluster_size` are set consistently, so the EMA keeps it there instead of immediately pulling it back, unlike
  audiocraft which only resets `embed`);
- commitment loss: the mean over layers of ||residual_k - sg(quantized_k)||^2, which keeps the encoder's output
  near the codebooks.

Reconstruction losses: L1 on the waveform, plus a multi-scale spectral loss (window sizes 64..2048 samples): L1
between log mel spectrograms and the spectral convergence of the mel magnitudes at every scale, and L1 between
log linear-frequency magnitudes at the two largest scales (their 8-16 Hz bins resolve a semitone at 130 Hz, which
mel bands there do not). There is no adversarial (MS-STFT discriminator) or feature-matching loss: for the
synthetic corpus a GAN-free codec is enough, trains several times faster on a CPU and is deterministic; its
output is a little smoother (less crisp noise) than audiocraft's.

Everything is deterministic given `seed` (model init, segment sampling, k-means, dead-code replacement) on a given
machine and thread count.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from audiogen.codec import Codec, build_encodec
from audiogen.eval.audio_metrics import as_mono, si_snr, si_snr_db
from audiogen.train_loop import Schedule, Stepper, run

# The project's demo codec: 16 kHz mono, 50 frames/s, 4 codebooks of 256 codes, ~0.7 M parameters (~3 MB in
# float32). See `train_codec` for why these sizes.
DEMO_CODEC: dict[str, Any] = dict(sample_rate=16_000, n_q=4, card=256, num_filters=8, hidden_size=64,
                                  num_lstm_layers=1)
SPECTRAL_SCALES = (2048, 1024, 512, 256, 128, 64)  # largest first: the first two get the linear-frequency term


@dataclass
class CodecTrainingConfig:
    steps: int = 1000
    batch_size: int = 16
    segment_seconds: float = 1.0
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.9)
    schedule: str = "cosine"  # after the linear warmup (`audiogen.train_loop.Schedule`)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # the cosine reaches this fraction of lr at the last step
    grad_clip: float = 10.0
    l1_weight: float = 1.0
    spectral_weight: float = 1.0
    # Weight of -SI-SNR / 10 dB, the waveform (phase) term: with the spectral losses and L1 alone the demo codec
    # learned magnitudes only (held-out SI-SNR -42 dB after 2000 steps, pitch of tones lost); with it, 400 steps
    # already reached -8.5 dB training SI-SNR and the spectral loss fell faster too (both measured when the
    # training term was not mean-removed; the held-out one always was).
    si_snr_weight: float = 1.0
    commitment_weight: float = 1.0
    ema_decay: float = 0.99
    kmeans_iters: int = 20
    dead_code_fraction: float = 0.25  # a code whose EMA count per batch is below this fraction of the average
    # count (vectors per batch / card) is replaced: audiocraft's absolute threshold 2 at its ~4.7 vectors per code
    seed: int = 0
    log_every: int = 50


@dataclass
class CodecTrainingReport:
    config: dict[str, Any]
    codec: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)  # `train_loop.run`'s rows + the RVQ's use
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------- Data


def load_clips(source: Any, sample_rate: int) -> list[np.ndarray]:
    """Mono float32 clips from a manifest path (JSONL/Parquet as `audiogen encode` reads it), a sequence of
    arrays/tensors, or of objects with an `.audio` attribute (`audiogen.data.synth.CorpusItem`)."""
    if isinstance(source, (str, os.PathLike)):
        from audiogen.data.manifest import load_manifest
        from audiogen.io import read_audio

        rows = load_manifest(os.fspath(source)).to_pylist()
        return [read_audio(row["path"], sample_rate=sample_rate, channels=1, offset=row["offset"],
                           duration=row["duration"])[0][0] for row in rows]  # channel 0 of (audio, rate)
    clips = [as_mono(getattr(item, "audio", item)).astype(np.float32) for item in source]
    if not clips:
        raise ValueError("no training clips")
    return clips


def segment_batches(clips: Sequence[np.ndarray], batch_size: int, segment: int,
                    rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """Endless [batch, 1, segment] batches of random crops (zero-padded when a clip is shorter)."""
    while True:
        batch = np.zeros((batch_size, 1, segment), dtype=np.float32)
        for row in range(batch_size):
            clip = clips[int(rng.integers(len(clips)))]
            start = int(rng.integers(clip.size - segment + 1)) if clip.size > segment else 0
            batch[row, 0, :min(clip.size, segment)] = clip[start:start + segment]
        yield torch.from_numpy(batch)


def _batches_from(data: Any, config: CodecTrainingConfig, sample_rate: int, hop: int,
                  rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """Clips (a manifest path or a sequence) -> random segments; any other iterable (a DataLoader yielding
    [B, N] / [B, 1, N] tensors) is cycled as is."""
    if isinstance(data, (str, os.PathLike, Sequence)):
        segment = max(hop, int(round(config.segment_seconds * sample_rate / hop)) * hop)
        return segment_batches(load_clips(data, sample_rate), config.batch_size, segment, rng)

    def cycle() -> Iterator[torch.Tensor]:
        while True:
            count = 0
            for count, batch in enumerate(data, 1):
                batch = torch.as_tensor(batch, dtype=torch.float32)
                yield batch[:, None] if batch.dim() == 2 else batch
            if not count:
                raise ValueError("the data loader yielded no batches")

    return cycle()


# ---------------------------------------------------------------------------------------------------- Losses


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """HTK-mel triangular filters [mels, n_fft // 2 + 1], without filters that fall between two FFT bins."""
    freqs = np.fft.rfftfreq(n_fft, 1 / sample_rate)
    top = 2595.0 * np.log10(1.0 + sample_rate / 2 / 700.0)  # the Nyquist frequency in mel
    points = 700.0 * (10.0 ** (np.linspace(0.0, top, n_mels + 2) / 2595.0) - 1.0)  # band edges, equally spaced in mel
    low, centre, high = points[:-2, None], points[1:-1, None], points[2:, None]
    filters = np.maximum(0.0, np.minimum((freqs - low) / (centre - low), (high - freqs) / (high - centre)))
    filters = filters[filters.sum(axis=1) > 0]
    return torch.tensor(filters / filters.sum(axis=1, keepdims=True), dtype=torch.float32)


class MultiScaleSpectralLoss(torch.nn.Module):
    """Sum over window sizes of L1(log mel) + spectral convergence(mel), plus L1(log |STFT|) on the two largest.

    Window sizes `SPECTRAL_SCALES`, 64 mel bands (a quarter of the window size when fewer). Magnitudes are divided
    by the window's sum (a full-scale sine peaks at 0.5) and floored at 1e-5 (-100 dB) before the log, as
    audiocraft's mel loss does.
    """

    def __init__(self, sample_rate: int) -> None:
        super().__init__()
        for n_fft in SPECTRAL_SCALES:
            self.register_buffer(f"window_{n_fft}", torch.hann_window(n_fft), persistent=False)
            self.register_buffer(f"mel_{n_fft}", mel_filterbank(n_fft, min(64, n_fft // 4), sample_rate),
                                 persistent=False)

    def forward(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        estimate, reference = estimate.reshape(-1, estimate.shape[-1]), reference.reshape(-1, reference.shape[-1])
        total = estimate.new_zeros(())
        for n_fft in SPECTRAL_SCALES:
            window = getattr(self, f"window_{n_fft}")
            mels = getattr(self, f"mel_{n_fft}")
            spectra = [torch.stft(x, n_fft, hop_length=n_fft // 4, window=window, return_complex=True).abs()
                       / window.sum() for x in (estimate, reference)]
            mel_est, mel_ref = (mels @ s for s in spectra)
            total = (total + _log_l1(mel_est, mel_ref)  # + spectral convergence:
                     + torch.linalg.vector_norm(mel_est - mel_ref) / torch.linalg.vector_norm(mel_ref).clamp_min(1e-8))
            if n_fft in SPECTRAL_SCALES[:2]:
                total = total + _log_l1(*spectra)
        return total / len(SPECTRAL_SCALES)


def _log_l1(estimate: torch.Tensor, reference: torch.Tensor, floor: float = 1e-5) -> torch.Tensor:
    return F.l1_loss(torch.log(estimate.clamp_min(floor)), torch.log(reference.clamp_min(floor)))


# ---------------------------------------------------------------------- Residual vector quantization with EMA codebooks


class RVQTrainer:
    """Training-time forward of the first `n_q` quantizers of a `Codec`, updating their buffers in place."""

    def __init__(self, codec: Codec, *, decay: float, kmeans_iters: int, dead_code_fraction: float,
                 generator: torch.Generator, epsilon: float = 1e-5) -> None:
        self.codebooks = [layer.codebook for layer in codec.model.quantizer.layers[: codec.n_q]]
        self.decay = decay
        self.kmeans_iters = kmeans_iters
        self.dead_code_fraction = dead_code_fraction
        self.generator = generator
        self.epsilon = epsilon
        self.initialised = False
        self.replaced = [0] * len(self.codebooks)  # codes replaced since the last `take_stats`
        self.counts = [torch.zeros(cb.codebook_size) for cb in self.codebooks]

    def __call__(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, D, T] -> (straight-through quantized [B, D, T], codes [B, n_q, T], commitment loss)."""
        batch, dim, frames = embeddings.shape
        flat = embeddings.transpose(1, 2).reshape(-1, dim)  # [N, D], carries the encoder's gradient
        if not self.initialised:
            self._kmeans_init(flat.detach())
        residual, quantized_sum = flat, torch.zeros_like(flat)
        losses, codes = [], []
        for index, codebook in enumerate(self.codebooks):
            with torch.no_grad():
                vectors = residual.detach()
                indices = self._nearest(vectors, codebook.embed)
                quantized = F.embedding(indices, codebook.embed)  # a copy: the updates below leave it as it is
                self._ema_update(index, vectors, indices)
                self._replace_dead(index, vectors)
            losses.append(F.mse_loss(residual, quantized))
            codes.append(indices)
            quantized_sum = quantized_sum + quantized
            residual = residual - quantized
        out = (flat + (quantized_sum - flat).detach()).reshape(batch, frames, dim).transpose(1, 2)
        return out, torch.stack(codes).reshape(len(self.codebooks), batch, frames).transpose(0, 1), \
            torch.stack(losses).mean()

    @staticmethod
    def _nearest(vectors: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        distances = vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ embed.t() + embed.pow(2).sum(1)[None]
        return distances.argmin(dim=1)

    def _kmeans_init(self, residual: torch.Tensor) -> None:
        for codebook in self.codebooks:
            centroids, counts = self._kmeans(residual, codebook.codebook_size)
            codebook.embed.copy_(centroids)
            codebook.cluster_size.copy_(counts)
            codebook.embed_avg.copy_(centroids * counts[:, None])
            codebook.inited.fill_(1.0)
            residual = residual - F.embedding(self._nearest(residual, centroids), centroids)
        self.initialised = True

    def _kmeans(self, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        centroids = vectors[self._sample(vectors, k)]  # (advanced indexing copies)
        counts = torch.zeros(k)
        for _ in range(self.kmeans_iters):
            assign = self._nearest(vectors, centroids)
            counts = torch.bincount(assign, minlength=k).float()
            sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
            refill = vectors[self._sample(vectors, k)]  # for empty clusters
            centroids = torch.where((counts == 0)[:, None], refill, sums / counts.clamp_min(1)[:, None])
        return centroids, counts

    def _sample(self, vectors: torch.Tensor, count: int) -> torch.Tensor:
        if vectors.shape[0] >= count:
            return torch.randperm(vectors.shape[0], generator=self.generator)[:count]
        return torch.randint(vectors.shape[0], (count,), generator=self.generator)

    def _ema_update(self, index: int, vectors: torch.Tensor, indices: torch.Tensor) -> None:
        codebook = self.codebooks[index]
        counts = torch.bincount(indices, minlength=codebook.codebook_size).float()
        sums = torch.zeros_like(codebook.embed).index_add_(0, indices, vectors)
        codebook.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        codebook.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = codebook.cluster_size.sum()
        smoothed = (codebook.cluster_size + self.epsilon) / (total + codebook.codebook_size * self.epsilon) * total
        codebook.embed.copy_(codebook.embed_avg / smoothed[:, None])
        self.counts[index] += counts

    def _replace_dead(self, index: int, vectors: torch.Tensor) -> None:
        codebook = self.codebooks[index]
        threshold = self.dead_code_fraction * vectors.shape[0] / codebook.codebook_size
        dead = codebook.cluster_size < threshold
        count = int(dead.sum())
        if count == 0:
            return
        samples = vectors[self._sample(vectors, count)]
        codebook.embed[dead] = samples
        codebook.cluster_size[dead] = threshold
        codebook.embed_avg[dead] = samples * threshold
        self.replaced[index] += count

    def take_stats(self) -> dict[str, float]:
        """Codebook use since the last call: fraction of codes used and perplexity per layer, codes replaced."""
        stats: dict[str, float] = {}
        for index, counts in enumerate(self.counts):
            total = counts.sum()
            if total > 0:
                p = counts / total
                stats[f"used_q{index}"] = float((counts > 0).float().mean())
                stats[f"perplexity_q{index}"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
            stats[f"replaced_q{index}"] = float(self.replaced[index])
            counts.zero_()
            self.replaced[index] = 0
        return stats


# ---------------------------------------------------------------------------------------------------- Training


def train_codec(data: Any, steps: int | None = None, *, codec: Codec | None = None,
                codec_options: dict[str, Any] | None = None, config: CodecTrainingConfig | None = None,
                log: Callable[[dict[str, float]], None] | None = None,
                **overrides: Any) -> tuple[Codec, CodecTrainingReport]:
    """Train a codec on `data`; returns the trained `Codec` (in eval mode) and a `CodecTrainingReport`.

    `data`: a manifest path (JSONL/Parquet, as `audiogen encode` reads), a sequence of clips (arrays, tensors or
    `synth.CorpusItem`s; random `segment_seconds` crops are drawn from them), or any other iterable of
    [B, N] / [B, 1, N] batches (cycled). `codec`: continue training this one; otherwise a fresh
    `build_encodec(**DEMO_CODEC | codec_options, seed=seed)`. `steps`, `seed` and any `CodecTrainingConfig` field
    given as a keyword override `config`. `log` receives each history row.

    Demo size (`DEMO_CODEC`): 8 base filters, latent 64, one LSTM layer, card 256. With 4 codebooks the bit rate is
    4 x 8 bits x 50 Hz = 1.6 kbps, plenty for tones, sweeps, beats and coloured noise; 256 codes per book are all
    used on the synthetic corpus (1024 leaves many codes dead or rarely used), and a small card keeps the LM's
    embedding and output layers (4 x card x dim) small, which matters more for a CPU-trained LM than codec bits.
    """
    config = dataclasses.replace(config or CodecTrainingConfig(), **overrides)
    if steps is not None:
        config.steps = int(steps)
    if codec is None:
        codec = build_encodec(**{**DEMO_CODEC, **(codec_options or {})}, seed=config.seed)
    batches = _batches_from(data, config, codec.sample_rate, codec.hop_length, np.random.default_rng(config.seed))
    model = codec.model
    generator = torch.Generator().manual_seed(config.seed)
    rvq = RVQTrainer(codec, decay=config.ema_decay, kmeans_iters=config.kmeans_iters,
                     dead_code_fraction=config.dead_code_fraction, generator=generator)
    spectral = MultiScaleSpectralLoss(codec.sample_rate)

    def losses(audio: torch.Tensor, _index: int) -> tuple[torch.Tensor, dict[str, float]]:
        quantized, _, commitment = rvq(model.encoder(audio))
        output = model.decoder(quantized)[..., : audio.shape[-1]]
        l1 = F.l1_loss(output, audio)
        spec = spectral(output, audio)
        snr = batch_si_snr(output, audio)
        loss = (config.l1_weight * l1 + config.spectral_weight * spec + config.commitment_weight * commitment
                - config.si_snr_weight * snr / 10.0)
        terms = {"l1": l1, "spectral": spec, "si_snr": snr, "commitment": commitment}
        return loss, {**{name: float(value.detach()) for name, value in terms.items()},
                      "segments": float(audio.shape[0])}

    stepper = Stepper(model, torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas),
                      Schedule(config.schedule, config.warmup_steps, config.steps, config.min_lr_ratio), losses,
                      grad_clip=config.grad_clip, totals=("segments",))
    report = CodecTrainingReport(config=dataclasses.asdict(config),
                                 codec={**{k: getattr(codec, k) for k in ("sample_rate", "n_q", "card", "hop_length")},
                                        "parameters": sum(p.numel() for p in model.parameters())})

    def on_row(row: dict[str, Any], _evaluated: bool) -> None:
        row.update(rvq.take_stats())
        report.history.append(row)
        if log is not None:
            log(row)

    started = time.perf_counter()
    try:
        run(stepper, batches, max_steps=config.steps, log_every=config.log_every, on_row=on_row)
    finally:
        codec.eval()
    report.seconds = time.perf_counter() - started
    return codec, report


def batch_si_snr(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean SI-SNR (dB, `audiogen.eval.audio_metrics.si_snr_db`) over the batch's rows, differentiable; rows
    whose reference is silent (below -100 dBFS RMS: nothing to reconstruct) are skipped."""
    estimate, reference = estimate.reshape(-1, estimate.shape[-1]), reference.reshape(-1, reference.shape[-1])
    audible = reference.std(-1) > 1e-5
    return si_snr_db(estimate[audible], reference[audible]).mean() if bool(audible.any()) else estimate.new_zeros(())


# ---------------------------------------------------------------------------------------------------- Evaluation


@torch.no_grad()
def evaluate_codec(codec: Codec, clips: Iterable[Any]) -> dict[str, Any]:
    """Round trip each clip through `encode`/`decode`: SI-SNR (dB) per clip and summary, codebook use."""
    scores, counts = [], torch.zeros(codec.n_q, codec.card)
    for audio in load_clips(list(clips), codec.sample_rate):
        wave = torch.from_numpy(audio)[None, None]
        codes = codec.encode(wave)
        decoded = codec.decode(codes)[0, 0, : audio.size].numpy()
        scores.append(si_snr(decoded, audio))
        counts += F.one_hot(codes[0, :codec.n_q], codec.card).sum(dim=1)
    used = (counts > 0).float().mean(dim=1)
    return {"si_snr": scores, "si_snr_mean": float(np.mean(scores)), "si_snr_median": float(np.median(scores)),
            "codes_used": [float(u) for u in used]}


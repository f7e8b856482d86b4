"""The audio codec: EnCodec (transformers' `EncodecModel`) behind a small codes-in/codes-out API.

Every model this project runs tokenizes audio with a mono SEANet EnCodec plus a residual vector quantizer: HF-format
directories hold `EncodecModel` weights directly, and audiocraft's `compression_state_dict.bin` is converted onto the
same class (`audiogen.checkpoints.audiocraft_codec`). `Codec` fixes what the LM needs and EnCodec leaves open:

- exactly `n_q` quantizers are used, not a number derived from a float bandwidth;
- MusicGen stereo (`stereo_interleaved=True`) runs the mono EnCodec on each channel and interleaves the codebooks
  as [L0, R0, L1, R1, ...], like audiocraft's `InterleaveStereoCompressionModel` and transformers' MusicGen with
  `audio_channels=2`;
- it always computes in float32, even when the module it belongs to is cast to bfloat16 for the LM, because
  audiocraft runs its codec in float32 and the codes must not depend on the LM's precision;
- batch items and channels are run one at a time, so a clip's codes and audio are bit-identical whether it is
  encoded or decoded alone or with others (float kernels block differently for different batch sizes, which moves
  the last bits), and a stereo channel equals the mono codec's output. The LM's steps dominate generation time, so
  batching the codec would buy little;
- decoding pads each clip to a multiple of `DECODE_BUCKET_FRAMES` and zeroes everything past the clip's own end
  after every decoder layer. With zero ("constant") or causal padding that is exactly the unpadded decode (every
  convolution then sees the same zeros past the end, the LSTM only looks back), but the convolution kernels see a
  few dozen distinct lengths instead of one per clip: oneDNN compiles a kernel per input shape, which made
  decoding clips of arbitrary lengths ~10x slower than the decode itself;
- on the CPU, transposed convolutions run without oneDNN: its kernel for them is built per shape at a cost of
  tens of milliseconds (measured: 10x the whole decode of a small codec, and still slower for AudioGen's size).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import parametrize
from transformers import EncodecConfig, EncodecModel
from transformers.models.encodec.modeling_encodec import EncodecConv1d, EncodecConvTranspose1d, EncodecResnetBlock

from audiogen.errors import CheckpointError, InvalidConfigError, InvalidRequestError, MissingCheckpointFileError

CODEC_META_FILE = "audiogen_codec.json"
DECODE_BUCKET_FRAMES = 25
CODEC_META_FORMAT = "audiogen-codec"


class Codec(torch.nn.Module):
    """EnCodec with a fixed number of quantizers; audio [B, channels, N] <-> codes [B, num_codebooks, frames]."""

    def __init__(self, model: EncodecModel, n_q: int, stereo_interleaved: bool = False) -> None:
        super().__init__()
        _check_supported(model.config, n_q, len(model.quantizer.layers))
        self.model = model.float()
        config = model.config
        self.sample_rate = int(config.sampling_rate)
        self.hop_length = math.prod(int(r) for r in config.upsampling_ratios)  # samples per frame (SEANet strides)
        self.frame_rate = self.sample_rate // self.hop_length
        self.n_q = int(n_q)  # quantizers used per audio channel
        self.card = int(config.codebook_size)  # codebook size: codes are in [0, card)
        self.stereo_interleaved = bool(stereo_interleaved)
        self.channels = 2 if self.stereo_interleaved else 1
        self.num_codebooks = self.n_q * self.channels  # codebook streams per frame, channels interleaved
        # Zeros past the end reproduce the unpadded decode only for zero/causal padding and no time norm.
        exact = (config.pad_mode == "constant" or config.use_causal_conv) and config.norm_type == "weight_norm"
        self._bucket_frames = DECODE_BUCKET_FRAMES if exact else 1
        self.eval()  # a codec is used for inference unless a trainer explicitly calls .train()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ float32 guard
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "Codec":
        """Follow device moves but ignore dtype casts, so `parent.to(torch.bfloat16)` leaves the codec float32.

        The weights are restored from the original tensor (moved to the new device), never cast back from the
        lower precision, so a bf16 round trip cannot change a single bit of them.
        """

        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(device=moved.device)

        return super()._apply(keep_dtype, recurse)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Float audio [B, channels, N] at `sample_rate` -> codes [B, num_codebooks, ceil(N / hop_length)] (int64)."""
        self._check_audio(audio)
        with self._mode():
            wave = audio.to(device=self.device, dtype=torch.float32)
            # Each channel of each item through the mono EnCodec: [B, C, N] -> [B, C, n_q, T].
            codes = torch.stack([torch.stack([self._encode_mono(channel) for channel in item]) for item in wave])
            # [B, C, n_q, T] -> [B, n_q, C, T] -> [B, n_q * C, T]: codebook k of channel c lands at k * C + c.
            return codes.transpose(1, 2).reshape(codes.shape[0], self.num_codebooks, codes.shape[-1])

    def _encode_mono(self, wave: torch.Tensor) -> torch.Tensor:
        """[N] -> [n_q, T]: the SEANet encoder, then residual VQ with the first n_q quantizers."""
        residual = self.model.encoder(wave.reshape(1, 1, -1))
        codes = []
        for layer in self.model.quantizer.layers[: self.n_q]:
            indices = layer.encode(residual)
            residual = residual - layer.decode(indices)
            codes.append(indices)
        return torch.cat(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, num_codebooks, T] -> float32 audio [B, channels, T * hop_length]."""
        self._check_codes(codes)
        with self._mode():
            codes = codes.to(device=self.device, dtype=torch.long)
            audio = torch.stack([self._decode_clip(clip) for clip in self.mono_codes(codes)])
            return audio.reshape(codes.shape[0], self.channels, -1)

    def mono_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, n_q * C, T] -> [B * C, n_q, T], each channel's codes: the inverse of `encode`'s interleaving."""
        batch, _, frames = codes.shape
        return codes.reshape(batch, self.n_q, self.channels, frames).transpose(1, 2).reshape(-1, self.n_q, frames)

    def _decode_clip(self, codes: torch.Tensor) -> torch.Tensor:
        """[n_q, T] -> [T * hop], decoded in a bucket of frames (see the module docstring)."""
        frames = codes.shape[-1]
        bucket = -(-frames // self._bucket_frames) * self._bucket_frames
        padded = torch.nn.functional.pad(codes, (0, bucket - frames))[None]
        return self.synthesize(padded, frames)[0, 0, :frames * self.hop_length]

    def synthesize(self, codes: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """Mono codes [N, n_q, T] -> audio [N, 1, T * hop_length]: dequantize, then the SEANet decoder.

        The ONNX audio decoder is traced from this. `frames`: the clips' own length when the codes are zero-padded
        past it (`decode`'s buckets); everything past it is zeroed after every layer.
        """
        hidden = self.model.quantizer.decode(codes.transpose(0, 1))  # sum of the n_q codebook vectors: [N, D, T]
        if frames is not None:
            hidden[..., frames:] = 0
        on_cpu = hidden.device.type == "cpu"
        for layer in self.model.decoder.layers:
            no_onednn = on_cpu and isinstance(layer, EncodecConvTranspose1d)
            with _without_onednn() if no_onednn else contextlib.nullcontext():
                hidden = _decoder_layer(layer, hidden)
            if frames is not None:
                hidden[..., frames * (hidden.shape[-1] // codes.shape[-1]):] = 0
        return hidden

    @contextlib.contextmanager
    def _mode(self) -> Iterator[None]:
        """Inference mode unless the codec is being trained (then gradients must flow). In inference, each
        weight-normalised weight is computed once per call rather than once per clip and layer call (the same
        values: one computation cached instead of repeated)."""
        if self.training:
            yield
            return
        with torch.inference_mode(), parametrize.cached():
            yield

    def _check_audio(self, audio: Any) -> None:
        expected = f"float tensor [batch, {self.channels}, samples] at {self.sample_rate} Hz"
        if not isinstance(audio, torch.Tensor) or not audio.is_floating_point():
            raise InvalidRequestError("audio", f"must be a float tensor, got {_describe(audio)}", limit=expected)
        if audio.dim() != 3:
            raise InvalidRequestError("audio", f"has shape {tuple(audio.shape)}", limit=expected)
        if audio.shape[1] != self.channels:
            raise InvalidRequestError("audio", f"has {audio.shape[1]} channels, the codec takes {self.channels}",
                                      limit=expected, value=audio.shape[1])
        if audio.shape[0] == 0 or audio.shape[-1] == 0:
            raise InvalidRequestError("audio", f"is empty (shape {tuple(audio.shape)})",
                                      limit="at least one item and one sample")
        if not bool(torch.isfinite(audio).all()):
            raise InvalidRequestError("audio", "contains NaN or infinite samples", limit="finite samples")

    def _check_codes(self, codes: Any) -> None:
        expected = f"integer tensor [batch, {self.num_codebooks}, frames]"
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() \
                or codes.dtype == torch.bool:
            raise InvalidRequestError("codes", f"must be an integer tensor, got {_describe(codes)}", limit=expected)
        if codes.dim() != 3 or codes.shape[1] != self.num_codebooks:
            raise InvalidRequestError("codes", f"has shape {tuple(codes.shape)}", limit=expected)
        if codes.shape[0] == 0 or codes.shape[-1] == 0:
            raise InvalidRequestError("codes", f"is empty (shape {tuple(codes.shape)})",
                                      limit="at least one item and one frame")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.card:
            raise InvalidRequestError("codes", f"has values in [{low}, {high}]", limit=f"[0, {self.card})",
                                      value=high if high >= self.card else low)

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, n_q: int | None = None,
                        stereo_interleaved: bool | None = None) -> "Codec":
        """Load an `EncodecModel.save_pretrained` directory, or a Hugging Face hub id from the local cache only.

        `n_q` defaults to `audiogen_codec.json` when present, else to the quantizers of the model's largest target
        bandwidth (what transformers and audiocraft use). `stereo_interleaved` defaults to that file, else False.
        """
        directory = _resolve_directory(path)
        model = _load_encodec(directory)
        meta = _read_meta(directory)
        if n_q is None:
            n_q = meta.get("n_q", model.config.num_quantizers)
        if stereo_interleaved is None:
            stereo_interleaved = bool(meta.get("stereo_interleaved", False))
        return cls(model.eval(), n_q=n_q, stereo_interleaved=stereo_interleaved)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """HF format (config.json + model.safetensors) plus `audiogen_codec.json` with n_q and the stereo layout."""
        directory = Path(directory)
        self.model.save_pretrained(directory, safe_serialization=True)
        meta = {"format": CODEC_META_FORMAT, "n_q": self.n_q, "stereo_interleaved": self.stereo_interleaved}
        (directory / CODEC_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def checksum(self) -> str:
        """sha256 over the EnCodec state dict (sorted keys, dtype, shape and raw tensor bytes)."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def extra_repr(self) -> str:
        return (f"sample_rate={self.sample_rate}, frame_rate={self.frame_rate}, n_q={self.n_q}, card={self.card}, "
                f"channels={self.channels}")


# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def _decoder_layer(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One layer of EnCodec's SEANet decoder: transformers' layer, except that zero-padded stride-1 convolutions
    (also inside residual blocks) get their padding as constants. transformers derives it from the input length
    ("ideal length" padding, always zero at stride 1): the same result, but ~10 tensor operations per convolution
    in eager mode and twice the nodes in the traced ONNX decoder (which was slower for it in onnxruntime)."""
    if isinstance(layer, EncodecResnetBlock):
        residual = hidden
        for inner in layer.block:
            hidden = _decoder_layer(inner, hidden)
        return _decoder_layer(layer.shortcut, residual) + hidden
    if isinstance(layer, EncodecConv1d) and layer.pad_mode == "constant" and layer.conv.stride[0] == 1:
        total = int(layer.padding_total)
        right = 0 if layer.causal else total // 2
        out = layer.conv(torch.nn.functional.pad(hidden, (total - right, right)))
        return layer.norm(out) if layer.norm_type == "time_group_norm" else out
    return layer(hidden)


def target_bandwidth(n_q: int, frame_rate: int, card: int) -> float:
    """The kbps value for which transformers' EnCodec creates exactly `n_q` quantizers.

    transformers computes `int(1000 * bandwidth // (frame_rate * bits))`; the exact value n_q * frame_rate * bits /
    1000 can land a hair below an integer in floating point, so it is nudged up to the next float that works.
    """
    bits = math.ceil(math.log2(card))
    bandwidth = n_q * frame_rate * bits / 1000
    while int(1000 * bandwidth // (frame_rate * bits)) < n_q:
        bandwidth = math.nextafter(bandwidth, math.inf)
    return bandwidth


def build_encodec(*, sample_rate: int, n_q: int, card: int, upsampling_ratios: Sequence[int] = (8, 5, 4, 2),
                  num_filters: int = 32, hidden_size: int = 128, num_lstm_layers: int = 2,
                  num_residual_layers: int = 1, audio_channels: int = 1, seed: int | None = None) -> Codec:
    """A freshly initialised EnCodec in audiocraft's non-causal SEANet style (AudioGen / MusicGen codecs).

    `audio_channels` is the Codec's channel count as the LM sees it: 2 builds the MusicGen-stereo layout (a mono
    EnCodec with interleaved codebooks). `seed` makes the initialisation reproducible without touching the global
    RNG. Codebooks get distinct random vectors; transformers would leave them all zero, which maps every frame to
    code 0.
    """
    if audio_channels not in (1, 2):
        raise InvalidConfigError("audio_channels", f"must be 1 (mono) or 2 (stereo), got {audio_channels}")
    hop = math.prod(upsampling_ratios)
    if sample_rate % hop:
        raise InvalidConfigError("upsampling_ratios",
                                 f"hop length {hop} must divide sample_rate={sample_rate} for a whole frame rate")
    if card < 2 or card & (card - 1):
        raise InvalidConfigError("card", f"EnCodec codebook size must be a power of two >= 2, got {card}")
    config = EncodecConfig(
        sampling_rate=sample_rate, audio_channels=1, normalize=False, num_filters=num_filters,
        hidden_size=hidden_size, num_residual_layers=num_residual_layers, upsampling_ratios=list(upsampling_ratios),
        norm_type="weight_norm", kernel_size=7, last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2,
        use_causal_conv=False, pad_mode="constant", compress=2, num_lstm_layers=num_lstm_layers,
        trim_right_ratio=1.0, codebook_size=card, use_conv_shortcut=False,
        target_bandwidths=[target_bandwidth(n_q, sample_rate // hop, card)])
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = EncodecModel(config).eval()
        init_codebooks(model, sample_rate)
    return Codec(model, n_q=n_q, stereo_interleaved=audio_channels == 2)


@torch.no_grad()
def init_codebooks(model: EncodecModel, sample_rate: int, seconds: float = 2.0) -> None:
    """Give every quantizer distinct random codes at the scale of the residual it will see.

    Codes drawn far from the encoder's output would all lose to the one with the smallest norm, so every frame
    would get the same code. Each layer's codes are drawn from a Gaussian with the per-dimension mean and spread
    of its residual on a probe signal (noise under a random envelope, so frames differ), much as audiocraft seeds
    codebooks from the first batch before k-means.
    """
    samples = int(seconds * sample_rate)
    envelope = torch.rand(1, 1, samples // 1600 + 1).repeat_interleave(1600, dim=-1)[..., :samples]
    residual = model.encoder(torch.randn(1, 1, samples) * envelope)
    for layer in model.quantizer.layers:
        codebook = layer.codebook
        frames = residual[0].transpose(0, 1)  # [T, D]
        mean, std = frames.mean(dim=0), frames.std(dim=0).clamp_min(1e-3)
        codebook.embed.copy_(mean + std * torch.randn_like(codebook.embed))
        codebook.embed_avg.copy_(codebook.embed)
        residual = residual - layer.decode(layer.encode(residual))


# ---------------------------------------------------------------------------------------------------------------
def _check_supported(config: EncodecConfig, n_q: Any, available: int) -> None:
    """Refuse EnCodec settings whose behaviour `Codec` would silently change."""
    if config.audio_channels != 1:
        raise InvalidConfigError("codec.audio_channels",
                                 f"must be 1, got {config.audio_channels}: AudioGen/MusicGen use a mono EnCodec "
                                 f"(MusicGen stereo interleaves two mono streams: stereo_interleaved=True)")
    if config.normalize:
        raise InvalidConfigError("codec.normalize",
                                 "EnCodec models that renormalize the input volume are not supported: the codes "
                                 "would need a per-clip scale, which AudioGen/MusicGen's LM cannot model "
                                 "(audiocraft asserts scale is None)")
    if config.chunk_length_s is not None:
        raise InvalidConfigError("codec.chunk_length_s",
                                 f"chunked EnCodec (chunk_length_s={config.chunk_length_s}) is not supported; "
                                 f"AudioGen/MusicGen codecs encode whole clips")
    hop = math.prod(int(r) for r in config.upsampling_ratios)
    if config.sampling_rate % hop:
        raise InvalidConfigError("codec.upsampling_ratios",
                                 f"hop length {hop} does not divide sampling_rate={config.sampling_rate}: the frame "
                                 f"rate must be a whole number of frames per second")
    if not isinstance(n_q, int) or isinstance(n_q, bool) or not 1 <= n_q <= available:
        raise InvalidConfigError("codec.n_q", f"must be an integer in [1, {available}] (quantizers in this "
                                              f"EnCodec), got {n_q!r}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _hub_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it only at import)."""
    from huggingface_hub import constants

    home = os.environ.get("HF_HOME")
    return (os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
            or (os.path.join(home, "hub") if home else constants.HF_HUB_CACHE))


def _resolve_directory(path: str | os.PathLike[str]) -> Path:
    """A local directory as is; otherwise a hub id looked up in the local Hugging Face cache (never the network)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise MissingCheckpointFileError(
            f"codec path {local} is a file; pass the directory written by EncodecModel.save_pretrained "
            f"(config.json + model.safetensors)")
    name = str(path)
    cache = _hub_cache_dir()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True, cache_dir=cache))
    except Exception as error:  # invalid repo id, missing cache entry, ...: all mean "not available offline"
        raise MissingCheckpointFileError(
            f"codec {name!r} not found: there is no directory {local.resolve()} and no offline Hugging Face cache "
            f"entry for repo id {name!r} in {cache} ({type(error).__name__}). The network is never used. Provide it "
            f"as a local EncodecModel.save_pretrained directory, or download it beforehand (e.g. `hf download "
            f"{name}`) into the cache set by HF_HUB_CACHE / HF_HOME") from error


def _load_encodec(directory: Path) -> EncodecModel:
    if not (directory / "config.json").exists():
        raise MissingCheckpointFileError(
            f"{directory / 'config.json'} is missing: a codec directory is what EncodecModel.save_pretrained writes "
            f"(config.json + model.safetensors)")
    try:
        model, info = EncodecModel.from_pretrained(directory, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the EnCodec model in {directory}: {error}") from error
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"EnCodec weights in {directory} do not match its config.json: {problems}")
    return model


def _read_meta(directory: Path) -> dict[str, Any]:
    file = directory / CODEC_META_FILE
    if not file.exists():
        return {}
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != CODEC_META_FORMAT:
        raise CheckpointError(f"{file} is not an audiogen codec description (expected format {CODEC_META_FORMAT!r})")
    return meta

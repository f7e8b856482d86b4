"""`AudioGen`: the user-facing model (text conditioner + LM + codec) and its Python API.

Every generation method builds `GenerationRequest`s and runs them through the model's continuous-batching
engine (created on first use), so the Python API, the batch renderer and the server share one code path.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiogen.checkpoints import describe_key_mismatch, load_checkpoint
from audiogen.codec import Codec
from audiogen.config import AudioGenConfig
from audiogen.engine import Engine, GenerationRequest, GenerationResult
from audiogen.errors import CheckpointError, InvalidRequestError
from audiogen.io import convert_audio
from audiogen.lm import LanguageModel
from audiogen.sampling_params import SamplingParams
from audiogen.text import TextConditioner
from audiogen.validation import check_number

_LIVE_MODELS: "weakref.WeakSet[AudioGen]" = weakref.WeakSet()


@atexit.register
def _close_live_models() -> None:
    for model in list(_LIVE_MODELS):
        model.close()


class AudioGen:
    """Text-to-audio (and text-to-music) generation with a delay-pattern LM over EnCodec tokens."""

    backend = "torch"  # "onnx" for `from_onnx` models (audiogen.onnx.runtime.OnnxAudioGen)

    def __init__(self, config: AudioGenConfig, lm: LanguageModel, text: TextConditioner, codec: Codec, *,
                 source: dict[str, Any] | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if codec.sample_rate != config.sample_rate or codec.frame_rate != config.frame_rate:
            raise CheckpointError(f"codec rate {codec.sample_rate} Hz / {codec.frame_rate} fps does not match the "
                                  f"config's {config.sample_rate} Hz / {config.frame_rate} fps")
        if codec.num_codebooks != config.num_codebooks or codec.card != config.card:
            raise CheckpointError(f"codec has {codec.num_codebooks} x {codec.card} codes, the LM models "
                                  f"{config.num_codebooks} x {config.card}")
        self.config = config
        self.lm = lm.eval()
        self.text = text.eval()
        self.codec = codec.eval()
        self.source = dict(source or {})
        self.device = torch.device("cpu")
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self.to(device=device or ("cuda" if torch.cuda.is_available() else "cpu"), lm_dtype=dtype)
        _LIVE_MODELS.add(self)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, text_encoder: str | os.PathLike[str] | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        codec: str | os.PathLike[str] | None = None) -> "AudioGen":
        """Load an audiocraft directory (state_dict.bin + compression_state_dict.bin), a transformers MusicGen
        directory, or an audiogen directory. `text_encoder` overrides the T5 (a local directory or a name in the
        Hugging Face cache); `codec` overrides the EnCodec of audiocraft checkpoints that only name one."""
        loaded = load_checkpoint(path, text_encoder=text_encoder, codec=codec)
        config = loaded.config
        lm = LanguageModel(config)
        result = lm.load_state_dict(loaded.lm_state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"LM weights from {path} do not match the model built from its config: "
                                  f"{describe_key_mismatch(result.missing_keys, result.unexpected_keys)}")
        text = TextConditioner(loaded.t5, loaded.tokenizer, dim=config.dim, max_tokens=config.max_text_tokens,
                               project=loaded.text_proj_state is not None)
        if loaded.text_proj_state is not None:
            text.output_proj.load_state_dict(loaded.text_proj_state)
        return cls(config, lm, text, loaded.codec, source=loaded.source, device=device, dtype=dtype)

    @classmethod
    def default(cls, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "AudioGen":
        """The embedded demo model (`audiogen.defaults`): what every command uses when no model is given."""
        from audiogen.defaults import default_model_path

        return cls.from_pretrained(default_model_path(), device=device, dtype=dtype)

    @classmethod
    def from_onnx(cls, directory: str | os.PathLike[str], *, providers: list[Any] | None = None,
                  threads: int | None = None) -> "AudioGen":
        """Load a directory written by `audiogen export-onnx` (see `audiogen.onnx`): the same API and engine,
        with the text encoder, LM steps and audio decoder run by onnxruntime (`providers`, default CPU)."""
        from audiogen.onnx.runtime import load_onnx_model

        return load_onnx_model(directory, providers=providers, threads=threads)

    def save_pretrained(self, directory: str | os.PathLike[str], *, weights_dtype: torch.dtype = torch.float32
                        ) -> Path:
        """Write the self-contained audiogen format (config.json, model.safetensors, text_encoder/, codec/).
        `weights_dtype=torch.float16` stores the LM at half the size (it loads back in the model's dtype)."""
        from audiogen.checkpoints.native import save_native

        proj = self.text.output_proj
        return save_native(directory, config=self.config, lm_state=self.lm.state_dict(),
                           text_proj_state=proj.state_dict() if isinstance(proj, torch.nn.Linear) else None,
                           t5=self.text.t5, tokenizer=self.text.tokenizer, codec=self.codec, source=self.source,
                           weights_dtype=weights_dtype)

    def to(self, device: torch.device | str | None = None, lm_dtype: torch.dtype | None = None) -> "AudioGen":
        """Move the model. The LM takes `lm_dtype` (default: float32 on CPU, bfloat16 on CUDA); T5 and the codec
        always stay float32, as audiocraft runs them. A running engine is closed (its cache is on the old device)."""
        device = torch.device(device) if device is not None else self.device
        if lm_dtype is None:
            lm_dtype = self.dtype if device == self.device else (
                torch.float32 if device.type == "cpu" else torch.bfloat16)
        if device.type == "cpu" and lm_dtype == torch.float16:
            raise InvalidRequestError("dtype", "float16 is not supported on the CPU", limit="float32 or bfloat16")
        if (device, lm_dtype) != (self.device, self.dtype):
            self.close()  # the engine's cache lives on the old device and dtype; the next use builds a new one
        self.lm.to(device=device, dtype=lm_dtype)
        self.text.to(device=device, dtype=torch.float32)
        self.codec.to(device=device, dtype=torch.float32)
        self.device = device
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.config.frame_rate

    @property
    def channels(self) -> int:
        return self.codec.channels

    # ------------------------------------------------------------------ the engine
    @property
    def engine(self) -> Engine:
        """The model's own engine, created on first use (see `start_engine` to size it)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self, max_batch_slots=16 if self.device.type == "cpu" else 64)
            return self._engine

    def start_engine(self, **options: Any) -> Engine:
        """(Re)create the model's engine with explicit options (max_batch_slots, compile, ...); it runs on the
        model's device and dtype (`to` changes them)."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.shutdown()
            self._engine = Engine(self, **options)
            return self._engine

    def close(self) -> None:
        """Stop the engine threads (also done at interpreter exit)."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.shutdown()
                self._engine = None

    def __enter__(self) -> "AudioGen":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: str | Sequence[str], *, duration: float = 5.0,
                 negative_prompts: str | Sequence[str] | None = None, seed: int | Sequence[int] | None = None,
                 **sampling: Any) -> list[np.ndarray]:
        """One clip per prompt, float32 [channels, samples] at `sample_rate`.

        `seed` (int) gives prompt i the seed `seed + i`; a list gives each prompt its own; `negative_prompts` one
        for all or one per prompt. `sampling` takes the other `SamplingParams` fields (`temperature`, `top_k`,
        `top_p`, `guidance_scale`). The same seed and parameters reproduce a clip exactly, whatever else is
        generated at the same time.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InvalidRequestError("prompts", "no prompt given", limit="at least one prompt")
        shared = SamplingParams(**sampling)
        negatives = _per_prompt("negative_prompts", negative_prompts, len(prompts), str)
        seeds = _seeds(seed, len(prompts))
        requests = [GenerationRequest(prompt=p, duration=duration,
                                      sampling=replace(shared, negative_prompt=n, seed=s))
                    for p, n, s in zip(prompts, negatives, seeds)]
        return [result.audio for result in self.run(requests)]

    def generate_audio(self, prompt: str, *, duration: float = 5.0, **options: Any) -> np.ndarray:
        """One sound effect clip for one description."""
        return self.generate([prompt], duration=duration, **options)[0]

    def generate_music(self, prompt: str, *, duration: float = 10.0, **options: Any) -> np.ndarray:
        """One music clip (MusicGen weights run in the same engine); longer default duration."""
        return self.generate([prompt], duration=duration, **options)[0]

    def run(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate requests together (results in request order), stepping the engine in the calling thread."""
        return self.engine.run(requests)

    def continue_audio(self, audio: np.ndarray | torch.Tensor, sample_rate: int, prompt: str | None = None, *,
                       extension_seconds: float = 5.0, keep_original: bool = True, **sampling: Any) -> np.ndarray:
        """Extend a recording: its codes are the forced prefix, the LM continues them for `extension_seconds`.

        Returns input + extension at `sample_rate` of the model. With `keep_original`, the input itself is kept
        and only the new part comes from the codec (joined with a one-frame crossfade); otherwise the whole
        clip is the codec's resynthesis.
        """
        edit = self.continuation_request(audio, sample_rate, prompt, extension_seconds=extension_seconds,
                                         sampling=SamplingParams(**sampling))
        return edit.finish(self.run([edit.request])[0].audio, keep_original=keep_original)

    def inpaint_audio(self, audio: np.ndarray | torch.Tensor, sample_rate: int, mask: np.ndarray | torch.Tensor,
                      prompt: str | None = None, *, keep_original: bool = True, **sampling: Any) -> np.ndarray:
        """Regenerate the masked parts of a recording (`mask` per input sample, True = regenerate).

        A frame is regenerated when any of its samples is masked; every other frame keeps its original codes
        (teacher forcing), so the LM continues from the real context around each gap. With `keep_original`,
        unmasked audio is the input itself and only the gaps come from the codec (short crossfades at edges).
        """
        edit = self.inpaint_request(audio, sample_rate, mask, prompt, sampling=SamplingParams(**sampling))
        return edit.finish(self.run([edit.request])[0].audio, keep_original=keep_original)

    def continuation_request(self, audio: np.ndarray | torch.Tensor, sample_rate: int, prompt: str | None = None,
                             *, extension_seconds: float = 5.0, sampling: SamplingParams | None = None,
                             request_id: str | None = None) -> AudioEdit:
        """The engine request of `continue_audio` (validated input, encoded prefix) and how to finish its audio:
        for callers that await the engine themselves (the HTTP server)."""
        original = self._prepare_audio(audio, sample_rate)
        hop = self.codec.hop_length
        prefix_frames = original.shape[-1] // hop
        if prefix_frames < 1:
            raise InvalidRequestError("audio", "is shorter than one codec frame", limit=f">= {hop} samples")
        original = original[:, :prefix_frames * hop]
        available = self.config.max_duration - prefix_frames / self.frame_rate
        check_number("extension_seconds", extension_seconds, low=0.0, high=available + 1e-9, low_open=True,
                     limit=f"0 < extension_seconds <= {available:.2f} s (max_duration minus input)")
        codes = self.encode(original, self.sample_rate)
        total = prefix_frames + int(round(extension_seconds * self.frame_rate))
        request = GenerationRequest(prompt=prompt or "", duration=total / self.frame_rate, prefix_codes=codes,
                                    sampling=sampling or SamplingParams(), request_id=request_id)
        return AudioEdit(request, original, keep=[(0, original.shape[-1])], fade=hop)

    def inpaint_request(self, audio: np.ndarray | torch.Tensor, sample_rate: int, mask: np.ndarray | torch.Tensor,
                        prompt: str | None = None, *, sampling: SamplingParams | None = None,
                        request_id: str | None = None) -> AudioEdit:
        """The engine request of `inpaint_audio` (validated input and mask, encoded codes, frame mask) and how
        to finish its audio (see `continuation_request`)."""
        mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
        samples = _as_channels_first(audio).shape[-1]
        if mask.ndim != 1 or mask.shape[0] != samples:
            raise InvalidRequestError("mask", f"has shape {tuple(mask.shape)}", limit=f"one entry per input sample ({samples})")
        if mask.dtype != np.bool_:
            raise InvalidRequestError("mask", f"must be boolean, got {mask.dtype}")
        if not mask.any():
            raise InvalidRequestError("mask", "selects nothing to regenerate", limit="at least one True sample")
        original = self._prepare_audio(audio, sample_rate)
        hop = self.codec.hop_length
        frames = -(-original.shape[-1] // hop)
        times = (np.arange(samples) * (self.sample_rate / sample_rate)).astype(np.int64) // hop
        frame_mask = np.zeros(frames, dtype=bool)
        frame_mask[np.minimum(times[mask], frames - 1)] = True
        padded = np.pad(original, ((0, 0), (0, frames * hop - original.shape[-1])))
        codes = self.encode(padded, self.sample_rate)
        request = GenerationRequest(prompt=prompt or "", inpaint_codes=codes, inpaint_mask=torch.from_numpy(frame_mask),
                                    sampling=sampling or SamplingParams(), request_id=request_id)
        return AudioEdit(request, original, keep=[(a * hop, min(b * hop, original.shape[-1]))
                                                  for a, b in _runs(~frame_mask)],
                         fade=min(hop, 160), trim=original.shape[-1])

    # ------------------------------------------------------------------ codec
    def _prepare_audio(self, audio: np.ndarray | torch.Tensor, sample_rate: int) -> np.ndarray:
        array = _as_channels_first(audio)
        if array.shape[-1] == 0:
            raise InvalidRequestError("audio", "is empty", limit="at least one sample")
        if not np.isfinite(array).all():
            raise InvalidRequestError("audio", "contains NaN or infinite samples", limit="finite samples")
        if array.shape[0] not in (1, 2):
            raise InvalidRequestError("audio", f"has {array.shape[0]} channels", limit="1 or 2 channels")
        return convert_audio(array, sample_rate, self.sample_rate, self.channels)

    def encode(self, audio: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Waveform (any rate, mono/stereo, [samples] or [channels, samples]) -> codes [K, frames]."""
        prepared = self._prepare_audio(audio, sample_rate)
        with torch.inference_mode():
            tensor = torch.from_numpy(prepared)[None].to(self.device)
            return self.codec.encode(tensor)[0].cpu()

    def decode(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """Codes [K, frames] -> float32 audio [channels, frames * hop]."""
        codes = torch.as_tensor(codes)
        if codes.dim() != 2:
            raise InvalidRequestError("codes", f"has shape {tuple(codes.shape)}", limit="[codebooks, frames]")
        return self.decode_codes(codes[None])[0].cpu().numpy()

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Batched decode [B, K, T] -> [B, channels, T * hop] (the engine's audio thread calls this)."""
        with torch.inference_mode():
            return self.codec.decode(codes.to(self.device))

    # ------------------------------------------------------------------ description
    def metadata(self) -> dict[str, Any]:
        """Sizes, parameter counts, rates, limits and where the weights came from."""
        c = self.config
        return {
            "name": c.name, "backend": self.backend, "source": self.source, "sample_rate": c.sample_rate,
            "frame_rate": c.frame_rate,
            "channels": self.channels, "codebooks": c.num_codebooks, "card": c.card, "dim": c.dim,
            "num_layers": c.num_layers, "num_heads": c.num_heads, "window_duration": c.window_duration,
            "max_duration": c.max_duration, "extend_stride": c.extend_stride, "max_text_tokens": c.max_text_tokens,
            "text_encoder": c.text_encoder,
            "parameters": self._parameter_counts(),
            "defaults": {"duration": c.default_duration, "temperature": c.temperature, "top_k": c.top_k,
                         "top_p": c.top_p, "guidance_scale": c.guidance_scale},
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "checksum": self.checksum(),
        }

    def _parameter_counts(self) -> dict[str, int]:
        parts = {"lm": self.lm, "text_projection": self.text.output_proj, "text_encoder": self.text.t5,
                 "codec": self.codec}
        return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}

    def checksum(self) -> str:
        """sha256 over LM, text projection and codec weights (identifies the model in render metadata)."""
        if getattr(self, "_checksum", None) is None:
            digest = hashlib.sha256()
            for prefix, module in (("lm.", self.lm), ("text_proj.", self.text.output_proj)):
                for key, value in sorted(module.state_dict().items()):
                    digest.update((prefix + key).encode())
                    digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            digest.update(self.codec.checksum().encode())
            self._checksum = digest.hexdigest()
        return self._checksum


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class AudioEdit:
    """A continuation or inpainting prepared for the engine: submit `request`, then `finish(result.audio)`.

    `original` is the input at the model's rate and channels, `keep` the sample spans [start, stop) where it is
    pasted back over the generated audio (crossfades of `fade` samples), `trim` the output length (None: all).
    """

    request: GenerationRequest
    original: np.ndarray
    keep: list[tuple[int, int]]
    fade: int
    trim: int | None = None

    def finish(self, audio: np.ndarray, *, keep_original: bool = True) -> np.ndarray:
        """The engine's audio -> the edited clip (the input kept where it was not regenerated, if asked)."""
        generated = audio if self.trim is None else audio[:, :self.trim]
        return _splice(self.original, generated, self.keep, fade=self.fade) if keep_original else generated


def _as_channels_first(audio: np.ndarray | torch.Tensor) -> np.ndarray:
    array = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidRequestError("audio", f"must hold float samples, got {array.dtype}")
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise InvalidRequestError("audio", f"has shape {tuple(array.shape)}", limit="[samples] or [channels, samples]")
    return np.ascontiguousarray(array, dtype=np.float32)


def _per_prompt(field: str, value: Any, count: int, kind: type) -> list[Any]:
    if value is None or isinstance(value, kind):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise InvalidRequestError(field, f"has {len(values)} entries for {count} prompts", limit=f"{count} entries")
    return values


def _seeds(seed: int | Sequence[int] | None, count: int) -> list[int | None]:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return [int(seed) + i for i in range(count)]
    return _per_prompt("seed", seed, count, int)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index runs where `flags` is True."""
    padded = np.concatenate([[False], flags, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _splice(original: np.ndarray, generated: np.ndarray, keep: list[tuple[int, int]], fade: int) -> np.ndarray:
    """`generated`, with `original` pasted back over the `keep` spans and linear crossfades of `fade` samples
    at inner span edges (so a kept recording joins the regenerated audio without clicks)."""
    out = generated.copy()
    total = out.shape[-1]
    for start, stop in keep:
        stop = min(stop, original.shape[-1])
        weight = np.ones(stop - start, dtype=np.float32)
        n = min(fade, stop - start)
        if start > 0:
            weight[:n] = np.linspace(0, 1, n, endpoint=False, dtype=np.float32)
        if stop < total:
            weight[len(weight) - n:] = np.minimum(weight[len(weight) - n:],
                                                  np.linspace(1, 0, n, endpoint=False, dtype=np.float32))
        out[:, start:stop] = weight * original[:, start:stop] + (1 - weight) * out[:, start:stop]
    return out

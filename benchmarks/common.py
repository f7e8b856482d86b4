"""Shared benchmark helpers: same-weights model pairs (ours + transformers), workloads, percentile tables."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPTS = ["a dog barking in the rain", "a siren rising and falling", "rain on a tin roof", "a high beep repeating",
           "low rumbling noise fading out", "footsteps on gravel", "a crowd cheering", "church bells ringing"]


@dataclass
class Job:
    """One request of a workload: when it arrives (s after start) and what it asks for."""

    index: int
    arrival: float
    duration: float
    prompt: str
    seed: int


def offline_workload(count: int, low: float, high: float, seed: int = 0) -> list[Job]:
    rng = np.random.default_rng(seed)
    return [Job(i, 0.0, round(float(rng.uniform(low, high)), 2), PROMPTS[i % len(PROMPTS)], i) for i in range(count)]


def poisson_workload(count: int, rate: float, low: float, high: float, seed: int = 1) -> list[Job]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, count))
    return [Job(i, float(arrivals[i]), round(float(rng.uniform(low, high)), 2), PROMPTS[i % len(PROMPTS)], i)
            for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(name: str, jobs: list[Job], wall: float, latencies: list[float], first_audio: list[float], *,
              steps: int | None = None, occupancy: float | None = None, audio_seconds: float | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    audio = sum(j.duration for j in jobs) if audio_seconds is None else audio_seconds
    row = {"system": name, "requests": len(jobs), "audio_s": round(audio, 2), "wall_s": round(wall, 2),
           "audio_s_per_s": round(audio / wall, 3), "p50_latency_s": round(percentile(latencies, 50), 3),
           "p99_latency_s": round(percentile(latencies, 99), 3),
           "p50_first_audio_s": round(percentile(first_audio, 50), 3),
           "steps_per_s": None if steps is None else round(steps / wall, 2),
           "slot_occupancy": None if occupancy is None else round(occupancy, 3)}
    row.update(extra or {})
    return row


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = [f"### {title}", "| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |",
             "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def save_tiny_model(seed: int = 0) -> Path:
    """The deterministic tiny random model of `audiogen.scratch` in a temp directory (audiogen format): the model
    the tiny render and serve benchmarks were measured with (it was the embedded default then)."""
    import tempfile

    from audiogen.scratch import random_model as tiny_model

    directory = Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "model"
    with tiny_model(seed=seed, device="cpu") as model:
        model.save_pretrained(directory)
    return directory


def save_random_musicgen(size: str, *, seed: int = 0, window: float = 10.0,
                         dims: dict[str, int] | None = None) -> Path:
    """A random transformers MusicGen of preset `size` (tiny T5; EnCodec sized like AudioGen's for non-tiny
    sizes) saved with save_pretrained: every benchmarked system loads these same weights. `dims` overrides the
    preset's dim / num_layers / num_heads / ffn_dim."""
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration)

    from audiogen.config import PRESETS
    from audiogen.scratch import small_t5_config as tiny_t5_config, word_tokenizer as tiny_tokenizer

    preset = {**PRESETS[size], **(dims or {})}
    card = preset.get("card", 2048)
    tokenizer = tiny_tokenizer()
    if size == "tiny":
        encodec = dict(num_filters=4, hidden_size=16, num_lstm_layers=1)
    else:
        encodec = dict(num_filters=64, hidden_size=128, num_lstm_layers=2)
    bits = (card - 1).bit_length()
    decoder = MusicgenDecoderConfig(hidden_size=preset["dim"], num_hidden_layers=preset["num_layers"],
                                    num_attention_heads=preset["num_heads"], ffn_dim=preset["ffn_dim"],
                                    vocab_size=card, num_codebooks=4, max_position_embeddings=2048, dropout=0.0,
                                    pad_token_id=card, bos_token_id=card)
    config = MusicgenConfig(
        text_encoder=tiny_t5_config(-(-len(tokenizer) // 8) * 8).to_dict(),
        audio_encoder=EncodecConfig(sampling_rate=16000, upsampling_ratios=[8, 5, 4, 2], codebook_size=card,
                                    use_causal_conv=False, pad_mode="constant", use_conv_shortcut=False,
                                    target_bandwidths=[4 * 50 * bits / 1000], **encodec).to_dict(),
        decoder=decoder.to_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = MusicgenForConditionalGeneration(config).eval()
    gen = hf.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.bos_token_id = card
    gen.max_length = int(window * 50) + 1
    gen.guidance_scale, gen.do_sample, gen.top_k, gen.temperature = 3.0, True, 250, 1.0
    directory = Path(tempfile.mkdtemp(prefix=f"bench-{size}-"))
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_ours(directory: Path, *, device: str, dtype: str | None = None):
    """Our model in a benchmark process: the process's main thread leaves the cores to the engine thread."""
    from audiogen import AudioGen
    from audiogen.engine.cpu import reserve_cores_for_engine

    if device == "cpu":
        reserve_cores_for_engine()
    return AudioGen.from_pretrained(directory, device=device, dtype=getattr(torch, dtype) if dtype else None)


def load_transformers(directory: Path, *, device: str, dtype: str | None = None):
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(directory).eval().to(device)
    if dtype:
        model.decoder.to(getattr(torch, dtype))
    return model, AutoTokenizer.from_pretrained(directory)


def in_fresh_process(function, *args, **kwargs):
    """Run one measurement in its own process, so that systems never share thread pools or caches."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()

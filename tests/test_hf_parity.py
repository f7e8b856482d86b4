"""Parity with transformers' MusicGen on tiny random weights saved by `save_pretrained`."""

import contextlib

import numpy as np
import pytest
import torch

from audiogen import AudioGen, GenerationRequest
from audiogen.sampling_params import SamplingParams
from audiogen.patterns import build_delay_pattern

PROMPTS = ["a dog barking in the rain", "low rumbling noise"]


@pytest.fixture(scope="module")
def ours(hf_dir):
    model = AudioGen.from_pretrained(hf_dir[0], device="cpu")
    yield model
    model.close()


def test_loads_config_from_transformers_dir(ours, hf_dir):
    hf = hf_dir[1]
    assert ours.config.dim == hf.config.decoder.hidden_size
    assert ours.config.num_codebooks == 4 and ours.config.card == 64
    assert ours.config.sample_rate == 16000 and ours.config.frame_rate == 50
    assert ours.config.window_duration == 10.0
    assert ours.metadata()["source"]["format"] == "transformers"


def test_teacher_forced_logits_match(ours, hf_dir):
    hf = hf_dir[1]
    tok = ours.text.tokenizer(PROMPTS[:1], return_tensors="pt")
    codes = torch.randint(0, 64, (1, 4, 20), generator=torch.Generator().manual_seed(0))
    seq = build_delay_pattern(codes, (0, 1, 2, 3), 64)[:, :, :-1]
    with torch.no_grad():
        ref = hf(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                 decoder_input_ids=seq.reshape(4, -1)).logits.view(1, 4, -1, 64)
        text, mask = ours.text(PROMPTS[:1])
        got = ours.lm(seq, text, mask)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


@contextlib.contextmanager
def captured_codes(hf):
    """Record the codes transformers' generate hands to its EnCodec (generate itself returns only audio)."""
    captured = {}
    decode = hf.audio_encoder.decode

    def spy(codes, *args, **kwargs):
        captured["codes"] = codes[0, 0]
        return decode(codes, *args, **kwargs)

    hf.audio_encoder.decode = spy
    try:
        yield captured
    finally:
        hf.audio_encoder.decode = decode


def _hf_greedy(hf, tokenizer, prompt, frames, guidance=3.0):
    with captured_codes(hf) as captured, torch.no_grad():
        audio = hf.generate(**tokenizer([prompt], return_tensors="pt"), do_sample=False, guidance_scale=guidance,
                            max_new_tokens=frames + 3)
    return captured["codes"], audio[0].numpy()


@pytest.mark.parametrize("prompt,frames", [(PROMPTS[0], 40), (PROMPTS[1], 25)])
def test_greedy_generation_with_cfg_matches(ours, hf_dir, prompt, frames):
    hf = hf_dir[1]
    ref_codes, ref_audio = _hf_greedy(hf, ours.text.tokenizer, prompt, frames)
    result = ours.run([GenerationRequest(prompt=prompt, duration=frames / 50,
                                         sampling=SamplingParams(temperature=0.0, guidance_scale=3.0))])[0]
    assert torch.equal(result.codes, ref_codes)
    assert result.audio.shape == ref_audio.shape
    assert np.abs(result.audio - ref_audio).max() < 1e-4


def test_empty_prompt_is_transformers_unconditional_generation(ours, hf_dir):
    """audiocraft's empty description is the null condition: transformers' `get_unconditional_inputs`."""
    hf = hf_dir[1]
    with captured_codes(hf) as captured, torch.no_grad():
        hf.generate(**hf.get_unconditional_inputs(1), do_sample=False, max_new_tokens=20 + 3)
    result = ours.run([GenerationRequest(prompt="", duration=20 / 50,
                                         sampling=SamplingParams(temperature=0.0, guidance_scale=3.0))])[0]
    assert torch.equal(result.codes, captured["codes"])


def test_greedy_without_guidance_matches(ours, hf_dir):
    hf = hf_dir[1]
    ref_codes, _ = _hf_greedy(hf, ours.text.tokenizer, PROMPTS[1], 30, guidance=1.0)
    result = ours.run([GenerationRequest(prompt=PROMPTS[1], duration=30 / 50,
                                         sampling=SamplingParams(temperature=0.0, guidance_scale=1.0))])[0]
    assert torch.equal(result.codes, ref_codes)

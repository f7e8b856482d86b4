"""The AudioGen Python API on the tiny model: shapes, seeds, continuation, inpainting, extension, save/load."""

import numpy as np
import pytest
import torch

from audiogen import AudioGen, AudioGenConfig, GenerationRequest, InvalidRequestError
from audiogen.sampling_params import SamplingParams
from audiogen.scratch import random_model as tiny_model


def test_generate_returns_float32_clips(tiny):
    clips = tiny.generate(["a dog barking", "rain on a roof"], duration=0.5, seed=1)
    assert len(clips) == 2
    for clip in clips:
        assert clip.dtype == np.float32 and clip.shape == (1, 8000)
        assert np.isfinite(clip).all()
    assert not np.allclose(clips[0], clips[1])


def test_same_seed_same_clip_and_seed_offsets(tiny):
    a = tiny.generate(["wind", "bell"], duration=0.4, seed=10)
    b = tiny.generate("bell", duration=0.4, seed=11)
    assert np.array_equal(a[1], b[0])
    c = tiny.generate_audio("wind", duration=0.4, seed=10)
    assert np.array_equal(a[0], c)


def test_negative_prompt_changes_the_result(tiny):
    base = tiny.run([GenerationRequest(prompt="dog", duration=0.6, sampling=SamplingParams(seed=3))])[0]
    neg = tiny.run([GenerationRequest(prompt="dog", duration=0.6,
                                      sampling=SamplingParams(negative_prompt="rain", seed=3))])[0]
    assert not torch.equal(base.codes, neg.codes)
    assert neg.request.sampling.negative_prompt == "rain"


def test_generate_music_default_duration_is_clamped_by_model(tiny):
    with pytest.raises(InvalidRequestError, match="duration"):
        tiny.generate_music("jazz", duration=100.0)


def test_extension_beyond_the_window(tiny):
    # tiny window is 2 s with a 1 s stride: 5 s takes 4 windows
    result = tiny.run([GenerationRequest(prompt="long rumble", duration=5.0, sampling=SamplingParams(seed=5))])[0]
    assert result.codes.shape == (4, 250)
    assert result.audio.shape == (1, 250 * 320)
    again = tiny.run([GenerationRequest(prompt="long rumble", duration=5.0, sampling=SamplingParams(seed=5))])[0]
    assert torch.equal(result.codes, again.codes)
    # the first window alone equals a window-length generation with the same seed
    short = tiny.run([GenerationRequest(prompt="long rumble", duration=2.0, sampling=SamplingParams(seed=5))])[0]
    assert torch.equal(result.codes[:, :100], short.codes)


def test_continuation_keeps_the_prefix(tiny):
    source = tiny.generate_audio("dog bark", duration=1.0, seed=2)
    codes = tiny.encode(source, tiny.sample_rate)
    out = tiny.continue_audio(source, tiny.sample_rate, "dog bark", extension_seconds=0.6, seed=4)
    assert out.shape == (1, (50 + 30) * 320)
    # keep_original: the input itself comes back untouched before the last (crossfaded) frame
    assert np.array_equal(out[:, :49 * 320], source[:, :49 * 320])
    resynth = tiny.continue_audio(source, tiny.sample_rate, "dog bark", extension_seconds=0.6, seed=4,
                                  keep_original=False)
    assert resynth.shape == out.shape and not np.array_equal(resynth[:, :49 * 320], source[:, :49 * 320])
    result = tiny.run([GenerationRequest(prompt="dog bark", duration=1.6, prefix_codes=codes,
                                         sampling=SamplingParams(seed=4))])[0]
    assert torch.equal(result.codes[:, :50], codes)


def test_continuation_resamples_and_downmixes_input(tiny):
    stereo_44k = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 44100)).astype(np.float32)
    out = tiny.continue_audio(stereo_44k, 44100, "noise", extension_seconds=0.2, seed=1)
    assert out.shape == (1, (50 + 10) * 320)


def test_inpainting_keeps_unmasked_codes(tiny):
    source = tiny.generate_audio("steady hum", duration=1.0, seed=6)
    codes = tiny.encode(source, tiny.sample_rate)
    frame_mask = torch.zeros(50, dtype=torch.bool)
    frame_mask[20:30] = True
    result = tiny.run([GenerationRequest(prompt="a bell", inpaint_codes=codes, inpaint_mask=frame_mask,
                                         sampling=SamplingParams(seed=7))])[0]
    assert torch.equal(result.codes[:, ~frame_mask], codes[:, ~frame_mask])
    assert not torch.equal(result.codes[:, frame_mask], codes[:, frame_mask])
    sample_mask = np.zeros(source.shape[-1], dtype=bool)
    sample_mask[20 * 320:30 * 320] = True
    out = tiny.inpaint_audio(source, tiny.sample_rate, sample_mask, "a bell", seed=7)
    assert out.shape == source.shape
    assert np.array_equal(out[:, :19 * 320], source[:, :19 * 320])
    assert np.array_equal(out[:, 31 * 320:], source[:, 31 * 320:])
    assert not np.allclose(out[:, 21 * 320:29 * 320], source[:, 21 * 320:29 * 320])


@pytest.mark.parametrize("kwargs,field", [
    (dict(duration=0.0), "duration"), (dict(duration=-1.0), "duration"), (dict(duration=7.0), "duration"),
    (dict(duration=float("nan")), "duration"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=10_000), "top_k"), (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(seed=-5), "seed"), (dict(seed=2**64), "seed"), (dict(seed="1"), "seed"),
])
def test_bad_generation_arguments_name_the_field(tiny, kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        tiny.generate(["dog"], **{"duration": 0.2, **kwargs})
    assert info.value.field == field
    assert field in str(info.value)


def test_bad_prompts_and_audio(tiny):
    with pytest.raises(InvalidRequestError, match=r"prompt.*tokens"):
        tiny.generate(["dog " * 100], duration=0.2)
    with pytest.raises(InvalidRequestError, match="prompts"):
        tiny.generate([], duration=0.2)
    with pytest.raises(InvalidRequestError, match="audio.*NaN"):
        tiny.encode(np.full((1, 1000), np.nan, dtype=np.float32), 16000)
    with pytest.raises(InvalidRequestError, match="audio"):
        tiny.encode(np.zeros((1, 2, 3), dtype=np.float32), 16000)
    with pytest.raises(InvalidRequestError, match="sample_rate"):
        tiny.encode(np.zeros((1, 1000), dtype=np.float32), 0)
    with pytest.raises(InvalidRequestError, match="mask"):
        tiny.inpaint_audio(np.zeros((1, 1000), dtype=np.float32), 16000, np.zeros(999, dtype=bool))
    with pytest.raises(InvalidRequestError, match="extension_seconds"):
        tiny.continue_audio(np.zeros((1, 16000), dtype=np.float32), 16000, extension_seconds=100.0)
    with pytest.raises(InvalidRequestError, match="mask"):
        tiny.run([GenerationRequest(inpaint_codes=torch.zeros((4, 10), dtype=torch.long),
                                    inpaint_mask=torch.zeros(9, dtype=torch.bool))])


def test_empty_prompt_is_unconditional(tiny):
    result = tiny.run([GenerationRequest(prompt="", duration=0.3, sampling=SamplingParams(seed=1))])[0]
    assert result.codes.shape == (4, 15)


def test_save_and_load_roundtrip(tmp_path, tiny):
    path = tiny.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == ["codec", "config.json", "model.safetensors", "text_encoder"]
    loaded = AudioGen.from_pretrained(path, device="cpu")
    try:
        assert loaded.config == tiny.config
        assert loaded.checksum() == tiny.checksum()
        a = tiny.generate("door knock", duration=0.4, seed=3)[0]
        b = loaded.generate("door knock", duration=0.4, seed=3)[0]
        assert np.array_equal(a, b)
    finally:
        loaded.close()


def test_float16_storage_halves_the_weights_and_loads_as_float32(tmp_path, tiny):
    full = tiny.save_pretrained(tmp_path / "full")
    half = tiny.save_pretrained(tmp_path / "half", weights_dtype=torch.float16)
    full_bytes, half_bytes = ((p / "model.safetensors").stat().st_size for p in (full, half))
    assert half_bytes < 0.55 * full_bytes
    loaded = AudioGen.from_pretrained(half, device="cpu")
    try:
        assert loaded.dtype == torch.float32
        for name, weight in tiny.lm.state_dict().items():
            stored = loaded.lm.state_dict()[name]
            assert torch.equal(stored, weight.to(torch.float16).to(torch.float32)), name
    finally:
        loaded.close()
    with pytest.raises(ValueError, match="weights_dtype"):
        tiny.save_pretrained(tmp_path / "int", weights_dtype=torch.int8)


def test_metadata_and_presets(tiny):
    meta = tiny.metadata()
    assert meta["sample_rate"] == 16000 and meta["codebooks"] == 4
    assert meta["parameters"]["lm"] > 0 and len(meta["checksum"]) == 64
    small = AudioGenConfig.preset("small")
    assert (small.dim, small.num_layers, small.num_heads) == (1024, 24, 16)
    assert AudioGenConfig.preset("medium").num_layers == 48
    assert AudioGenConfig.preset("large", num_layers=2).dim == 2048


def test_stereo_model_runs():
    model = tiny_model(seed=1, audio_channels=2)
    try:
        clip = model.generate_audio("stereo rain", duration=0.3, seed=1)
        assert clip.shape == (2, 15 * 320)
        assert model.config.delays == (0, 0, 1, 1, 2, 2, 3, 3)
    finally:
        model.close()

"""audiocraft checkpoint directories end to end, through `AudioGen.from_pretrained` only.

The fixtures are written in the published layouts: `state_dict.bin` (fp16 LM, YAML xp.cfg) next to
`compression_state_dict.bin` (EnCodec weights as for facebook/audiogen-medium, or only a `{'pretrained': ...}`
reference as for facebook/musicgen-*), with the T5 that xp.cfg names resolved offline. The LM and EnCodec come
from one tiny random transformers MusicGen, which is then the reference the loaded model must reproduce.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from audiogen import AudioGen, GenerationRequest
from audiogen.sampling_params import SamplingParams
from audiogen.codec import build_encodec
from audiogen.errors import CheckpointError, MissingCheckpointFileError
from audiogen.patterns import build_delay_pattern
from audiogen.scratch import word_tokenizer as tiny_tokenizer
from tests.audiocraft_codec_fixture import write_audiocraft_compression, write_pretrained_reference
from tests.audiocraft_lm_fixture import random_hf_musicgen, write_audiocraft_lm, xp_cfg_for_hf
from tests.test_hf_parity import captured_codes

PROMPT = "a dog barking in the rain"
REVISION = "0123456789abcdef0123456789abcdef01234567"
WINDOW = 6.0  # dataset.segment_duration, deliberately not MusicGen's or AudioGen's default


def save_text_encoder(hf, directory: Path) -> Path:
    """The MusicGen's own T5 encoder and the tokenizer it was sized for, as save_pretrained writes them."""
    hf.text_encoder.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def fake_hub_cache(root: Path, repo_id: str, save) -> Path:
    """The huggingface_hub cache layout: models--<id>/{refs/main, snapshots/<hash>/...}; `save` fills the snapshot."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    save(repo / "snapshots" / REVISION)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return root


@pytest.fixture(scope="module")
def hf():
    """The reference: decoder and text projection rounded through fp16, as the published fp16 file stores them."""
    model = random_hf_musicgen(seed=3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith(("text_encoder.", "audio_encoder.")):
                parameter.copy_(parameter.half().float())
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf) -> Path:
    """facebook/audiogen-medium's layout: fp16 state_dict.bin naming t5-large, EnCodec weights alongside."""
    directory = tmp_path_factory.mktemp("audiogen_medium_like")
    write_audiocraft_lm(directory, hf, xp_cfg=xp_cfg_for_hf(hf, t5_name="t5-large", segment_duration=WINDOW),
                        dtype=torch.float16)
    write_audiocraft_compression(directory, hf.audio_encoder, n_q=4)
    return directory


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, hf) -> Path:
    return save_text_encoder(hf, tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def ours(checkpoint, t5_dir):
    model = AudioGen.from_pretrained(checkpoint, text_encoder=t5_dir, device="cpu")
    yield model
    model.close()


# ------------------------------------------------------------------------------------------------ AudioGen layout
def test_config_and_metadata(ours, checkpoint):
    c = ours.config
    assert (c.name, c.sample_rate, c.frame_rate, c.num_codebooks, c.audio_channels) == ("audiogen", 16000, 50, 4, 1)
    assert (c.dim, c.num_layers, c.card, c.delays, c.text_encoder) == (64, 2, 64, (0, 1, 2, 3), "t5-large")
    assert (c.window_duration, c.max_duration, c.extend_stride, c.default_duration) == (WINDOW, 3 * WINDOW, 2.0, 5.0)
    assert (c.temperature, c.top_k, c.top_p, c.guidance_scale) == (1.0, 64, 0.0, 3.0)  # top_k 250 capped at card
    source = ours.metadata()["source"]
    assert source["format"] == "audiocraft"
    assert source["path"] == str(checkpoint / "state_dict.bin")


def test_teacher_forced_logits_match_transformers(ours, hf):
    tokens = ours.text.tokenizer([PROMPT], return_tensors="pt")
    codes = torch.randint(0, 64, (1, 4, 20), generator=torch.Generator().manual_seed(0))
    sequence = build_delay_pattern(codes, (0, 1, 2, 3), 64)[:, :, :-1]
    with torch.no_grad():
        reference = hf(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                       decoder_input_ids=sequence.reshape(4, -1)).logits.view(1, 4, -1, 64)
        text, mask = ours.text([PROMPT])
        logits = ours.lm(sequence, text, mask)
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() < 1e-4


def test_greedy_generation_matches_transformers(ours, hf):
    frames = 30
    with captured_codes(hf) as captured, torch.no_grad():
        reference_audio = hf.generate(**ours.text.tokenizer([PROMPT], return_tensors="pt"), do_sample=False,
                                      guidance_scale=3.0, max_new_tokens=frames + 3)[0].numpy()
    result = ours.run([GenerationRequest(prompt=PROMPT, duration=frames / 50,
                                         sampling=SamplingParams(temperature=0.0, guidance_scale=3.0))])[0]
    assert torch.equal(result.codes, captured["codes"])
    assert result.audio.shape == reference_audio.shape == (1, frames * 320)
    assert np.abs(result.audio - reference_audio).max() < 1e-4


def test_seeded_sampling(ours):
    first, second = ours.generate([PROMPT, "wind"], duration=0.3, seed=5)
    assert first.shape == second.shape == (1, 15 * 320)
    assert np.isfinite(first).all() and np.isfinite(second).all()
    np.testing.assert_array_equal(ours.generate_audio(PROMPT, duration=0.3, seed=5), first)


# ------------------------------------------------------------------------------------------------ T5 resolution
def test_t5_resolved_from_the_hub_cache(checkpoint, hf, tmp_path, monkeypatch):
    """Without text_encoder=, the T5 named in xp.cfg comes from the local Hugging Face cache (the env var is
    read at load time, not when transformers was imported)."""
    cache = fake_hub_cache(tmp_path / "hub", "t5-large", lambda snapshot: save_text_encoder(hf, snapshot))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with AudioGen.from_pretrained(checkpoint, device="cpu") as model:
        assert model.config.text_encoder == "t5-large"
        text, _ = model.text([PROMPT])
        assert torch.isfinite(text).all()


def test_t5_missing_offline_is_never_downloaded(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MissingCheckpointFileError) as caught:
        AudioGen.from_pretrained(checkpoint, device="cpu")
    message = str(caught.value)
    assert "'t5-large'" in message and "never downloads" in message


# ------------------------------------------------------------------------------------------------ MusicGen stereo
@pytest.fixture(scope="module")
def musicgen_stereo(tmp_path_factory, t5_dir):
    """facebook/musicgen-stereo-*'s layout: the stereo flag lives only in the LM's xp.cfg, and the compression file
    merely names facebook/encodec_32khz. Returns (checkpoint directory, the 32 kHz mono EnCodec it names)."""
    hf = random_hf_musicgen(seed=4, stereo=True)
    xp = xp_cfg_for_hf(hf, family="musicgen", stereo=True, sample_rate=32000, segment_duration=30.0)
    directory = tmp_path_factory.mktemp("musicgen_stereo_like")
    write_audiocraft_lm(directory, hf, xp_cfg=xp)
    write_pretrained_reference(directory, "facebook/encodec_32khz")
    codec = build_encodec(sample_rate=32000, n_q=4, card=64, upsampling_ratios=(8, 5, 4, 4), num_filters=4,
                          hidden_size=16, num_lstm_layers=1, seed=4)
    return directory, codec


def check_stereo(model: AudioGen) -> None:
    c = model.config
    assert (c.name, c.audio_channels, c.n_q, c.num_codebooks, c.sample_rate) == ("musicgen", 2, 4, 8, 32000)
    assert model.codec.stereo_interleaved and model.codec.num_codebooks == 8
    clip = model.generate_music("lofi beat", duration=0.2, seed=0)
    assert clip.shape == (2, 10 * 640) and np.isfinite(clip).all()


def test_musicgen_stereo_with_codec_override(musicgen_stereo, t5_dir, tmp_path):
    directory, codec = musicgen_stereo
    codec.save_pretrained(tmp_path / "encodec_32khz")  # its audiogen_codec.json says mono: the LM decides
    with AudioGen.from_pretrained(directory, text_encoder=t5_dir, codec=tmp_path / "encodec_32khz",
                                  device="cpu") as model:
        check_stereo(model)


def test_musicgen_stereo_codec_from_the_hub_cache(musicgen_stereo, t5_dir, tmp_path, monkeypatch):
    directory, codec = musicgen_stereo
    # the hub repo is a plain transformers EncodecModel directory
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub", "facebook/encodec_32khz",
                                                          codec.model.save_pretrained)))
    with AudioGen.from_pretrained(directory, text_encoder=t5_dir, device="cpu") as model:
        check_stereo(model)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_compression_file(checkpoint, t5_dir, tmp_path):
    shutil.copy(checkpoint / "state_dict.bin", tmp_path)
    with pytest.raises(MissingCheckpointFileError, match=r"compression_state_dict\.bin is missing"):
        AudioGen.from_pretrained(tmp_path, text_encoder=t5_dir, device="cpu")


def test_state_dict_with_a_removed_key(checkpoint, t5_dir, tmp_path):
    package = torch.load(checkpoint / "state_dict.bin", weights_only=True)
    del package["best_state"]["transformer.layers.1.linear2.weight"]
    torch.save(package, tmp_path / "state_dict.bin")
    shutil.copy(checkpoint / "compression_state_dict.bin", tmp_path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): transformer\.layers\.1\.linear2\.weight"):
        AudioGen.from_pretrained(tmp_path, text_encoder=t5_dir, device="cpu")


def test_unknown_layout_lists_the_expected_ones(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError) as caught:
        AudioGen.from_pretrained(tmp_path, device="cpu")
    message = str(caught.value)
    assert "unknown checkpoint layout" in message and "model.ckpt" in message
    for layout in ("state_dict.bin + compression_state_dict.bin", "transformers MusicGen", "audiogen save_pretrained"):
        assert layout in message


"""Codec (EnCodec wrapper) and the audiocraft compression-checkpoint reader."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from transformers import EncodecConfig, EncodecModel

from audiogen.checkpoints.audiocraft_codec import load_audiocraft_codec
from audiogen.codec import Codec, build_encodec, init_codebooks
from audiogen.errors import CheckpointError, InvalidConfigError, InvalidRequestError, MissingCheckpointFileError
from tests.audiocraft_codec_fixture import (DELETE, audiocraft_compression_package, write_audiocraft_compression,
                                            write_pretrained_reference)

TINY = dict(sample_rate=16000, n_q=4, card=64, num_filters=4, hidden_size=16, num_lstm_layers=1)
HOP = 320


def tiny_codec(seed: int = 0, **options) -> Codec:
    return build_encodec(**{**TINY, **options}, seed=seed)


def probe_audio(batch: int = 2, channels: int = 1, samples: int = 16000 + 7, seed: int = 0) -> torch.Tensor:
    """Noise under a ramp, so frames differ and codes vary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, samples, generator=generator) * torch.linspace(0.05, 1.0, samples)


@pytest.fixture(scope="module")
def codec() -> Codec:
    return tiny_codec()


def fake_hub_cache(root: Path, repo_id: str, codec: Codec) -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<hash>/...}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    codec.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return root


# ---------------------------------------------------------------------------------------------------- Codec
def test_sizes(codec):
    assert (codec.sample_rate, codec.hop_length, codec.frame_rate) == (16000, HOP, 50)
    assert (codec.n_q, codec.card, codec.channels, codec.num_codebooks) == (4, 64, 1, 4)


@pytest.mark.parametrize("samples", [1, HOP - 1, HOP, HOP + 1, 16000 + 7])
def test_encode_decode_shapes(codec, samples):
    codes = codec.encode(probe_audio(samples=samples))
    frames = math.ceil(samples / HOP)
    assert codes.shape == (2, 4, frames) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < codec.card
    audio = codec.decode(codes)
    assert audio.shape == (2, 1, frames * HOP) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all()


def test_codes_are_not_degenerate(codec):
    codes = codec.encode(probe_audio())
    for k in range(codec.num_codebooks):
        assert len(torch.unique(codes[:, k])) > 5, f"codebook {k} maps every frame to few codes"
    for layer in codec.model.quantizer.layers:
        assert len(torch.unique(layer.codebook.embed, dim=0)) == codec.card


def test_build_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    first, second, other = tiny_codec(seed=5), tiny_codec(seed=5), tiny_codec(seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.checksum() == second.checksum() != other.checksum()
    audio = probe_audio()
    assert torch.equal(first.encode(audio), second.encode(audio))


def test_first_quantizers_give_a_prefix_of_the_codes(codec):
    audio = probe_audio()
    two = Codec(codec.model, n_q=2)
    assert torch.equal(two.encode(audio), codec.encode(audio)[:, :2])


def test_save_and_load_round_trip(codec, tmp_path):
    codec.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "audiogen_codec.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = Codec.from_pretrained(tmp_path)
    audio = probe_audio()
    codes = codec.encode(audio)
    assert (loaded.n_q, loaded.channels, loaded.checksum()) == (codec.n_q, 1, codec.checksum())
    assert torch.equal(loaded.encode(audio), codes)
    assert torch.equal(loaded.decode(codes), codec.decode(codes))
    assert Codec.from_pretrained(tmp_path, n_q=2).num_codebooks == 2


def test_plain_transformers_directory_uses_all_quantizers(codec, tmp_path):
    codec.model.save_pretrained(tmp_path)  # no audiogen_codec.json: n_q follows the largest target bandwidth
    loaded = Codec.from_pretrained(tmp_path)
    assert (loaded.n_q, loaded.channels) == (4, 1)


def test_matches_transformers_encode_and_decode(codec):
    audio = probe_audio()
    model = codec.model
    with torch.no_grad():
        expected = model.encode(audio, bandwidth=model.config.target_bandwidths[-1]).audio_codes[0]
        codes = codec.encode(audio)
        assert torch.equal(codes, expected)
        reference = model.decode(expected[None], [None]).audio_values
    assert (codec.decode(codes) - reference).abs().max() <= 1e-6


def test_stereo_flag_is_saved(tmp_path):
    stereo = tiny_codec(audio_channels=2)
    stereo.save_pretrained(tmp_path)
    assert Codec.from_pretrained(tmp_path).num_codebooks == 8


def test_checksum_is_stable_and_tracks_weights(codec):
    assert codec.checksum() == codec.checksum()
    changed = copy.deepcopy(codec)
    with torch.no_grad():
        changed.model.decoder.layers[0].conv.bias[0] += 1e-3
    assert changed.checksum() != codec.checksum()


def test_stereo_interleaves_left_and_right(codec):
    stereo = Codec(codec.model, n_q=4, stereo_interleaved=True)
    assert (stereo.channels, stereo.num_codebooks) == (2, 8)
    audio = probe_audio(channels=2)
    codes = stereo.encode(audio)
    assert codes.shape == (2, 8, 51)
    assert torch.equal(codes[:, 0::2], codec.encode(audio[:, :1]))
    assert torch.equal(codes[:, 1::2], codec.encode(audio[:, 1:]))
    decoded = stereo.decode(codes)
    assert decoded.shape == (2, 2, 51 * HOP)
    assert torch.equal(decoded[:, 1:], codec.decode(codes[:, 1::2]))


def test_codec_stays_float32_when_its_parent_is_cast(codec):
    parent = torch.nn.ModuleDict({"lm": torch.nn.Linear(4, 4), "codec": copy.deepcopy(codec)})
    parent.to(torch.bfloat16)
    assert parent["lm"].weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in parent["codec"].state_dict().values())
    assert parent["codec"].checksum() == codec.checksum()
    audio = probe_audio().to(torch.bfloat16)
    assert torch.equal(parent["codec"].encode(audio), codec.encode(audio.float()))


def test_inference_mode_unless_training():
    codec = tiny_codec()
    codes = codec.encode(probe_audio())
    assert codes.is_inference() and codec.decode(codes).is_inference()
    codec.train()
    assert codec.decode(codes.clone()).requires_grad


@pytest.mark.parametrize("audio, problem", [
    (torch.zeros(1, 100), "shape"),
    (torch.zeros(1, 2, 100), "channels"),
    (torch.zeros(1, 1, 0), "empty"),
    (torch.zeros(0, 1, 100), "empty"),
    (torch.zeros(1, 1, 100, dtype=torch.int16), "float tensor"),
    (torch.tensor([[[0.0, float("nan")]]]), "NaN"),
    (torch.tensor([[[0.0, float("inf")]]]), "infinite"),
])
def test_bad_audio_is_rejected(codec, audio, problem):
    with pytest.raises(InvalidRequestError, match=problem) as caught:
        codec.encode(audio)
    assert caught.value.field == "audio"


@pytest.mark.parametrize("codes, problem", [
    (torch.zeros(4, 10, dtype=torch.long), "shape"),
    (torch.zeros(1, 3, 10, dtype=torch.long), "shape"),
    (torch.zeros(1, 4, 0, dtype=torch.long), "empty"),
    (torch.zeros(1, 4, 10), "integer tensor"),
    (torch.full((1, 4, 10), 64), r"\[0, 64\)"),  # the LM's special token is not a code
    (torch.full((1, 4, 10), -1), r"\[0, 64\)"),
])
def test_bad_codes_are_rejected(codec, codes, problem):
    with pytest.raises(InvalidRequestError, match=problem) as caught:
        codec.decode(codes)
    assert caught.value.field == "codes"


def test_unsupported_encodec_settings_are_rejected(codec):
    with pytest.raises(InvalidConfigError, match="n_q"):
        Codec(codec.model, n_q=5)
    config = EncodecConfig.from_dict({**codec.model.config.to_dict(), "normalize": True})
    with pytest.raises(InvalidConfigError, match="normalize"):
        Codec(EncodecModel(config), n_q=4)
    with pytest.raises(InvalidConfigError, match="card"):
        build_encodec(**{**TINY, "card": 100})


def test_hub_name_resolves_from_the_local_cache(codec, tmp_path, monkeypatch):
    fake_hub_cache(tmp_path / "hub", "someorg/tiny-encodec", codec)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert Codec.from_pretrained("someorg/tiny-encodec").checksum() == codec.checksum()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert Codec.from_pretrained("someorg/tiny-encodec").checksum() == codec.checksum()


def test_missing_hub_name_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingCheckpointFileError) as caught:
        Codec.from_pretrained("facebook/encodec_32khz")
    message = str(caught.value)
    assert "facebook/encodec_32khz" in message and str(tmp_path) in message and "network" in message


# ---------------------------------------------------------------------------------------------------- audiocraft
@pytest.fixture(scope="module")
def source() -> Codec:
    return tiny_codec(seed=3)


def assert_same_codec(loaded: Codec, source: Codec) -> None:
    audio = probe_audio(seed=1)
    codes = source.encode(audio)
    assert torch.equal(loaded.encode(audio), codes)
    assert (loaded.decode(codes) - source.decode(codes)).abs().max() <= 1e-6
    assert loaded.checksum() == source.checksum()


@pytest.mark.parametrize("options", [{}, {"nest_in_model": True}, {"new_weight_norm": True}])
def test_audiocraft_file_converts_exactly(source, tmp_path, options):
    file = write_audiocraft_compression(tmp_path, source, **options)
    assert_same_codec(load_audiocraft_codec(tmp_path), source)
    assert_same_codec(load_audiocraft_codec(file), source)


def test_audiocraft_package_dict_converts_exactly(source):
    loaded = load_audiocraft_codec(audiocraft_compression_package(source))
    assert (loaded.n_q, loaded.sample_rate, loaded.frame_rate, loaded.card) == (4, 16000, 50, 64)
    assert_same_codec(loaded, source)


@pytest.mark.parametrize("settings", [
    {"use_conv_shortcut": True, "num_residual_layers": 2, "compress": 4},  # true_skip: false
    {"use_causal_conv": True, "pad_mode": "reflect", "dilation_growth_rate": 3},
    {"norm_type": "time_group_norm", "kernel_size": 5, "last_kernel_size": 9, "residual_kernel_size": 5},
    {"sampling_rate": 32000, "upsampling_ratios": [8, 5, 4, 4], "num_lstm_layers": 2},  # MusicGen's 32 kHz
])
def test_audiocraft_variants_convert_exactly(settings):
    base = dict(sampling_rate=16000, num_filters=4, hidden_size=16, num_lstm_layers=1, codebook_size=64,
                use_causal_conv=False, pad_mode="constant", use_conv_shortcut=False, target_bandwidths=[1.2])
    config = EncodecConfig(**{**base, **settings})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = EncodecModel(config).eval()
        init_codebooks(model, config.sampling_rate)
    source = Codec(model, n_q=4)
    assert_same_codec(load_audiocraft_codec(audiocraft_compression_package(source)), source)


def test_stereo_flag_from_xp_cfg(source):
    package = audiocraft_compression_package(source, xp_overrides={"interleave_stereo_codebooks.use": True})
    assert load_audiocraft_codec(package).num_codebooks == 8
    assert load_audiocraft_codec(package, stereo_interleaved=False).num_codebooks == 4


@pytest.mark.parametrize("key, value, expected", [
    ("seanet.activation", "LeakyReLU", "seanet.activation='LeakyReLU'"),
    ("seanet.activation_params", {"alpha": 0.5}, "seanet.activation_params={'alpha': 0.5}"),
    ("seanet.norm", "spectral_norm", "seanet.norm='spectral_norm'"),
    ("seanet.norm", DELETE, "seanet.norm='none'"),  # absent: audiocraft's SEANet default applies
    ("seanet.disable_norm_outer_blocks", 1, "seanet.disable_norm_outer_blocks=1"),
    ("seanet.lstm", 0, "seanet.lstm=0"),
    ("seanet.decoder.final_activation", "Tanh", "seanet.decoder.final_activation='Tanh'"),
    ("seanet.decoder.n_filters", 8, "seanet.decoder.n_filters=8"),
    ("seanet.bogus_option", 1, "seanet.bogus_option is not an option"),
    ("encodec.renormalize", True, "encodec.renormalize=True"),
    ("encodec.quantizer", "no_quant", "encodec.quantizer='no_quant'"),
    ("channels", 2, "encodec.channels=2"),  # reached through the ${channels} interpolation
    ("rvq.bins", 1000, "rvq.bins=1000"),
    ("interleave_stereo_codebooks", {"use": True, "per_timestep": True},
     "interleave_stereo_codebooks.per_timestep=True"),
])
def test_unsupported_xp_cfg_is_rejected_by_name(source, key, value, expected):
    package = audiocraft_compression_package(source, xp_overrides={key: value})
    with pytest.raises(CheckpointError) as caught:
        load_audiocraft_codec(package)
    assert expected in str(caught.value)


def test_key_mismatch_lists_missing_and_unexpected_keys(source):
    package = audiocraft_compression_package(source)
    state = package["best_state"]
    state["decoder.model.3.convtr.convtr.weight_gg"] = state.pop("decoder.model.3.convtr.convtr.weight_g")
    del state["encoder.model.13.lstm.bias_hh_l0"]
    with pytest.raises(CheckpointError) as caught:
        load_audiocraft_codec(package)
    message = str(caught.value)
    assert "missing keys (2)" in message and "unexpected keys (1)" in message
    assert "decoder.layers.3.conv.parametrizations.weight.original0" in message
    assert "encoder.layers.13.lstm.bias_hh_l0" in message
    assert "decoder.model.3.convtr.convtr.weight_gg (no mapping rule)" in message


def test_shape_mismatch_is_reported(source):
    package = audiocraft_compression_package(source, xp_overrides={"seanet.dimension": 32})
    with pytest.raises(CheckpointError, match=r"shape mismatches .*encoder\.layers\.15\.conv"):
        load_audiocraft_codec(package)


def test_pretrained_reference_uses_the_override(source, tmp_path):
    source.save_pretrained(tmp_path / "encodec")
    write_pretrained_reference(tmp_path / "ckpt", "facebook/encodec_32khz")
    loaded = load_audiocraft_codec(tmp_path / "ckpt", codec_override=tmp_path / "encodec")
    assert_same_codec(loaded, source)
    assert load_audiocraft_codec(tmp_path / "ckpt", codec_override=tmp_path / "encodec",
                                 stereo_interleaved=True).num_codebooks == 8


def test_pretrained_reference_resolves_from_the_hub_cache(source, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub", "facebook/encodec_32khz", source)))
    assert_same_codec(load_audiocraft_codec({"pretrained": "facebook/encodec_32khz"}), source)


def test_pretrained_reference_missing_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    write_pretrained_reference(tmp_path, "facebook/encodec_32khz")
    with pytest.raises(MissingCheckpointFileError) as caught:
        load_audiocraft_codec(tmp_path)
    message = str(caught.value)
    assert "facebook/encodec_32khz" in message and "offline" in message and "codec=" in message


def test_files_are_loaded_with_weights_only(source, tmp_path, monkeypatch):
    write_audiocraft_compression(tmp_path, source)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    load_audiocraft_codec(tmp_path)
    assert calls and all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)


class NotATensor:
    pass


def test_arbitrary_pickles_are_refused(tmp_path):
    torch.save({"xp.cfg": "{}", "best_state": {}, "payload": NotATensor()}, tmp_path / "compression_state_dict.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_audiocraft_codec(tmp_path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(MissingCheckpointFileError, match="compression_state_dict.bin"):
        load_audiocraft_codec(tmp_path)

"""audiogen.checkpoints.audiocraft: audiocraft `state_dict.bin` -> config + native LM weights.

The files are written by tests/audiocraft_lm_fixture.py from tiny random transformers MusicGen models, under
audiocraft's own key names (checked against audiocraft's LMModel itself outside this suite), so the reader is
tested against an independent mapping and, at the end, by running the result against transformers' decoder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from audiogen.checkpoints.audiocraft import get_value, read_audiocraft_lm
from audiogen.errors import CheckpointError, MissingCheckpointFileError
from tests.audiocraft_lm_fixture import REMOVE, random_hf_musicgen, write_audiocraft_lm, xp_cfg_for_hf

D = 64  # decoder width of random_hf_musicgen
HF = "decoder.model.decoder."


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_musicgen(seed=0)


@pytest.fixture(scope="module")
def hf_state(hf_model):
    return {k: v.detach() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def written(tmp_path_factory, hf_model) -> Path:
    """The published layout: fp16 tensors, flat best_state."""
    directory = tmp_path_factory.mktemp("audiogen_medium_like")
    write_audiocraft_lm(directory, hf_model, xp_cfg=xp_cfg_for_hf(hf_model))
    return directory


@pytest.fixture(scope="module")
def package(written) -> dict:
    return torch.load(written / "state_dict.bin", weights_only=True)


def save_variant(directory: Path, package: dict, *, xp_cfg: str | None = None, state: dict | None = None) -> Path:
    """The fixture package with its xp.cfg and/or best_state replaced."""
    variant = dict(package, best_state=state if state is not None else package["best_state"])
    if xp_cfg is not None:
        variant["xp.cfg"] = xp_cfg
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(variant, directory / "state_dict.bin")
    return directory


def expected_native(hf: dict[str, torch.Tensor], layers: int = 2, codebooks: int = 4) -> dict[str, torch.Tensor]:
    """docs/INTERFACES.md's native keys, from transformers' names."""
    native = {"out_norm.weight": hf[HF + "layer_norm.weight"], "out_norm.bias": hf[HF + "layer_norm.bias"]}
    for k in range(codebooks):
        native[f"embeddings.{k}.weight"] = hf[f"{HF}embed_tokens.{k}.weight"]
        native[f"heads.{k}.weight"] = hf[f"decoder.lm_heads.{k}.weight"]
    for i in range(layers):
        src, dst = f"{HF}layers.{i}.", f"layers.{i}."
        native[dst + "self_attn.in_proj.weight"] = torch.cat(
            [hf[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"])
        native[dst + "self_attn.out_proj.weight"] = hf[src + "self_attn.out_proj.weight"]
        native[dst + "cross_attn.q_proj.weight"] = hf[src + "encoder_attn.q_proj.weight"]
        native[dst + "cross_attn.kv_proj.weight"] = torch.cat(
            [hf[src + "encoder_attn.k_proj.weight"], hf[src + "encoder_attn.v_proj.weight"]])
        native[dst + "cross_attn.out_proj.weight"] = hf[src + "encoder_attn.out_proj.weight"]
        native[dst + "ffn.linear1.weight"] = hf[src + "fc1.weight"]
        native[dst + "ffn.linear2.weight"] = hf[src + "fc2.weight"]
        for ours, theirs in (("self_attn_norm", "self_attn_layer_norm"), ("cross_attn_norm", "encoder_attn_layer_norm"),
                             ("ffn_norm", "final_layer_norm")):
            for kind in ("weight", "bias"):
                native[f"{dst}{ours}.{kind}"] = hf[f"{src}{theirs}.{kind}"]
    return native


def assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == torch.float32, key
        assert torch.equal(actual[key], value), key


# ------------------------------------------------------------------------------------------------ happy paths
def test_config_from_xp_cfg(written):
    read = read_audiocraft_lm(written)
    c = read.config
    assert (c.dim, c.num_layers, c.num_heads, c.ffn_dim) == (64, 2, 4, 128)
    assert (c.n_q, c.card, c.audio_channels, c.delays) == (4, 64, 1, (0, 1, 2, 3))
    assert (c.bias_attn, c.bias_ff, c.positional_max_period) == (False, False, 10_000.0)
    assert (c.text_encoder, c.text_dim) == ("t5-large", 32)
    assert (c.sample_rate, c.frame_rate, c.window_duration, c.max_duration) == (16000, 50, 10.0, 30.0)
    assert (c.extend_stride, c.default_duration) == (2.0, 5.0)
    assert (c.temperature, c.top_k, c.top_p, c.guidance_scale) == (1.0, 64, 0.0, 3.0)  # top_k 250 capped at card
    assert c.name == "audiogen"
    assert read.config.text_encoder == "t5-large"
    assert read.xp_cfg["transformer_lm"]["dim"] == 64
    assert read.source == {"format": "audiocraft", "path": str(written / "state_dict.bin"), "version": "1.3.0"}


def test_fp16_weights_map_to_documented_native_keys(written, hf_state):
    read = read_audiocraft_lm(written)
    rounded = {k: v.half().float() for k, v in hf_state.items()}
    assert_states_equal(read.lm_state, expected_native(rounded))
    assert_states_equal(read.text_proj_state, {"weight": rounded["enc_to_dec_proj.weight"],
                                               "bias": rounded["enc_to_dec_proj.bias"]})


def test_fp32_file_nested_best_state_and_file_path(tmp_path, hf_model, hf_state):
    path = write_audiocraft_lm(tmp_path, hf_model, xp_cfg=xp_cfg_for_hf(hf_model), dtype=torch.float32,
                               nest_model=True)
    read = read_audiocraft_lm(path)
    assert_states_equal(read.lm_state, expected_native(hf_state))


def test_fsdp_best_state_preferred(tmp_path, package, written):
    """FSDP training checkpoints keep the full weights in fsdp_best_state (audiocraft's export_lm prefers it)."""
    variant = dict(package, best_state={"model": {"sharded": torch.zeros(1)}},
                   fsdp_best_state={"model": package["best_state"]})
    torch.save(variant, tmp_path / "state_dict.bin")
    assert_states_equal(read_audiocraft_lm(tmp_path).lm_state, read_audiocraft_lm(written).lm_state)


def test_musicgen_stereo(tmp_path):
    model = random_hf_musicgen(seed=1, stereo=True)
    xp = xp_cfg_for_hf(model, family="musicgen", sample_rate=32000, segment_duration=30.0)
    read = read_audiocraft_lm(write_audiocraft_lm(tmp_path, model, xp_cfg=xp, dtype=torch.float32))
    c = read.config
    assert (c.n_q, c.audio_channels, c.num_codebooks, c.delays) == (4, 2, 8, (0, 0, 1, 1, 2, 2, 3, 3))
    assert (c.name, c.text_encoder, c.sample_rate, c.window_duration) == ("musicgen", "t5-base", 32000, 30.0)
    assert (c.extend_stride, c.default_duration, c.max_duration) == (18.0, 15.0, 90.0)
    hf = {k: v.detach() for k, v in model.state_dict().items()}
    assert_states_equal(read.lm_state, expected_native(hf, codebooks=8))


def test_legacy_torch_mha_names(tmp_path, package, written):
    """audiocraft without custom attention names the fused projections `...attn.mha.*` (torch MHA)."""
    state = {k.replace("self_attn.", "self_attn.mha.").replace("cross_attention.", "cross_attention.mha."): v
             for k, v in package["best_state"].items()}
    read = read_audiocraft_lm(save_variant(tmp_path, package, state=state))
    assert_states_equal(read.lm_state, read_audiocraft_lm(written).lm_state)


def test_attention_and_ffn_biases_are_split(tmp_path, package, hf_model):
    state = dict(package["best_state"])
    generator = torch.Generator().manual_seed(0)
    for i in range(2):
        for name, size in (("self_attn.in_proj_bias", 3 * D), ("cross_attention.in_proj_bias", 3 * D),
                           ("self_attn.out_proj.bias", D), ("cross_attention.out_proj.bias", D),
                           ("linear1.bias", 2 * D), ("linear2.bias", D)):
            state[f"transformer.layers.{i}.{name}"] = torch.randn(size, generator=generator).half()
    xp = xp_cfg_for_hf(hf_model, overrides={"transformer_lm.bias_attn": True, "transformer_lm.bias_ff": True})
    read = read_audiocraft_lm(save_variant(tmp_path, package, xp_cfg=xp, state=state))
    assert read.config.bias_attn and read.config.bias_ff
    for i in range(2):
        source = {k[len(f"transformer.layers.{i}."):]: v.float() for k, v in state.items()
                  if k.startswith(f"transformer.layers.{i}.")}
        native = {k[len(f"layers.{i}."):]: v for k, v in read.lm_state.items() if k.startswith(f"layers.{i}.")}
        assert torch.equal(native["self_attn.in_proj.bias"], source["self_attn.in_proj_bias"])
        assert torch.equal(native["self_attn.out_proj.bias"], source["self_attn.out_proj.bias"])
        assert torch.equal(native["cross_attn.q_proj.bias"], source["cross_attention.in_proj_bias"][:D])
        assert torch.equal(native["cross_attn.kv_proj.bias"], source["cross_attention.in_proj_bias"][D:])
        assert torch.equal(native["cross_attn.out_proj.bias"], source["cross_attention.out_proj.bias"])
        assert torch.equal(native["ffn.linear1.bias"], source["linear1.bias"])
        assert torch.equal(native["ffn.linear2.bias"], source["linear2.bias"])


def test_frame_rate_from_seanet_ratios_and_interpolation(tmp_path, package, hf_model):
    xp = xp_cfg_for_hf(hf_model, overrides={"seanet.ratios": [8, 5, 4], "seanet.channels": "${channels}"})
    read = read_audiocraft_lm(save_variant(tmp_path, package, xp_cfg=xp))
    assert read.config.frame_rate == 100
    assert get_value(read.xp_cfg, "seanet.channels") == 1
    assert get_value(read.xp_cfg, "generate.audio.sample_rate") == 16000
    with pytest.raises(CheckpointError, match="interpolation cycle: a -> b -> a"):
        get_value({"a": "${b}", "b": "${a}"}, "a")


def test_logits_match_transformers_decoder(tmp_path, hf_model):
    """The native weights run by audiogen's LM give transformers' logits (same codes, same projected text)."""
    from audiogen.lm import LanguageModel

    read = read_audiocraft_lm(write_audiocraft_lm(tmp_path, hf_model, xp_cfg=xp_cfg_for_hf(hf_model),
                                                  dtype=torch.float32))
    lm = LanguageModel(read.config).eval()
    lm.load_state_dict(read.lm_state, strict=True)
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 65, (2, 4, 9), generator=generator)
    with torch.no_grad():
        text = hf_model.enc_to_dec_proj(torch.randn(2, 5, 32, generator=generator))
        ours = lm(codes, text, torch.ones(2, 5, dtype=torch.bool))
        theirs = hf_model.decoder(input_ids=codes.reshape(8, 9), encoder_hidden_states=text).logits
    torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ rejections
UNSUPPORTED = [
    ({"transformer_lm.norm_first": False}, "transformer_lm.norm_first"),
    ({"transformer_lm.layer_scale": 0.1}, "transformer_lm.layer_scale"),
    ({"transformer_lm.positional_embedding": "rope"}, "transformer_lm.positional_embedding"),
    ({"transformer_lm.positional_embedding": "sin_rope"}, "transformer_lm.positional_embedding"),
    ({"transformer_lm.positional_scale": 0.5}, "transformer_lm.positional_scale"),
    ({"transformer_lm.qk_layer_norm": True}, "transformer_lm.qk_layer_norm"),
    ({"transformer_lm.qk_layer_norm_cross": True}, "transformer_lm.qk_layer_norm_cross"),
    ({"transformer_lm.kv_repeat": 2}, "transformer_lm.kv_repeat"),
    ({"transformer_lm.past_context": 100}, "transformer_lm.past_context"),
    ({"transformer_lm.causal": False}, "transformer_lm.causal"),
    ({"transformer_lm.activation": "swiglu"}, "transformer_lm.activation"),
    ({"transformer_lm.activation": REMOVE}, "transformer_lm.activation='relu'"),
    ({"transformer_lm.norm": "rms_norm"}, "transformer_lm.norm"),
    ({"transformer_lm.bias_proj": True}, "transformer_lm.bias_proj"),
    ({"lm_model": "transformer_lm_magnet"}, "lm_model"),
    ({"codebooks_pattern.modeling": "parallel"}, "codebooks_pattern.modeling"),
    ({"codebooks_pattern.delay.flatten_first": 1}, "codebooks_pattern.delay.flatten_first"),
    ({"codebooks_pattern.delay.empty_initial": 1}, "codebooks_pattern.delay.empty_initial"),
    ({"codebooks_pattern.delay.delays": [1, 2, 3, 4]}, "codebooks_pattern.delay.delays"),
    ({"codebooks_pattern.delay.delays": [0, 1, 2]}, "codebooks_pattern.delay.delays"),
    ({"fuser.prepend": ["self_wav", "description"], "fuser.cross": [],
      "conditioners.self_wav": {"model": "chroma_stem", "chroma_stem": {"n_chroma": 12}}}, "fuser.prepend"),
    ({"fuser.sum": ["genre"]}, "fuser.sum"),
    ({"fuser.input_interpolate": ["chords"]}, "fuser.input_interpolate"),
    ({"fuser.cross": ["description", "style"]}, "fuser.cross"),
    ({"fuser.cross_attention_pos_emb": True}, "fuser.cross_attention_pos_emb"),
    ({"conditioners.style": {"model": "style"}}, "conditioners"),
    ({"conditioners.description.model": "clap"}, "conditioners.description.model"),
    ({"conditioners.description.t5.finetune": True}, "conditioners.description.t5.finetune"),
    ({"conditioners.description.t5.normalize_text": True}, "conditioners.description.t5.normalize_text"),
    ({"channels": 2}, "interleave_stereo_codebooks.use"),
    ({"interleave_stereo_codebooks.use": True}, "interleave_stereo_codebooks.use"),
    ({"interleave_stereo_codebooks.per_timestep": True}, "interleave_stereo_codebooks.per_timestep"),
    ({"seanet.ratios": [7, 5, 4, 2]}, "seanet.ratios"),
]


@pytest.mark.parametrize("overrides, key", UNSUPPORTED, ids=[key for _, key in UNSUPPORTED])
def test_unsupported_xp_cfg_feature_is_named(tmp_path, package, hf_model, overrides, key):
    directory = save_variant(tmp_path, package, xp_cfg=xp_cfg_for_hf(hf_model, overrides=overrides))
    with pytest.raises(CheckpointError, match="not supported") as error:
        read_audiocraft_lm(directory)
    assert f"xp.cfg {key}" in str(error.value)


def test_missing_xp_cfg_value_and_invalid_config(tmp_path, package, hf_model):
    directory = save_variant(tmp_path, package,
                             xp_cfg=xp_cfg_for_hf(hf_model, overrides={"dataset.segment_duration": REMOVE}))
    with pytest.raises(CheckpointError, match=r"dataset\.segment_duration"):
        read_audiocraft_lm(directory)
    xp = xp_cfg_for_hf(hf_model, overrides={"transformer_lm.num_heads": 5})
    directory = save_variant(tmp_path, package, xp_cfg=xp)
    with pytest.raises(CheckpointError, match="num_heads"):
        read_audiocraft_lm(directory)


def test_removed_and_renamed_keys_are_listed(tmp_path, package):
    state = dict(package["best_state"])
    del state["transformer.layers.1.norm_cross.bias"]
    state["transformer.layers.1.linear3.weight"] = state.pop("transformer.layers.1.linear2.weight")
    with pytest.raises(CheckpointError) as error:
        read_audiocraft_lm(save_variant(tmp_path, package, state=state))
    message = str(error.value)
    assert ("missing keys (2): transformer.layers.1.linear2.weight, transformer.layers.1.norm_cross.bias"
            in message)
    assert "unexpected keys (1): transformer.layers.1.linear3.weight" in message


def test_shape_mismatch_and_long_lists_are_truncated(tmp_path, package, hf_model):
    xp = xp_cfg_for_hf(hf_model, overrides={"transformer_lm.num_layers": 6, "transformer_lm.card": 32})
    with pytest.raises(CheckpointError) as error:
        read_audiocraft_lm(save_variant(tmp_path, package, xp_cfg=xp))
    message = str(error.value)
    assert "missing keys (48):" in message and "(28 more)" in message
    assert "emb.0.weight: expected [33, 64], got [65, 64] torch.float16" in message


def test_missing_text_projection(tmp_path, package):
    state = {k: v for k, v in package["best_state"].items() if "output_proj" not in k}
    with pytest.raises(CheckpointError, match=r"output_proj\.weight"):
        read_audiocraft_lm(save_variant(tmp_path, package, state=state))


# ------------------------------------------------------------------------------------------------ the file itself
def test_loads_with_weights_only(monkeypatch, written):
    calls = []
    original = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    read_audiocraft_lm(written)
    assert calls == [{"map_location": "cpu", "weights_only": True}]


class Executable:
    """Stands for the arbitrary objects a full pickle could carry (e.g. a training checkpoint's OmegaConf)."""


def test_arbitrary_objects_are_refused(tmp_path, package):
    torch.save(dict(package, **{"xp.cfg": Executable()}), tmp_path / "state_dict.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_audiocraft_lm(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(MissingCheckpointFileError, match=r"state_dict\.bin is missing: an audiocraft LM checkpoint"):
        read_audiocraft_lm(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_audiocraft_lm(tmp_path / "nowhere")


@pytest.mark.parametrize("content, match", [
    ([1, 2], "holds a list"),
    ({"best_state": {}}, "no 'xp.cfg'"),
    ({"xp.cfg": "a: [unclosed", "best_state": {}}, "not valid YAML"),
    ({"xp.cfg": "- a list", "best_state": {}}, "expected a YAML mapping"),
])
def test_not_an_audiocraft_package(tmp_path, content, match):
    torch.save(content, tmp_path / "state_dict.bin")
    with pytest.raises(CheckpointError, match=match):
        read_audiocraft_lm(tmp_path)


def test_empty_best_state(tmp_path, package):
    torch.save(dict(package, best_state={}), tmp_path / "state_dict.bin")
    with pytest.raises(CheckpointError, match="no non-empty 'best_state'"):
        read_audiocraft_lm(tmp_path)


def test_written_file_is_audiocraft_shaped(package):
    """The fixture writes what export_lm writes: YAML xp.cfg, flat fp16 best_state, version, exported."""
    assert set(package) == {"best_state", "xp.cfg", "version", "exported"}
    assert yaml.safe_load(package["xp.cfg"])["conditioners"]["description"]["t5"]["name"] == "t5-large"
    assert {v.dtype for v in package["best_state"].values()} == {torch.float16}
    assert len(package["best_state"]) == 4 + 4 + 2 * 12 + 2 + 2  # emb, linears, layers, out_norm, text proj

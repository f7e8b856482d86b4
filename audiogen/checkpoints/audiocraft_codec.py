"""Reader for audiocraft's `compression_state_dict.bin`: the EnCodec that AudioGen/MusicGen tokenize audio with.

The file is a pickle written by `audiocraft/utils/export.py`, in one of two forms:

- weights: `{'xp.cfg': <hydra config as YAML>, 'best_state': <EncodecModel.state_dict()>, 'version', 'exported'}`
  (facebook/audiogen-medium; training checkpoints nest the weights as `best_state['model']`);
- a reference: `{'pretrained': 'facebook/encodec_32khz', ...}` (MusicGen), resolved like `Codec.from_pretrained`.

audiocraft rebuilds its model from `xp.cfg` (`models/builders.py: get_compression_model`). Here the same settings
are translated into a transformers `EncodecConfig`, and every setting transformers' EnCodec cannot reproduce is
refused by name rather than loading weights into a network that computes something else.

Key mapping (audiocraft `best_state` -> transformers `EncodecModel`). Both libraries build the SEANet encoder and
decoder as one flat list in the same order, parameter-free ELU layers included, so the layer index `i` carries over
unchanged (encoder: conv, [resblocks, ELU, down-conv] per ratio in reversed order, LSTM, ELU, conv; decoder: conv,
LSTM, [ELU, up-convtr, resblocks] per ratio, ELU, conv). `AT` is `i`, `i.block.j` (residual branch convs, j = 1, 3)
or `i.shortcut` (the 1x1 conv used when `true_skip` is false):

    NET.model.AT.conv.conv.weight_g                   -> NET.layers.AT.conv.parametrizations.weight.original0
    NET.model.AT.conv.conv.weight_v                   -> NET.layers.AT.conv.parametrizations.weight.original1
    NET.model.AT.conv.conv.parametrizations.weight.original{0,1}   (newer torch's weight_norm) -> the same names
    NET.model.AT.conv.conv.{weight,bias}              -> NET.layers.AT.conv.{weight,bias}  (bias; time_group_norm)
    NET.model.AT.conv.norm.{weight,bias}              -> NET.layers.AT.norm.{weight,bias}  (time_group_norm)
    decoder.model.i.convtr.convtr.*, .convtr.norm.*   -> decoder.layers.i.conv.*, .norm.*  (as for .conv above)
    NET.model.i.lstm.{weight,bias}_{ih,hh}_lN         -> NET.layers.i.lstm.{weight,bias}_{ih,hh}_lN
    quantizer.vq.layers.n._codebook.{inited,cluster_size,embed,embed_avg} -> quantizer.layers.n.codebook.{...}

with NET = encoder or decoder. The table, the index alignment, the encoder's reversed ratios and the residual
dilations were checked against audiocraft's own EncodecModel (built by its builders from the same xp.cfg and given
the same weights): identical codes and decoded audio equal to float rounding.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch
from transformers import EncodecConfig, EncodecModel

from audiogen.checkpoints import audiocraft_files as files
from audiogen.checkpoints import load_strict
from audiogen.checkpoints.audiocraft_files import get_value, parse_xp_cfg, select_best_state
from audiogen.codec import Codec, target_bandwidth
from audiogen.errors import CheckpointError, MissingCheckpointFileError

COMPRESSION_FILE = "compression_state_dict.bin"
LAYOUT_HELP = (f"an audiocraft codec is a {COMPRESSION_FILE} (as published next to state_dict.bin for "
               f"facebook/audiogen-medium and facebook/musicgen-*), or a directory holding it")

# Constructor defaults of audiocraft's SEANetEncoder/SEANetDecoder (modules/seanet.py): what audiocraft builds when
# xp.cfg leaves a key out.
SEANET_DEFAULTS: dict[str, Any] = {
    "channels": 1, "dimension": 128, "n_filters": 32, "n_residual_layers": 3, "ratios": [8, 5, 4, 2],
    "activation": "ELU", "activation_params": {"alpha": 1.0}, "norm": "none", "norm_params": {},
    "kernel_size": 7, "last_kernel_size": 7, "residual_kernel_size": 3, "dilation_base": 2, "causal": False,
    "pad_mode": "reflect", "true_skip": True, "compress": 2, "lstm": 0, "disable_norm_outer_blocks": 0,
}
DECODER_ONLY_DEFAULTS: dict[str, Any] = {"trim_right_ratio": 1.0, "final_activation": None,
                                         "final_activation_params": None}
# ResidualVectorQuantizer (quantization/vq.py) defaults; `dimension` is always overwritten by the builder with the
# encoder's dimension, and the EMA / k-means / dropout / regularisation options only matter for training.
RVQ_DEFAULTS: dict[str, Any] = {
    "dimension": 256, "n_q": 8, "q_dropout": False, "bins": 1024, "decay": 0.99, "kmeans_init": True,
    "kmeans_iters": 10, "threshold_ema_dead_code": 2.0, "orthogonal_reg_weight": 0.0,
    "orthogonal_reg_active_codes_only": False, "orthogonal_reg_max_codes": None,
}
# Keys of the `encodec` section that get_compression_model reads or passes to audiocraft's EncodecModel.
ENCODEC_KEYS = frozenset({"autoencoder", "quantizer", "sample_rate", "channels", "causal", "renormalize", "renorm"})
PAD_MODES = ("constant", "reflect", "replicate", "circular")
GROUP_NORM_DEFAULTS = {"eps": 1e-5, "affine": True}  # the nn.GroupNorm that transformers builds

_AT = r"(?P<net>encoder|decoder)\.model\.(?P<at>\d+(?:\.block\.\d+|\.shortcut)?)"
_NET = r"\g<net>.layers.\g<at>"
KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(pattern), target) for pattern, target in (
    (_AT + r"\.(?:conv\.conv|convtr\.convtr)\.weight_g", _NET + ".conv.parametrizations.weight.original0"),
    (_AT + r"\.(?:conv\.conv|convtr\.convtr)\.weight_v", _NET + ".conv.parametrizations.weight.original1"),
    (_AT + r"\.(?:conv\.conv|convtr\.convtr)\.parametrizations\.weight\.original(?P<i>[01])",
     _NET + r".conv.parametrizations.weight.original\g<i>"),
    (_AT + r"\.(?:conv\.conv|convtr\.convtr)\.(?P<p>weight|bias)", _NET + r".conv.\g<p>"),
    (_AT + r"\.(?:conv|convtr)\.norm\.(?P<p>weight|bias)", _NET + r".norm.\g<p>"),
    (r"(?P<net>encoder|decoder)\.model\.(?P<at>\d+)\.lstm\.(?P<p>(?:weight|bias)_(?:ih|hh)_l\d+)",
     _NET + r".lstm.\g<p>"),
    (r"quantizer\.vq\.layers\.(?P<n>\d+)\._codebook\.(?P<b>inited|cluster_size|embed|embed_avg)",
     r"quantizer.layers.\g<n>.codebook.\g<b>"),
))
_ABSENT = object()


def load_audiocraft_codec(path_or_package: str | os.PathLike[str] | dict[str, Any], *,
                          codec_override: str | os.PathLike[str] | None = None,
                          stereo_interleaved: bool | None = None) -> Codec:
    """A `Codec` from an audiocraft compression checkpoint (directory, file, or the already-loaded dict).

    `codec_override` (a local EncodecModel directory or a cached hub id) replaces the codec the package holds or
    names. `stereo_interleaved` defaults to `interleave_stereo_codebooks.use` in the package's xp.cfg (audiocraft
    keeps it in the LM's xp.cfg, so the LM loader should pass it). As in audiocraft, the codec uses `rvq.n_q`
    quantizers (weights) or those of the pretrained model's largest bandwidth (reference).
    """
    if isinstance(path_or_package, dict):
        package, origin = path_or_package, "the compression package"
    else:
        file = files.resolve_file(path_or_package, COMPRESSION_FILE, LAYOUT_HELP)
        package = files.load_package(file, export_function="export_encodec", layout_help=LAYOUT_HELP)
        origin = str(file)
    xp_cfg = parse_xp_cfg(package["xp.cfg"], origin) if "xp.cfg" in package else None
    if stereo_interleaved is None:
        stereo_interleaved = xp_cfg is not None and bool(get_value(xp_cfg, "interleave_stereo_codebooks.use", False))
        per_timestep = stereo_interleaved and get_value(xp_cfg, "interleave_stereo_codebooks.per_timestep", False)
        if per_timestep:
            raise _unsupported("interleave_stereo_codebooks.per_timestep", per_timestep,
                               "only codebook-interleaved stereo ([L0, R0, L1, R1, ...]) is supported")
    if codec_override is not None or "pretrained" in package:
        return _load_reference(package, origin, codec_override, stereo_interleaved)
    if xp_cfg is None or not any(key in package for key in files.STATE_KEYS):
        raise CheckpointError(f"{origin} has neither 'pretrained' nor 'xp.cfg' + 'best_state' (found "
                              f"{sorted(map(str, package))[:20]}): {LAYOUT_HELP}")
    config, rvq_n_q = encodec_config_from_xp_cfg(xp_cfg)
    model = EncodecModel(config)
    load_mapped_state(model, select_best_state(package, origin, LAYOUT_HELP), origin)
    return Codec(model.eval(), n_q=rvq_n_q, stereo_interleaved=stereo_interleaved)


# ---------------------------------------------------------------------------------------------------- the file
def _load_reference(package: dict[str, Any], origin: str, codec_override: str | os.PathLike[str] | None,
                    stereo_interleaved: bool) -> Codec:
    """The package names a pretrained codec (or the caller overrides it): load that, offline."""
    name = codec_override if codec_override is not None else package["pretrained"]
    if not isinstance(name, (str, os.PathLike)):
        raise CheckpointError(f"'pretrained' in {origin} is a {type(name).__name__}, expected a model name")
    if str(name) in ("dac_44khz", "dac_24khz", "debug_compression_model"):
        raise CheckpointError(f"{origin} refers to audiocraft's {name!r} codec, which is not supported; only "
                              f"EnCodec models are (e.g. facebook/encodec_32khz)")
    try:
        return Codec.from_pretrained(name, stereo_interleaved=stereo_interleaved)
    except MissingCheckpointFileError as error:
        if codec_override is not None:
            raise
        raise MissingCheckpointFileError(
            f"{origin} does not contain codec weights but refers to the pretrained codec {name!r} (audiocraft's "
            f"export for MusicGen), which must be available offline. Pass its directory as the codec override "
            f"(codec=...) or put it in the Hugging Face cache. {error}") from error


# ---------------------------------------------------------------------------------------------------- xp.cfg
def _section(xp_cfg: dict[str, Any], key: str, known: set[str] | frozenset[str]) -> dict[str, Any]:
    """The mapping at `key` (a copy), holding only options audiocraft's builder accepts."""
    value = _require_value(xp_cfg, key)
    if not isinstance(value, dict):
        raise CheckpointError(f"xp.cfg {key} is a {type(value).__name__}, expected a mapping")
    _check_known(key, value, known)
    return dict(value)


def _require_value(xp_cfg: dict[str, Any], key: str) -> Any:
    return files.require_value(xp_cfg, key, "to build the codec (audiocraft's get_compression_model)")


def _unsupported(key: str, value: Any, why: str) -> CheckpointError:
    return files.unsupported(key, value, why, by=" by transformers' EnCodec")


def _require(key: str, value: Any, ok: bool, why: str) -> None:
    if not ok:
        raise _unsupported(key, value, why)


def _check_known(section: str, values: dict[str, Any], known: set[str] | frozenset[str]) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise CheckpointError(f"xp.cfg {section}.{unknown[0]} is not an option audiocraft's builder accepts "
                              f"(unknown keys in {section}: {unknown}); the codec cannot be rebuilt")


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    _require(key, value, isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
             f"must be an integer >= {minimum}")
    return value


def _seanet_kwargs(xp_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Encoder and decoder constructor arguments, merged as get_encodec_autoencoder does."""
    section = _section(xp_cfg, "seanet", {*SEANET_DEFAULTS, "encoder", "decoder"})
    encoder_override = section.pop("encoder", None) or {}
    decoder_override = section.pop("decoder", None) or {}
    _check_known("seanet.encoder", encoder_override, set(SEANET_DEFAULTS))
    _check_known("seanet.decoder", decoder_override, set(SEANET_DEFAULTS) | set(DECODER_ONLY_DEFAULTS))
    encoder = {**SEANET_DEFAULTS, **section, **encoder_override}
    decoder = {**SEANET_DEFAULTS, **DECODER_ONLY_DEFAULTS, **section, **decoder_override}
    for key in SEANET_DEFAULTS:
        if encoder[key] != decoder[key]:
            where, value = ("decoder", decoder[key]) if key in decoder_override else ("encoder", encoder[key])
            raise _unsupported(f"seanet.{where}.{key}", value,
                               f"encoder and decoder must share it (encoder {encoder[key]!r}, decoder "
                               f"{decoder[key]!r}): transformers has one setting for both")
    return encoder, decoder


def _check_seanet(seanet: dict[str, Any], decoder: dict[str, Any]) -> None:
    """Every SEANet option transformers' EnCodec hard-codes or lacks must have the value it implements."""
    key = "seanet.{}".format
    _require(key("activation"), seanet["activation"], seanet["activation"] == "ELU", "only ELU is implemented")
    params = seanet["activation_params"] or {}
    _require(key("activation_params"), params, isinstance(params, dict) and set(params) <= {"alpha"}
             and float(params.get("alpha", 1.0)) == 1.0, "only ELU with alpha=1.0 is implemented")
    norm = seanet["norm"]
    _require(key("norm"), norm, norm in ("weight_norm", "time_group_norm"),
             "only weight_norm and time_group_norm are implemented")
    if norm == "time_group_norm":
        norm_params = seanet["norm_params"] or {}
        _require(key("norm_params"), norm_params, all(GROUP_NORM_DEFAULTS.get(k, _ABSENT) == v
                                                      for k, v in norm_params.items()),
                 f"GroupNorm is built with {GROUP_NORM_DEFAULTS}")
        _require(key("causal"), seanet["causal"], not seanet["causal"], "time_group_norm is not causal")
    _require(key("disable_norm_outer_blocks"), seanet["disable_norm_outer_blocks"],
             seanet["disable_norm_outer_blocks"] == 0, "every conv is normalized in transformers")
    _positive_int(key("lstm"), seanet["lstm"])  # transformers always has the LSTM (with its skip connection)
    _require(key("pad_mode"), seanet["pad_mode"], seanet["pad_mode"] in PAD_MODES, f"must be one of {PAD_MODES}")
    _require(key("causal"), seanet["causal"], isinstance(seanet["causal"], bool), "must be true or false")
    _require(key("true_skip"), seanet["true_skip"], isinstance(seanet["true_skip"], bool), "must be true or false")
    _require(key("ratios"), seanet["ratios"], isinstance(seanet["ratios"], list) and len(seanet["ratios"]) > 0
             and all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in seanet["ratios"]),
             "must be a list of positive integers")
    for name in ("dimension", "n_filters", "kernel_size", "last_kernel_size", "residual_kernel_size",
                 "dilation_base", "compress"):
        _positive_int(key(name), seanet[name])
    _positive_int(key("n_residual_layers"), seanet["n_residual_layers"], minimum=0)
    _require(key("channels"), seanet["channels"], seanet["channels"] == 1,
             "AudioGen/MusicGen codecs are mono (MusicGen stereo interleaves two mono streams)")
    _require("seanet.decoder.final_activation", decoder["final_activation"], decoder["final_activation"] is None,
             "the decoder has no final activation")
    trim = decoder["trim_right_ratio"]
    _require("seanet.decoder.trim_right_ratio", trim, isinstance(trim, (int, float)) and 0.0 <= trim <= 1.0
             and (seanet["causal"] or trim == 1.0), "must be in [0, 1], and 1.0 unless causal")


def encodec_config_from_xp_cfg(xp_cfg: dict[str, Any]) -> tuple[EncodecConfig, int]:
    """The transformers config for the model audiocraft's get_compression_model would build, and its n_q."""
    model_kind = _require_value(xp_cfg, "compression_model")
    _require("compression_model", model_kind, model_kind == "encodec", "only EnCodec compression models exist here")
    encodec = _section(xp_cfg, "encodec", ENCODEC_KEYS)
    _require("encodec.autoencoder", encodec.get("autoencoder"), encodec.get("autoencoder") == "seanet",
             "only the SEANet autoencoder is implemented")
    _require("encodec.quantizer", encodec.get("quantizer"), encodec.get("quantizer") == "rvq",
             "only residual vector quantization is implemented")
    _require("encodec.renormalize", encodec.get("renormalize"), not encodec.get("renormalize", False),
             "volume renormalization needs a per-clip scale, which AudioGen/MusicGen's LM cannot model "
             "(audiocraft asserts scale is None)")
    _require("encodec.channels", encodec.get("channels"), encodec.get("channels") == 1,
             "AudioGen/MusicGen codecs are mono (MusicGen stereo interleaves two mono streams)")
    sample_rate = _positive_int("encodec.sample_rate", encodec.get("sample_rate"))
    seanet, decoder = _seanet_kwargs(xp_cfg)
    _check_seanet(seanet, decoder)
    rvq = {**RVQ_DEFAULTS, **_section(xp_cfg, "rvq", set(RVQ_DEFAULTS))}
    _positive_int("rvq.n_q", rvq["n_q"])
    bins = _positive_int("rvq.bins", rvq["bins"], minimum=2)
    _require("rvq.bins", bins, bins & (bins - 1) == 0, "the codebook size must be a power of two")
    hop = math.prod(seanet["ratios"])
    _require("seanet.ratios", seanet["ratios"], sample_rate % hop == 0,
             f"the hop length {hop} must divide encodec.sample_rate={sample_rate} (whole frames per second)")
    config = EncodecConfig(
        sampling_rate=sample_rate, audio_channels=1, normalize=False, chunk_length_s=None, overlap=None,
        hidden_size=seanet["dimension"], num_filters=seanet["n_filters"],
        num_residual_layers=seanet["n_residual_layers"], upsampling_ratios=list(seanet["ratios"]),
        norm_type=seanet["norm"], kernel_size=seanet["kernel_size"], last_kernel_size=seanet["last_kernel_size"],
        residual_kernel_size=seanet["residual_kernel_size"], dilation_growth_rate=seanet["dilation_base"],
        use_causal_conv=seanet["causal"], pad_mode=seanet["pad_mode"], compress=seanet["compress"],
        num_lstm_layers=seanet["lstm"], trim_right_ratio=float(decoder["trim_right_ratio"]),
        codebook_size=rvq["bins"], codebook_dim=seanet["dimension"], use_conv_shortcut=not seanet["true_skip"],
        target_bandwidths=[target_bandwidth(rvq["n_q"], sample_rate // hop, rvq["bins"])])
    return config, rvq["n_q"]


# ---------------------------------------------------------------------------------------------------- weights
def map_audiocraft_key(key: str) -> str | None:
    """The EncodecModel key for an audiocraft key (see the module docstring), or None if no rule matches."""
    for pattern, target in KEY_RULES:
        if match := pattern.fullmatch(key):
            return match.expand(target)
    return None


def load_mapped_state(model: EncodecModel, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load audiocraft weights into `model` strictly: every key mapped, none missing, every shape equal."""
    mapped = {map_audiocraft_key(key) or f"{key} (no mapping rule)": tensor for key, tensor in state.items()}
    load_strict(model, mapped, f"the codec weights in {origin} do not match the EnCodec that its xp.cfg describes "
                               f"(keys after mapping audiocraft names to transformers names)")

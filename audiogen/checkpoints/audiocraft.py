"""Reader for audiocraft LM checkpoints: the `state_dict.bin` of facebook/audiogen-medium and facebook/musicgen-*.

The file is a pickle written by `audiocraft/utils/export.py`:
`{'xp.cfg': <hydra config as YAML>, 'best_state': <LMModel.state_dict()>, 'version': ..., 'exported': True}`.
`xp.cfg` is the only description of the architecture, so the config is rebuilt from it, and every option our LM
cannot reproduce is refused by name instead of loading the weights into a network that computes something else.
Weights are mapped onto the native LM layout of docs/INTERFACES.md and cast to float32 (published files are fp16).
`load_audiocraft` composes the whole checkpoint directory: this LM, the codec (`compression_state_dict.bin`) and
the T5 that `xp.cfg` names (not stored in the checkpoint; resolved offline or overridden).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from audiogen.checkpoints import audiocraft_files as files
from audiogen.checkpoints import LoadedCheckpoint, check_state, describe_key_mismatch
from audiogen.checkpoints.audiocraft_codec import COMPRESSION_FILE, load_audiocraft_codec
from audiogen.checkpoints.audiocraft_files import get_value, parse_xp_cfg, select_best_state, unsupported
from audiogen.codec import Codec
from audiogen.config import AudioGenConfig
from audiogen.errors import CheckpointError, InvalidConfigError, MissingCheckpointFileError
from audiogen.text import load_text_encoder

STATE_FILE = "state_dict.bin"
TEXT_PROJ = "condition_provider.conditioners.description.output_proj."
LAYOUT_HELP = (f"an audiocraft LM checkpoint is a directory holding {STATE_FILE} (next to "
               f"compression_state_dict.bin), as published for facebook/audiogen-medium and facebook/musicgen-*, "
               f"or the {STATE_FILE} file itself")

# Generation defaults of audiocraft's model classes (`set_generation_params` and the constructors' durations in
# audiocraft/models/audiogen.py and musicgen.py); both sample with top_k=250, top_p=0, temperature=1.
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "audiogen": {"default_duration": 5.0, "extend_stride": 2.0},
    "musicgen": {"default_duration": 15.0, "extend_stride": 18.0},
}
TOP_K = 250
DEFAULT_FRAME_RATE = 50  # every published AudioGen/MusicGen codec: 16 kHz / 320 and 32 kHz / 640

# xp.cfg options whose value our LM has exactly one implementation for: (key, value we implement, value audiocraft
# uses when the key is absent, what the supported value means). Dropout, init and attention-backend options only
# matter for training or speed and are ignored.
REQUIRED_VALUES: tuple[tuple[str, Any, Any, str], ...] = (
    ("lm_model", "transformer_lm", None, "the autoregressive transformer LM"),
    ("transformer_lm.norm", "layer_norm", "layer_norm", "LayerNorm"),
    ("transformer_lm.norm_first", True, False, "pre-norm layers"),
    ("transformer_lm.layer_scale", None, None, "no LayerScale"),
    ("transformer_lm.positional_embedding", "sin", "sin", "sinusoidal positions"),
    ("transformer_lm.positional_scale", 1.0, 1.0, "unscaled sinusoidal positions"),
    ("transformer_lm.qk_layer_norm", False, False, "no query/key LayerNorm"),
    ("transformer_lm.qk_layer_norm_cross", False, False, "no query/key LayerNorm in cross-attention"),
    ("transformer_lm.kv_repeat", 1, 1, "one key/value head per query head"),
    ("transformer_lm.past_context", None, None, "unbounded causal attention"),
    ("transformer_lm.causal", True, False, "causal self-attention"),
    ("transformer_lm.activation", "gelu", "relu", "exact GELU feed-forward"),
    ("transformer_lm.bias_proj", False, True, "output heads without bias"),
    ("codebooks_pattern.modeling", "delay", None, "the delay codebook pattern"),
    ("codebooks_pattern.delay.flatten_first", 0, 0, "no flattened first steps"),
    ("codebooks_pattern.delay.empty_initial", 0, 0, "no empty initial steps"),
    ("fuser.cross_attention_pos_emb", False, False, "cross-attention without positional embeddings"),
    ("interleave_stereo_codebooks.per_timestep", False, False, "stereo codebooks interleaved per codebook"),
    ("conditioners.description.model", "t5", None, "a T5 text conditioner"),
    ("conditioners.description.t5.finetune", False, False, "a frozen T5 (its weights are not in the checkpoint)"),
    ("conditioners.description.t5.normalize_text", False, False, "unnormalized prompt text"),
)
FUSE_METHODS = ("sum", "prepend", "ignore", "input_interpolate")

_ALL = slice(None)
_LEGACY_MHA = re.compile(r"\.(self_attn|cross_attention)\.mha\.")
Piece = tuple[str, slice]  # destination key, rows of the source tensor that go there


@dataclass
class AudiocraftLM:
    """What an audiocraft `state_dict.bin` holds, translated: config, native LM weights, T5 -> LM projection."""

    config: AudioGenConfig
    lm_state: dict[str, torch.Tensor]
    text_proj_state: dict[str, torch.Tensor] | None
    xp_cfg: dict[str, Any]
    source: dict[str, Any]


def read_audiocraft_lm(path: str | Path) -> AudiocraftLM:
    """Read `state_dict.bin` (or a directory holding it) into native pieces; no audiocraft import needed."""
    file = files.resolve_file(path, STATE_FILE, LAYOUT_HELP)
    package = files.load_package(file, export_function="export_lm", layout_help=LAYOUT_HELP, required=("xp.cfg",))
    xp_cfg = parse_xp_cfg(package["xp.cfg"], file)
    state = select_best_state(package, file, LAYOUT_HELP)
    source = {"format": "audiocraft", "path": str(file)}
    if package.get("version") is not None:
        source["version"] = str(package["version"])
    del package  # `state` alone now holds the tensors, so converting frees each fp16 source as it goes
    rename_legacy_keys(state)
    text_dim = _text_dim(state)
    config = config_from_xp_cfg(xp_cfg, text_dim=text_dim)
    layout = audiocraft_layout(config, text_dim)
    check_state(state, {key: shape for key, (shape, _) in layout.items()},
                f"{file}: best_state does not match the LM its xp.cfg describes")
    converted = convert_state(state, layout)
    text_proj = {k[len("text_proj."):]: converted.pop(k) for k in list(converted) if k.startswith("text_proj.")}
    return AudiocraftLM(config=config, lm_state=converted, text_proj_state=text_proj, xp_cfg=xp_cfg, source=source)


def load_audiocraft(root: Path, *, text_encoder: str | os.PathLike[str] | None = None,
                    codec: str | os.PathLike[str] | None = None) -> LoadedCheckpoint:
    directory = root.parent if root.is_file() else root
    compression = directory / COMPRESSION_FILE
    if not compression.exists() and codec is None:
        raise MissingCheckpointFileError(
            f"{compression} is missing: audiocraft checkpoints need state_dict.bin and compression_state_dict.bin "
            f"(or pass codec=<EnCodec directory>)")
    lm = read_audiocraft_lm(root)
    # audiocraft keeps the stereo layout in the LM's xp.cfg (interleave_stereo_codebooks): MusicGen's compression
    # file is often only {'pretrained': 'facebook/encodec_32khz'}, which cannot say it.
    stereo = lm.config.audio_channels == 2
    if compression.exists():
        codec_model = load_audiocraft_codec(compression, codec_override=codec, stereo_interleaved=stereo)
    else:
        codec_model = Codec.from_pretrained(codec, stereo_interleaved=stereo)
    # Whether the codec's rates and codebooks are the LM's is checked by AudioGen, for every checkpoint layout.
    t5, tokenizer = load_text_encoder(text_encoder or lm.config.text_encoder)
    return LoadedCheckpoint(config=lm.config, lm_state=lm.lm_state, text_proj_state=lm.text_proj_state, t5=t5,
                            tokenizer=tokenizer, codec=codec_model, source=lm.source)


# ---------------------------------------------------------------------------------------------------- xp.cfg
def require_value(xp_cfg: dict[str, Any], key: str) -> Any:
    return files.require_value(xp_cfg, key, "to build the LM (audiocraft's get_lm_model)")


def check_supported(xp_cfg: dict[str, Any]) -> None:
    """Refuse every architecture option our LM does not implement, naming the xp.cfg key."""
    for method in FUSE_METHODS:
        fused = get_value(xp_cfg, f"fuser.{method}") or []
        if fused:
            raise unsupported(f"fuser.{method}", fused, "only cross-attention text conditioning is supported")
    cross = get_value(xp_cfg, "fuser.cross")
    if cross != ["description"]:
        raise unsupported("fuser.cross", cross, "the description must be fused by cross-attention")
    conditioners = sorted(k for k in get_value(xp_cfg, "conditioners") or {} if k != "args")
    if conditioners != ["description"]:
        raise unsupported("conditioners", conditioners,
                          "only a text 'description' conditioner is supported (no melody/chroma, style, CLAP, ...)")
    for key, supported, absent, meaning in REQUIRED_VALUES:
        value = get_value(xp_cfg, key, absent)
        if value != supported:
            raise unsupported(key, value, f"this LM implements only {key}={supported!r} ({meaning})")


def config_from_xp_cfg(xp_cfg: dict[str, Any], *, text_dim: int) -> AudioGenConfig:
    """The AudioGenConfig audiocraft would build from `xp.cfg` (`get_lm_model`) plus its generation defaults."""
    check_supported(xp_cfg)
    dim = require_value(xp_cfg, "transformer_lm.dim")
    hidden_scale = get_value(xp_cfg, "transformer_lm.hidden_scale", 4)
    total_q = require_value(xp_cfg, "transformer_lm.n_q")
    channels = _audio_channels(xp_cfg, total_q)
    card = require_value(xp_cfg, "transformer_lm.card")
    sample_rate = require_value(xp_cfg, "sample_rate")
    window = float(require_value(xp_cfg, "dataset.segment_duration"))
    family = _family(xp_cfg, sample_rate)
    defaults = FAMILY_DEFAULTS[family]
    values = dict(
        dim=dim, num_layers=require_value(xp_cfg, "transformer_lm.num_layers"),
        num_heads=require_value(xp_cfg, "transformer_lm.num_heads"), ffn_dim=int(hidden_scale * dim),
        n_q=total_q // channels, card=card, audio_channels=channels, delays=_delays(xp_cfg, total_q),
        bias_attn=bool(get_value(xp_cfg, "transformer_lm.bias_attn", True)),
        bias_ff=bool(get_value(xp_cfg, "transformer_lm.bias_ff", True)),
        positional_max_period=float(get_value(xp_cfg, "transformer_lm.max_period", 10_000)),
        text_encoder=str(require_value(xp_cfg, "conditioners.description.t5.name")), text_dim=text_dim,
        sample_rate=sample_rate, frame_rate=_frame_rate(xp_cfg, sample_rate),
        window_duration=window, max_duration=3 * window,
        # A model trained on short windows still needs a stride shorter than its window.
        extend_stride=defaults["extend_stride"] if defaults["extend_stride"] < window else window / 2,
        default_duration=min(defaults["default_duration"], window),
        temperature=1.0, top_k=min(TOP_K, card), top_p=0.0,
        guidance_scale=float(get_value(xp_cfg, "classifier_free_guidance.inference_coef", 3.0)), name=family,
    )
    try:
        return AudioGenConfig(**values)
    except InvalidConfigError as error:
        raise CheckpointError(f"xp.cfg describes a model this engine cannot run: {error}") from error


def _audio_channels(xp_cfg: dict[str, Any], total_q: int) -> int:
    """MusicGen stereo: channels=2 with interleave_stereo_codebooks.use, codebooks ordered L0 R0 L1 R1 ..."""
    channels = get_value(xp_cfg, "channels", 1)
    interleaved = bool(get_value(xp_cfg, "interleave_stereo_codebooks.use", False))
    if channels not in (1, 2):
        raise unsupported("channels", channels, "audio must be mono (1) or stereo (2)")
    if (channels == 2) != interleaved:
        raise unsupported("interleave_stereo_codebooks.use", interleaved,
                          f"with channels={channels}: stereo models must interleave their per-channel codebooks "
                          f"(audiocraft's only stereo LM layout) and mono models must not")
    if total_q % channels:
        raise unsupported("transformer_lm.n_q", total_q, "stereo needs an even number of codebooks (n_q per channel)")
    return channels


def _delays(xp_cfg: dict[str, Any], total_q: int) -> tuple[int, ...]:
    delays = get_value(xp_cfg, "codebooks_pattern.delay.delays") or list(range(total_q))
    if len(delays) != total_q or list(delays) != sorted(delays) or delays[0] != 0:
        raise unsupported("codebooks_pattern.delay.delays", delays,
                          f"need {total_q} (transformer_lm.n_q) non-decreasing delays starting at 0")
    return tuple(int(d) for d in delays)


def _family(xp_cfg: dict[str, Any], sample_rate: int) -> str:
    """'audiogen' or 'musicgen': which audiocraft model class (and so which generation defaults) serves it."""
    solver = get_value(xp_cfg, "solver")
    if solver in FAMILY_DEFAULTS:
        return solver
    return "audiogen" if sample_rate == 16_000 else "musicgen"


def _frame_rate(xp_cfg: dict[str, Any], sample_rate: int) -> int:
    """From the SEANet strides when xp.cfg describes the codec (LM configs usually only point at its file)."""
    ratios = get_value(xp_cfg, "seanet.ratios")
    if not ratios:
        return DEFAULT_FRAME_RATE
    hop = math.prod(ratios)
    if sample_rate % hop:
        raise unsupported("seanet.ratios", ratios, f"hop {hop} must divide sample_rate={sample_rate}")
    return sample_rate // hop


# ---------------------------------------------------------------------------------------------------- weights
def _text_dim(state: dict[str, Any]) -> int:
    weight = state.get(TEXT_PROJ + "weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise CheckpointError(f"best_state has no 2-d {TEXT_PROJ}weight (the T5 -> LM projection); "
                              f"{describe_key_mismatch([TEXT_PROJ + 'weight'], [])}")
    return int(weight.shape[1])


def audiocraft_layout(config: AudioGenConfig, text_dim: int) -> dict[str, tuple[tuple[int, ...], tuple[Piece, ...]]]:
    """Every key audiocraft's LMModel.state_dict() has for `config`: its shape and where its rows go natively.

    Text-projection destinations carry a `text_proj.` prefix; everything else is a native LM key.
    """
    d, f, card = config.dim, config.ffn_dim, config.card
    layout: dict[str, tuple[tuple[int, ...], tuple[Piece, ...]]] = {}

    def add(source: str, shape: tuple[int, ...], *pieces: Piece) -> None:
        layout[source] = (shape, pieces)

    def add_linear(source: str, target: str, out_dim: int, in_dim: int, bias: bool) -> None:
        add(f"{source}.weight", (out_dim, in_dim), (f"{target}.weight", _ALL))
        if bias:
            add(f"{source}.bias", (out_dim,), (f"{target}.bias", _ALL))

    def add_norm(source: str, target: str) -> None:
        add(f"{source}.weight", (d,), (f"{target}.weight", _ALL))
        add(f"{source}.bias", (d,), (f"{target}.bias", _ALL))

    for k in range(config.num_codebooks):
        add(f"emb.{k}.weight", (card + 1, d), (f"embeddings.{k}.weight", _ALL))
        add(f"linears.{k}.weight", (card, d), (f"heads.{k}.weight", _ALL))
    for i in range(config.num_layers):
        src, dst = f"transformer.layers.{i}", f"layers.{i}"
        for kind, shape in (("weight", (3 * d, d)), ("bias", (3 * d,)))[: 2 if config.bias_attn else 1]:
            add(f"{src}.self_attn.in_proj_{kind}", shape, (f"{dst}.self_attn.in_proj.{kind}", _ALL))
            add(f"{src}.cross_attention.in_proj_{kind}", shape,  # q rows, then k and v
                (f"{dst}.cross_attn.q_proj.{kind}", slice(0, d)), (f"{dst}.cross_attn.kv_proj.{kind}", slice(d, None)))
        add_linear(f"{src}.self_attn.out_proj", f"{dst}.self_attn.out_proj", d, d, config.bias_attn)
        add_linear(f"{src}.cross_attention.out_proj", f"{dst}.cross_attn.out_proj", d, d, config.bias_attn)
        add_linear(f"{src}.linear1", f"{dst}.ffn.linear1", f, d, config.bias_ff)
        add_linear(f"{src}.linear2", f"{dst}.ffn.linear2", d, f, config.bias_ff)
        add_norm(f"{src}.norm1", f"{dst}.self_attn_norm")
        add_norm(f"{src}.norm_cross", f"{dst}.cross_attn_norm")
        add_norm(f"{src}.norm2", f"{dst}.ffn_norm")
    add_norm("out_norm", "out_norm")
    add_linear(TEXT_PROJ.rstrip("."), "text_proj", d, text_dim, True)
    return layout


def rename_legacy_keys(state: dict[str, Any]) -> None:
    """Without audiocraft's custom attention (`memory_efficient` and `custom` false) the fused projections are
    torch MHA's, saved under `...attn.mha.*`; audiocraft loads either name, and so do we."""
    for key in [k for k in state if _LEGACY_MHA.search(k)]:
        state[_LEGACY_MHA.sub(r".\1.", key)] = state.pop(key)


def convert_state(state: dict[str, torch.Tensor],
                  layout: dict[str, tuple[tuple[int, ...], tuple[Piece, ...]]]) -> dict[str, torch.Tensor]:
    """Native float32 tensors; sources are dropped as they are converted so fp16 and fp32 copies never all coexist."""
    native: dict[str, torch.Tensor] = {}
    for key, (_, pieces) in layout.items():
        tensor = state.pop(key)
        for target, rows in pieces:
            native[target] = tensor[rows].to(torch.float32, copy=True)
    return native

"""Writes audiocraft `compression_state_dict.bin` files from a transformers EnCodec, for loader tests.

The key names come from walking the transformers module tree and naming each weight the way audiocraft's SEANet /
RVQ modules do (old `weight_norm`: `weight_g` / `weight_v`, as in the published 2023 AudioGen file). This is
deliberately not the inverse of the loader's regex table, so a mistake in one is not mirrored by the other; the
names were checked against a real audiocraft `EncodecModel.state_dict()` of the same sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import EncodecModel
from transformers.models.encodec.modeling_encodec import (EncodecConv1d, EncodecConvTranspose1d, EncodecLSTM,
                                                          EncodecResnetBlock)

from audiogen.codec import Codec
from tests.audiocraft_lm_fixture import REMOVE, set_dotted

COMPRESSION_FILE = "compression_state_dict.bin"
DELETE = REMOVE  # value for `xp_overrides` that removes the key


def audiocraft_state_dict(model: EncodecModel, *, new_weight_norm: bool = False) -> dict[str, torch.Tensor]:
    """`model`'s weights under audiocraft's names (SEANet `*.model.N`, RVQ `quantizer.vq.layers.N._codebook`)."""
    state: dict[str, torch.Tensor] = {}
    for net in ("encoder", "decoder"):
        for index, layer in enumerate(getattr(model, net).layers):
            prefix = f"{net}.model.{index}"
            if isinstance(layer, EncodecConv1d):
                _add_conv(state, prefix, "conv", layer, new_weight_norm)
            elif isinstance(layer, EncodecConvTranspose1d):
                _add_conv(state, prefix, "convtr", layer, new_weight_norm)
            elif isinstance(layer, EncodecResnetBlock):
                for position, sub in enumerate(layer.block):
                    if isinstance(sub, EncodecConv1d):
                        _add_conv(state, f"{prefix}.block.{position}", "conv", sub, new_weight_norm)
                if isinstance(layer.shortcut, EncodecConv1d):
                    _add_conv(state, f"{prefix}.shortcut", "conv", layer.shortcut, new_weight_norm)
            elif isinstance(layer, EncodecLSTM):
                for name, tensor in layer.lstm.named_parameters():
                    state[f"{prefix}.lstm.{name}"] = tensor.detach().clone()
            elif not isinstance(layer, nn.ELU):
                raise TypeError(f"unexpected layer {net}.layers.{index}: {type(layer).__name__}")
    for index, vq in enumerate(model.quantizer.layers):
        for buffer in ("inited", "cluster_size", "embed", "embed_avg"):
            state[f"quantizer.vq.layers.{index}._codebook.{buffer}"] = getattr(vq.codebook, buffer).detach().clone()
    return state


def _add_conv(state: dict[str, torch.Tensor], prefix: str, kind: str, module: nn.Module, new_weight_norm: bool) -> None:
    """audiocraft wraps every conv twice: Streamable{Conv1d,ConvTranspose1d}.{conv,convtr} -> Norm*.{conv,convtr}."""
    conv = module.conv
    inner = f"{prefix}.{kind}.{kind}"
    if hasattr(conv, "parametrizations"):
        magnitude = conv.parametrizations.weight.original0.detach().clone()
        direction = conv.parametrizations.weight.original1.detach().clone()
        if new_weight_norm:
            state[f"{inner}.parametrizations.weight.original0"] = magnitude
            state[f"{inner}.parametrizations.weight.original1"] = direction
        else:
            state[f"{inner}.weight_g"] = magnitude
            state[f"{inner}.weight_v"] = direction
    else:
        state[f"{inner}.weight"] = conv.weight.detach().clone()
    state[f"{inner}.bias"] = conv.bias.detach().clone()
    if hasattr(module, "norm"):
        state[f"{prefix}.{kind}.norm.weight"] = module.norm.weight.detach().clone()
        state[f"{prefix}.{kind}.norm.bias"] = module.norm.bias.detach().clone()


def audiocraft_xp_cfg(model: EncodecModel, n_q: int) -> dict[str, Any]:
    """An xp.cfg like the one audiocraft's compression solver dumps for encodec_audiogen_16khz (config/solver/
    compression/encodec_audiogen_16khz.yaml over config/model/encodec/{default,encodec_large_nq4_s320}.yaml),
    with `model`'s sizes. Interpolations are kept unresolved, as OmegaConf.to_yaml writes them."""
    c = model.config
    return {
        "device": "cuda",
        "dtype": "float32",
        "solver": "compression",
        "sample_rate": c.sampling_rate,
        "channels": c.audio_channels,
        "compression_model": "encodec",
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": "${sample_rate}",
                    "channels": "${channels}", "causal": bool(c.use_causal_conv), "renormalize": bool(c.normalize)},
        "seanet": {
            "dimension": c.hidden_size, "channels": "${channels}", "causal": "${encodec.causal}",
            "n_filters": c.num_filters, "n_residual_layers": c.num_residual_layers,
            "ratios": list(c.upsampling_ratios), "activation": "ELU", "activation_params": {"alpha": 1.0},
            "norm": c.norm_type, "norm_params": {}, "kernel_size": c.kernel_size,
            "residual_kernel_size": c.residual_kernel_size, "last_kernel_size": c.last_kernel_size,
            "dilation_base": c.dilation_growth_rate, "pad_mode": c.pad_mode, "true_skip": not c.use_conv_shortcut,
            "compress": c.compress, "lstm": c.num_lstm_layers, "disable_norm_outer_blocks": 0,
            "decoder": {"trim_right_ratio": c.trim_right_ratio, "final_activation": None,
                        "final_activation_params": None},
            "encoder": {},
        },
        "rvq": {"n_q": n_q, "q_dropout": False, "bins": c.codebook_size, "decay": 0.99, "kmeans_init": True,
                "kmeans_iters": 50, "threshold_ema_dead_code": 2, "orthogonal_reg_weight": 0.0,
                "orthogonal_reg_active_codes_only": False},
        "no_quant": {},
        "losses": {"adv": 4.0, "feat": 4.0, "l1": 0.1, "mel": 0.0, "msspec": 2.0, "sisnr": 0.0},
        "optim": {"epochs": 200, "updates_per_epoch": 2000, "lr": 3e-4, "optimizer": "adam",
                  "adam": {"betas": [0.5, 0.9], "weight_decay": 0.0}},
        "dataset": {"batch_size": 64, "segment_duration": 1, "train": {"num_samples": 500000}},
    }


def audiocraft_compression_package(source: EncodecModel | Codec, *, n_q: int | None = None,
                                   xp_overrides: dict[str, Any] | None = None, new_weight_norm: bool = False,
                                   nest_in_model: bool = False) -> dict[str, Any]:
    """The dict audiocraft's export_encodec saves. `xp_overrides` maps dotted xp.cfg keys to new values."""
    model = source.model if isinstance(source, Codec) else source
    if n_q is None:
        n_q = source.n_q if isinstance(source, Codec) else len(model.quantizer.layers)
    cfg = audiocraft_xp_cfg(model, n_q)
    for key, value in (xp_overrides or {}).items():
        set_dotted(cfg, key, value)
    state = audiocraft_state_dict(model, new_weight_norm=new_weight_norm)
    return {"best_state": {"model": state} if nest_in_model else state,
            "xp.cfg": yaml.safe_dump(cfg, sort_keys=False), "version": "1.4.0a2", "exported": True}


def write_audiocraft_compression(path: str | Path, source: EncodecModel | Codec, **options: Any) -> Path:
    """Write `compression_state_dict.bin` into directory `path` (or to `path` itself if it ends in .bin)."""
    path = Path(path)
    file = path if path.suffix == ".bin" else path / COMPRESSION_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(audiocraft_compression_package(source, **options), file)
    return file


def write_pretrained_reference(path: str | Path, name: str, **extra: Any) -> Path:
    """The `{'pretrained': name}` package audiocraft exports for MusicGen's codec."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    file = path / COMPRESSION_FILE
    torch.save({"pretrained": name, "exported": True, "version": "1.0.0", **extra}, file)
    return file

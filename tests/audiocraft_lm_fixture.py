"""Fake audiocraft LM checkpoints (`state_dict.bin`) built from tiny transformers MusicGen models.

`make_audiocraft_xp_cfg` reproduces the hydra config audiocraft saves as `xp.cfg`: the composition of
config/config.yaml, solver/audiogen/audiogen_base_16khz.yaml (or solver/musicgen/musicgen_base_32khz.yaml),
solver/{audiogen,musicgen}/default.yaml, solver/default.yaml, model/lm/{audiogen,musicgen}_lm.yaml, lm/default.yaml,
conditioner/text2sound.yaml (or text2music.yaml) and a dset, as OmegaConf.to_yaml writes it, with sizes scaled down.

`write_audiocraft_lm` writes a transformers decoder under audiocraft's own key names. That mapping is the inverse of
transformers' convert_musicgen_transformers.py, written here independently of audiogen's reader so that reading
the file back tests the reader rather than restating it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import MusicgenForConditionalGeneration

from tests.hf_fixture import tiny_hf_musicgen

REMOVE = object()  # an `overrides` value that deletes the key, to test audiocraft's defaults for absent keys

HF_DECODER = "decoder.model.decoder."
HF_HEADS = "decoder.lm_heads."
TEXT_PROJ = "condition_provider.conditioners.description.output_proj"
# transformers layer module -> audiocraft layer module (one tensor each; q/k/v are fused separately).
LAYER_MODULES = {
    "self_attn.out_proj": "self_attn.out_proj",
    "self_attn_layer_norm": "norm1",
    "encoder_attn.out_proj": "cross_attention.out_proj",
    "encoder_attn_layer_norm": "norm_cross",
    "fc1": "linear1",
    "fc2": "linear2",
    "final_layer_norm": "norm2",
}
FUSED_ATTENTION = {"self_attn": "self_attn", "encoder_attn": "cross_attention"}

FAMILIES: dict[str, dict[str, Any]] = {
    "audiogen": dict(
        solver="audiogen", t5_name="t5-large", cfg_dropout=0.1, word_dropout=0.0, min_segment_ratio=1.0,
        compression_model_checkpoint="//reference/bd44a852/checkpoint.th",
        dataset_extra={"external_metadata_source": None},
        datasource=dict(max_sample_rate=16000, max_channels=1, train="egs/sound/sounds_16khz/train",
                        valid="egs/sound/sounds_16khz/valid", evaluate="egs/sound/sounds_16khz/test",
                        generate="egs/sound/sounds_16khz/test"),
        train=dict(num_samples=1000000, shuffle=True, shuffle_seed=0, permutation_on_files=False, batch_size=8,
                   aug_p=0.5, mix_p=0.5, mix_snr_low=-5, mix_snr_high=5, mix_min_overlap=0.5),
        optim=dict(epochs=100, lr=0.0005, optimizer="adamw"),
        schedule=dict(lr_scheduler="inverse_sqrt", cosine_warmup=None, inverse_sqrt_warmup=3000),
    ),
    "musicgen": dict(
        solver="musicgen", t5_name="t5-base", cfg_dropout=0.3, word_dropout=0.3, min_segment_ratio=0.8,
        compression_model_checkpoint="//pretrained/facebook/encodec_32khz",
        dataset_extra={},
        datasource=dict(max_sample_rate=44100, max_channels=2, train="egs/example", valid="egs/example",
                        evaluate="egs/example", generate="egs/example"),
        train=dict(num_samples=1000000, shuffle=True, shuffle_seed=0, permutation_on_files=False,
                   merge_text_p=0.25, drop_desc_p=0.5, drop_other_p=0.5),
        optim=dict(epochs=500, lr=1, optimizer="dadam"),
        schedule=dict(lr_scheduler="cosine", cosine_warmup=4000, inverse_sqrt_warmup=None),
    ),
}


def make_audiocraft_xp_cfg(*, dim: int, num_heads: int, num_layers: int, n_q: int, card: int,
                           t5_name: str | None = None, sample_rate: int = 16000, segment_duration: float = 10.0,
                           family: str = "audiogen", stereo: bool = False, hidden_scale: int = 4,
                           overrides: Mapping[str, Any] | None = None) -> str:
    """The YAML `xp.cfg` of an audiocraft LM run. `n_q` is transformer_lm.n_q: all streams, both channels if stereo.

    `overrides` maps dotted keys to values (`REMOVE` deletes the key), e.g. {'transformer_lm.layer_scale': 0.1}.
    """
    cfg = _composed_config(dim=dim, num_heads=num_heads, num_layers=num_layers, n_q=n_q, card=card,
                           t5_name=t5_name, sample_rate=sample_rate, segment_duration=segment_duration,
                           family=FAMILIES[family], stereo=stereo, hidden_scale=hidden_scale)
    for key, value in (overrides or {}).items():
        set_dotted(cfg, key, value)
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def xp_cfg_for_hf(model: MusicgenForConditionalGeneration, **options: Any) -> str:
    """`make_audiocraft_xp_cfg` with the sizes of a transformers MusicGen decoder (stereo if it has 2 channels)."""
    decoder = model.decoder.config
    if decoder.ffn_dim % decoder.hidden_size:
        raise ValueError(f"ffn_dim={decoder.ffn_dim} is not a multiple of hidden_size={decoder.hidden_size}")
    options.setdefault("stereo", decoder.audio_channels == 2)
    return make_audiocraft_xp_cfg(dim=decoder.hidden_size, num_heads=decoder.num_attention_heads,
                                  num_layers=decoder.num_hidden_layers, n_q=decoder.num_codebooks,
                                  card=decoder.vocab_size, hidden_scale=decoder.ffn_dim // decoder.hidden_size,
                                  **options)


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """`cfg[a][b] = value` for key 'a.b' (creating mappings on the way); `REMOVE` deletes the key instead."""
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    if value is REMOVE:
        node.pop(leaf, None)
    else:
        node[leaf] = copy.deepcopy(value)


def _composed_config(*, dim: int, num_heads: int, num_layers: int, n_q: int, card: int, t5_name: str | None,
                     sample_rate: int, segment_duration: float, family: dict[str, Any], stereo: bool,
                     hidden_scale: int) -> dict[str, Any]:
    """Key for key the composed hydra config (top-level order as OmegaConf.to_yaml writes it)."""
    per_channel = n_q // 2 if stereo else n_q
    delays = [q for q in range(per_channel) for _ in range(2 if stereo else 1)]
    schedule = family["schedule"]
    return {
        "device": "cuda", "dtype": "float32", "autocast": False, "autocast_dtype": "float16", "seed": 2036,
        "show": False, "continue_from": None, "execute_only": None, "execute_inplace": False,
        "benchmark_no_load": False, "efficient_attention_backend": "torch", "num_threads": 1,
        "mp_start_method": "forkserver", "label": None,
        "logging": {"level": "INFO", "log_updates": 10, "log_tensorboard": True, "log_wandb": False},
        "tensorboard": {"with_media_logging": False, "name": None, "sub_dir": None},
        "wandb": {"with_media_logging": True, "project": None, "name": None, "group": None},
        "slurm": {"gpus": 4, "mem_per_gpu": 40, "time": 3600, "constraint": None, "partition": None,
                  "comment": None, "setup": [], "exclude": ""},
        "dora": {"dir": "/checkpoint/${oc.env:USER}/experiments/audiocraft/outputs",
                 "exclude": ["device", "wandb.*", "tensorboard.*", "logging.*", "dataset.num_workers",
                             "eval.num_workers", "special.*", "metrics.visqol.bin", "metrics.fad.bin",
                             "execute_only", "execute_best", "generate.every", "optim.eager_sync", "profiler.*",
                             "deadlock.*", "efficient_attention_backend", "num_threads", "mp_start_method"],
                 "use_rendezvous": False, "git_save": True},
        "datasource": dict(family["datasource"]),
        "solver": family["solver"],
        "fsdp": {"use": True, "param_dtype": "float16", "reduce_dtype": "float32", "buffer_dtype": "float32",
                 "sharding_strategy": "shard_grad_op", "per_block": True},
        "profiler": {"enabled": False},
        "deadlock": {"use": True, "timeout": 600},
        "dataset": {"batch_size": 4, "num_workers": 2, "segment_duration": segment_duration, "num_samples": None,
                    "return_info": True, "shuffle": False, "sample_on_duration": False, "sample_on_weight": False,
                    "min_segment_ratio": family["min_segment_ratio"], "train": dict(family["train"]),
                    "valid": {"num_samples": 16}, "evaluate": {"num_samples": 16},
                    "generate": {"num_samples": 4, "return_info": True}, **family["dataset_extra"]},
        "checkpoint": {"save_last": True, "save_every": 50, "keep_last": 10, "keep_every_states": None},
        "generate": {"every": 25, "path": "samples",
                     "audio": {"format": "wav", "strategy": "loudness", "sample_rate": "${sample_rate}",
                               "loudness_headroom_db": 14},
                     "lm": {"use_sampling": True, "temp": 1.0, "top_k": 250, "top_p": 0.0, "prompted_samples": True,
                            "unprompted_samples": True, "no_text_conditioning": False, "gen_gt_samples": False,
                            "prompt_duration": None, "gen_duration": None, "remove_prompts": False},
                     "num_workers": 5},
        "evaluate": {"every": 25, "num_workers": 5, "truncate_audio": None, "fixed_generation_duration": None,
                     "metrics": {"base": False, "fad": False, "kld": False, "text_consistency": False,
                                 "chroma_cosine": False}},
        "optim": {**family["optim"], "updates_per_epoch": 2000,
                  "adam": {"betas": [0.9, 0.95], "weight_decay": 0.1, "eps": 1.0e-08},
                  "ema": {"use": True, "updates": 10, "device": "cuda", "decay": 0.99},
                  "max_norm": 1.0, "eager_sync": True},
        "schedule": {"lr_scheduler": schedule["lr_scheduler"], "step": {"step_size": None, "gamma": None},
                     "exponential": {"lr_decay": None},
                     "cosine": {"warmup": schedule["cosine_warmup"], "lr_min_ratio": 0.0, "cycle_length": 1.0},
                     "polynomial_decay": {"warmup": None, "zero_lr_warmup_steps": 0, "end_lr": 0.0, "power": 1},
                     "inverse_sqrt": {"warmup": schedule["inverse_sqrt_warmup"], "warmup_init_lr": 0.0},
                     "linear_warmup": {"warmup": None, "warmup_init_lr": 0.0}},
        "classifier_free_guidance": {"training_dropout": family["cfg_dropout"], "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, "sum": [], "prepend": [],
                  "cross": ["description"], "input_interpolate": []},
        "conditioners": {"description": {"model": "t5", "t5": {
            "name": t5_name or family["t5_name"], "finetune": False, "word_dropout": family["word_dropout"],
            "normalize_text": False}}},
        "sample_rate": sample_rate,
        "channels": 2 if stereo else 1,
        "compression_model_checkpoint": family["compression_model_checkpoint"],
        "compression_model_n_q": None,
        "tokens": {"padding_with_special_token": False},
        "interleave_stereo_codebooks": {"use": stereo, "per_timestep": False},
        "cache": {"path": None, "write": False, "write_shard": 0, "write_num_shards": 1},
        "metrics": {
            "fad": {"use_gt": False, "model": "tf",
                    "tf": {"bin": None, "model_path": "//reference/fad/vggish_model.ckpt"}},
            "kld": {"use_gt": False, "model": "passt", "passt": {"pretrained_length": 20}},
            "text_consistency": {"use_gt": False, "model": "clap", "clap": {
                "model_path": "//reference/clap/music_audioset_epoch_15_esc_90.14.pt", "model_arch": "HTSAT-base",
                "enable_fusion": False}},
            "chroma_cosine": {"use_gt": False, "model": "chroma_base", "chroma_base": {
                "sample_rate": "${sample_rate}", "n_chroma": 12, "radix2_exp": 14, "argmax": True}}},
        "lm_model": "transformer_lm",
        "codebooks_pattern": {
            "modeling": "delay",
            "delay": {"delays": delays, "flatten_first": 0, "empty_initial": 0},
            # unused by the delay pattern; literal copies of model/lm/*_lm.yaml whatever n_q is
            "unroll": {"flattening": [0, 1, 2, 3], "delays": [0, 0, 0, 0]},
            "music_lm": {"group_by": 2},
            "coarse_first": {"delays": [0, 0, 0]}},
        "transformer_lm": {
            "dim": dim, "num_heads": num_heads, "num_layers": num_layers, "hidden_scale": hidden_scale, "n_q": n_q,
            "card": card, "dropout": 0.0, "emb_lr": None, "activation": "gelu", "norm_first": True,
            "bias_ff": False, "bias_attn": False, "bias_proj": False, "past_context": None, "causal": True,
            "custom": False, "memory_efficient": True, "attention_as_float32": False, "layer_scale": None,
            "positional_embedding": "sin", "xpos": False, "checkpointing": "none", "weight_init": "gaussian",
            "depthwise_init": "current", "zero_bias_init": True, "norm": "layer_norm", "cross_attention": False,
            "qk_layer_norm": False, "qk_layer_norm_cross": False, "attention_dropout": None, "kv_repeat": 1,
            "two_step_cfg": False},
    }


def random_hf_musicgen(seed: int = 0, **options: Any) -> MusicgenForConditionalGeneration:
    """`tests.hf_fixture.tiny_hf_musicgen` (T5 matching `audiogen.scratch.word_tokenizer`, text width 32, decoder
    width 64, 2 layers, 4 heads, 64 codes) whose decoder weights are all distinct random values, LayerNorms too,
    so that swapping two norms or two projections in a key mapping changes the numbers."""
    model, _ = tiny_hf_musicgen(seed, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not name.startswith(("text_encoder.", "audio_encoder.")):
                    parameter.normal_(0.0, 0.5 if "norm" in name else 0.2)
    return model


def audiocraft_state_from_hf(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """audiocraft `LMModel.state_dict()` of a transformers `MusicgenForConditionalGeneration` (weights shared)."""
    hf = {k: v.detach() for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = OrderedDict()
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return hf[key]

    decoder = model.decoder.config
    for k in range(decoder.num_codebooks):
        state[f"emb.{k}.weight"] = take(f"{HF_DECODER}embed_tokens.{k}.weight")
    for i in range(decoder.num_hidden_layers):
        hf_layer, layer = f"{HF_DECODER}layers.{i}.", f"transformer.layers.{i}."
        for hf_attn, attn in FUSED_ATTENTION.items():
            state[f"{layer}{attn}.in_proj_weight"] = torch.cat(
                [take(f"{hf_layer}{hf_attn}.{p}_proj.weight") for p in ("q", "k", "v")], dim=0)
        for hf_module, module in LAYER_MODULES.items():
            for kind in ("weight", "bias"):
                if f"{hf_layer}{hf_module}.{kind}" in hf:
                    state[f"{layer}{module}.{kind}"] = take(f"{hf_layer}{hf_module}.{kind}")
    for kind in ("weight", "bias"):
        state[f"out_norm.{kind}"] = take(f"{HF_DECODER}layer_norm.{kind}")
    for k in range(decoder.num_codebooks):
        state[f"linears.{k}.weight"] = take(f"{HF_HEADS}{k}.weight")
    for kind in ("weight", "bias"):
        state[f"{TEXT_PROJ}.{kind}"] = take(f"enc_to_dec_proj.{kind}")
    leftover = sorted(k for k in hf if k not in used and not k.startswith(("text_encoder.", "audio_encoder.")))
    if leftover:
        raise ValueError(f"transformers keys without an audiocraft name: {leftover}")
    return state


def write_audiocraft_lm(directory: str | Path, hf_musicgen_model: torch.nn.Module, *, xp_cfg: str,
                        dtype: torch.dtype = torch.float16, nest_model: bool = False) -> Path:
    """Write `directory/state_dict.bin` as audiocraft's export_lm does (nested like a training checkpoint if asked)."""
    state = OrderedDict((k, v.to(dtype).clone()) for k, v in audiocraft_state_from_hf(hf_musicgen_model).items())
    package = {"best_state": {"model": state} if nest_model else state, "xp.cfg": xp_cfg, "version": "1.3.0",
               "exported": True}
    path = Path(directory) / "state_dict.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(package, path)
    return path

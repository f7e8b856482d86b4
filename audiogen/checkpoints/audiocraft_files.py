"""What audiocraft's two exported files have in common: the pickled package, its `xp.cfg` and its weights.

`state_dict.bin` (the LM, `audiogen.checkpoints.audiocraft`) and `compression_state_dict.bin` (the EnCodec,
`audiogen.checkpoints.audiocraft_codec`) are both written by `audiocraft/utils/export.py` as
`{'xp.cfg': <hydra config as YAML>, 'best_state': <state dict>, 'version': ..., 'exported': True}`; training
checkpoints nest the weights as `best_state['model']` and FSDP runs keep them in `fsdp_best_state`.

`xp.cfg` is read as plain data. OmegaConf leaves `${...}` interpolations unresolved when it writes the YAML, so
`get_value` resolves them when a value is read: absolute (`${sample_rate}`), relative (`${.b}`, `${..b}`) and
embedded in a longer string (`/x/${a.b}/y`), inside mappings and lists too. Resolver calls (`${oc.env:USER}`),
dangling references, cycles and OmegaConf's mandatory-missing marker `???` are reported by key.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from audiogen.errors import CheckpointError, MissingCheckpointFileError

STATE_KEYS = ("fsdp_best_state", "best_state")  # in order of preference, as audiocraft's export_lm
MANDATORY_MISSING = "???"

_REFERENCE = re.compile(r"\$\{([^}]*)\}")
_ABSENT = object()


# ---------------------------------------------------------------------------------------------------- the file
def resolve_file(path: str | os.PathLike[str], name: str, layout_help: str) -> Path:
    """The checkpoint file: `path` itself when it is a file (or names a .bin), else `path/name`."""
    path = Path(path).expanduser()
    file = path if path.is_file() or path.suffix == ".bin" else path / name
    if not file.is_file():
        raise MissingCheckpointFileError(f"{file} is missing: {layout_help}")
    return file


def load_package(file: Path, *, export_function: str, layout_help: str,
                 required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Unpickle an audiocraft export with `weights_only=True`: a checkpoint is data, and must not be able to run
    code when opened. `export_function` names the audiocraft.utils.export function that makes a loadable file from
    a training checkpoint; `required` are entries the package must have."""
    try:
        package = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{file} holds objects other than tensors and plain containers, so it cannot be loaded safely "
            f"(weights_only=True). Audiocraft training checkpoints pickle an OmegaConf object as xp.cfg: export them "
            f"first with audiocraft.utils.export.{export_function}. Detail: {error}") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{file} is not a readable torch checkpoint: {error}") from error
    if not isinstance(package, dict):
        raise CheckpointError(f"{file} holds a {type(package).__name__}, expected the dict that audiocraft's "
                              f"{export_function} writes: {layout_help}")
    for entry in required:
        if entry not in package:
            raise CheckpointError(f"{file} has no {entry!r} entry (found {sorted(map(str, package))[:20]}), so it is "
                                  f"not what audiocraft's {export_function} writes: {layout_help}")
    return package


def parse_xp_cfg(raw: Any, origin: str | os.PathLike[str]) -> dict[str, Any]:
    """`xp.cfg` is the YAML that OmegaConf.to_yaml wrote (an already-parsed mapping is accepted too)."""
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise CheckpointError(f"xp.cfg in {origin} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise CheckpointError(f"xp.cfg in {origin} is a {type(raw).__name__}, expected a YAML mapping")
    return raw


def select_best_state(package: dict[str, Any], origin: str | os.PathLike[str],
                      layout_help: str) -> dict[str, torch.Tensor]:
    """The flat model weights, wherever audiocraft put them (a shallow copy: callers may pop and rename).

    Exported files hold a flat `best_state`; training checkpoints nest it as `best_state['model']`, and FSDP runs
    keep the full weights in `fsdp_best_state` (preferred when non-empty, as audiocraft's export_lm does).
    """
    for name in STATE_KEYS:
        state = package.get(name)
        if state:
            break
    else:
        raise CheckpointError(f"{origin} has no non-empty 'best_state' (or 'fsdp_best_state'): {layout_help}")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{name} in {origin} is a {type(state).__name__}, expected a state dict")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name} in {origin} is not a flat state dict of tensors: {key!r} is a "
                                  f"{type(value).__name__}")
    return dict(state)


# ---------------------------------------------------------------------------------------------------- xp.cfg
def get_value(xp_cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    """`xp_cfg['a']['b']` for key 'a.b' (`default` when absent), with OmegaConf interpolations resolved."""
    node = _lookup(xp_cfg, key)
    return default if node is _ABSENT else _resolve(xp_cfg, node, key, (key,))


def require_value(xp_cfg: dict[str, Any], key: str, needed_for: str) -> Any:
    """Like `get_value`, but absent or null is an error saying what the value is needed for."""
    value = get_value(xp_cfg, key)
    if value is None:
        raise CheckpointError(f"xp.cfg has no {key}, which is needed {needed_for}")
    return value


def unsupported(key: str, value: Any, why: str, *, by: str = "") -> CheckpointError:
    """The error for an xp.cfg option that cannot be reproduced; `by` names what cannot (' by ...')."""
    return CheckpointError(f"xp.cfg {key}={value!r} is not supported{by}: {why}")


def _lookup(xp_cfg: dict[str, Any], key: str) -> Any:
    node: Any = xp_cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _resolve(xp_cfg: dict[str, Any], value: Any, key: str, chain: tuple[str, ...]) -> Any:
    """`value` (found at `key`) with every interpolation replaced; `chain` is the keys being resolved, so that a
    reference back into it is reported as a cycle instead of recursing forever."""
    if isinstance(value, dict):
        return {k: _resolve(xp_cfg, v, f"{key}.{k}", (*chain, f"{key}.{k}")) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(xp_cfg, v, key, chain) for v in value]
    if value == MANDATORY_MISSING:
        raise CheckpointError(f"xp.cfg {key} is unset ({MANDATORY_MISSING!r}, a value the run never received)")
    if not isinstance(value, str) or "${" not in value:
        return value
    if whole := _REFERENCE.fullmatch(value):
        return _follow(xp_cfg, whole.group(1), key, chain)
    return _REFERENCE.sub(lambda m: str(_follow(xp_cfg, m.group(1), key, chain)), value)


def _follow(xp_cfg: dict[str, Any], reference: str, key: str, chain: tuple[str, ...]) -> Any:
    """The resolved value an interpolation points at: absolute (`a.b`) or relative to `key`'s parent (`.b`)."""
    if ":" in reference:
        raise CheckpointError(f"xp.cfg {key}: resolver interpolation ${{{reference}}} is not supported")
    target = reference
    if reference.startswith("."):
        dots = len(reference) - len(reference.lstrip("."))
        target = ".".join(key.split(".")[:-dots] + [reference[dots:]])
    if target in chain:
        raise CheckpointError(f"xp.cfg interpolation cycle: {' -> '.join((*chain, target))}")
    node = _lookup(xp_cfg, target)
    if node is _ABSENT:
        raise CheckpointError(f"xp.cfg {key}: interpolation ${{{reference}}} points at a missing key")
    return _resolve(xp_cfg, node, target, (*chain, target))

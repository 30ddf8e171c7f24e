"""Native checkpoints: the parameter pytree as an orbax checkpoint, with the HF side files.

Layout of a native checkpoint directory (written by `scripts/convert_checkpoint.py`):

    pijax_checkpoint.json    marker: format, version, dtype, and every parameter's shape
    params/                  orbax `StandardCheckpointer` checkpoint of the params (a pure dict)
    config.json              HF-style model config (what `ModelConfig.from_hf_dict` reads)
    generation_config.json   eos ids
    tokenizer.json           when the model has one (else config.json says `pijax_tokenizer`)

Restoring hands orbax an abstract tree whose leaves carry the target `NamedSharding`, so each
process reads only the chunks its devices hold and places them directly; the full array is never
built on the host. Orbax casts to the requested dtype while reading. The shapes in the marker are
checked first, so a checkpoint that does not match its config fails naming the parameter rather
than deep inside orbax.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from pijax.config import DType
from pijax.model.hf_io import CheckpointError, path_names, read_json

MARKER_FILE = "pijax_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "pijax-orbax-params"
VERSION = 1


def is_native_checkpoint(ckpt_dir: Path) -> bool:
    return (ckpt_dir / MARKER_FILE).is_file()


def _dotted(path) -> str:
    return ".".join(str(n) for n in path_names(path))


def save_params(params: nnx.State, out_dir: Path, dtype: DType) -> None:
    """Write `params` with orbax under `out_dir/params`, then the marker (last: its presence
    means the checkpoint is complete)."""
    params_dir = (out_dir / PARAMS_DIR).resolve()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, nnx.to_pure_dict(params))
        ckptr.wait_until_finished()
    shapes = {
        _dotted(p): list(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    marker = {"format": FORMAT, "version": VERSION, "dtype": dtype.value, "params": shapes}
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _check_marker(ckpt_dir: Path, abstract: nnx.State) -> None:
    path = ckpt_dir / MARKER_FILE
    marker = read_json(path)
    if marker.get("format") != FORMAT or marker.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: format={marker.get('format')!r} version={marker.get('version')!r} is not "
            f"supported; allowed: format={FORMAT!r} version={VERSION}"
        )
    saved = marker.get("params")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: field 'params' must map parameter names to shapes")
    expected = {
        _dotted(p): list(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(abstract)
    }
    for name, shape in expected.items():
        if name not in saved:
            raise CheckpointError(f"{path}: parameter {name!r} is missing")
        if saved[name] != shape:
            raise CheckpointError(
                f"{path}: parameter {name!r} has shape {saved[name]}; expected {shape} from "
                "config.json"
            )
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise CheckpointError(
            f"{path}: parameters {extra[:4]} are not in the model config.json describes"
        )


def restore_params(ckpt_dir: Path, abstract: nnx.State, shardings: nnx.State) -> nnx.State:
    """Restore the params of a native checkpoint, each shard placed directly on its device.

    `abstract` gives shapes and the dtype to restore in; `shardings` (same structure) the
    `NamedSharding` of each leaf.
    """
    _check_marker(ckpt_dir, abstract)
    params_dir = (ckpt_dir / PARAMS_DIR).resolve()
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: orbax params directory not found")
    target = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract,
        shardings,
    )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params_dir, nnx.to_pure_dict(target))
    except Exception as e:  # orbax and tensorstore raise many types; all mean "unreadable"
        raise CheckpointError(f"{params_dir}: cannot restore orbax checkpoint: {e}") from e
    nnx.replace_by_pure_dict(target, restored)
    return target

"""Hugging Face checkpoint directories: read and write `config.json`, `generation_config.json` and
safetensors weights.

Parameter names: an nnx path such as `layers/0/self_attn/q_proj/kernel` is the HF tensor
`model.layers.0.self_attn.q_proj.weight`. HF linear weights are `[out, in]`; the NNX kernels are
`[in, out]`, so kernels are transposed on the way in and out. `lm_head` has no `model.` prefix.

Reading never builds a model: the loader gives the abstract parameter tree (shapes, dtypes,
shardings) and each tensor is read with safetensors' numpy API, checked, cast on the host, and
placed straight onto its devices. Every failure is a `CheckpointError` naming the file and the
field or tensor at fault.

This module knows nothing of tokenizers beyond copying `tokenizer.json`, nor of orbax.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from pijax.config import ConfigError, DType, ModelConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
# A config.json field of ours: the checkpoint uses `ByteTokenizer` and has no tokenizer.json.
TOKENIZER_KIND_FIELD = "pijax_tokenizer"

# Tensors that some checkpoints carry and the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match its config; names the file."""


# --- JSON side files ---------------------------------------------------------------------------


def read_json(path: Path, *, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: file not found")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def normalize_hf_config(cfg: dict) -> dict:
    """Map transformers>=5 `rope_parameters` back to `rope_theta` + `rope_scaling`.

    transformers 5 writes `rope_parameters: {rope_type, rope_theta, factor, ...}` and no top-level
    `rope_theta` or `rope_scaling`; published checkpoints use the older fields. `ModelConfig` reads
    the older ones, so fold the new form into them (the older fields win when both are present).
    """
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return cfg
    if any(isinstance(v, dict) for v in rp.values()):
        raise ConfigError(
            "rope_parameters per layer type is not supported; allowed: one rope_parameters dict"
        )
    cfg = dict(cfg)
    if cfg.get("rope_theta") is None and rp.get("rope_theta") is not None:
        cfg["rope_theta"] = rp["rope_theta"]
    rope_type = rp.get("rope_type", rp.get("type"))
    if cfg.get("rope_scaling") is None and rope_type not in (None, "default"):
        cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return cfg


def model_config_from_dict(cfg: dict, source: str) -> ModelConfig:
    """`ModelConfig.from_hf_dict`, with every failure a `CheckpointError` naming `source`."""
    try:
        return ModelConfig.from_hf_dict(normalize_hf_config(cfg), source=source)
    except ConfigError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(source) else f"{source}: {msg}") from e
    except (KeyError, TypeError, ValueError) as e:
        # A field of the wrong type, or a rope_scaling dict missing a key.
        raise CheckpointError(f"{source}: invalid field: {type(e).__name__}: {e}") from e


def read_model_config(ckpt_dir: Path) -> tuple[ModelConfig, dict]:
    """(`ModelConfig`, raw dict) from `ckpt_dir/config.json`."""
    path = ckpt_dir / CONFIG_FILE
    raw = read_json(path)
    return model_config_from_dict(raw, str(path)), raw


def read_eos_token_ids(ckpt_dir: Path, cfg: ModelConfig) -> tuple[int, ...]:
    """EOS ids from `generation_config.json` when present (what HF `generate` stops on), else the
    model config's."""
    path = ckpt_dir / GENERATION_CONFIG_FILE
    gen = read_json(path, required=False)
    if gen is None or gen.get("eos_token_id") is None:
        return cfg.eos_token_ids
    eos = gen["eos_token_id"]
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i for i in ids):
        raise CheckpointError(f"{path}: eos_token_id must be an id or a list of ids; got {eos!r}")
    return tuple(ids)


# --- names -------------------------------------------------------------------------------------


def path_names(path) -> tuple:
    """Parameter names of a pytree path into an `nnx.State`, without the trailing `.value`."""
    names = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "weight": "weight", "bias": "bias"}


def hf_tensor_name(names: tuple) -> tuple[str, bool]:
    """(HF tensor name, whether the HF tensor is the transpose) of an nnx parameter path."""
    *module, leaf = (str(n) for n in names)
    if leaf not in _LEAF_TO_HF:
        raise CheckpointError(f"parameter {'.'.join(map(str, names))} has no HF name")
    prefix = [] if module[:1] == ["lm_head"] else ["model"]
    return ".".join([*prefix, *module, _LEAF_TO_HF[leaf]]), leaf == "kernel"


# --- reading safetensors -----------------------------------------------------------------------


class SafetensorsReader:
    """Tensors of a checkpoint directory by HF name, from one file or an index of shards.

    Use as a context manager; each file is opened once and released on exit.
    """

    def __init__(self, ckpt_dir: Path):
        self.dir = ckpt_dir
        self._handles: dict[str, Any] = {}  # file name -> safetensors handle (memory-mapped)
        self.weight_map = self._weight_map()  # HF name -> file name

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()  # safetensors unmaps a file when its handle is released

    def _weight_map(self) -> dict[str, str]:
        index_path = self.dir / SAFETENSORS_INDEX_FILE
        if index_path.is_file():
            index = read_json(index_path)
            wm = index.get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(
                    f"{index_path}: field 'weight_map' must map tensor names to file names"
                )
            for fname in sorted(set(wm.values())):
                if not (self.dir / fname).is_file():
                    raise CheckpointError(
                        f"{self.dir / fname}: file not found (listed in {index_path})"
                    )
            return dict(wm)
        single = self.dir / SAFETENSORS_FILE
        files = [single] if single.is_file() else sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{self.dir}: no weights found; expected {SAFETENSORS_FILE} or "
                f"{SAFETENSORS_INDEX_FILE} with its shards"
            )
        wm = {}
        for f in files:
            for name in self._open(f.name).keys():
                wm[name] = f.name
        return wm

    def _open(self, fname: str):
        if fname not in self._handles:
            path = self.dir / fname
            try:
                self._handles[fname] = safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
        return self._handles[fname]

    def file_of(self, name: str) -> Path:
        return self.dir / self.weight_map[name]

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        sl = self._open(self.weight_map[name]).get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, name: str) -> np.ndarray:
        fname = self.weight_map[name]
        try:
            return self._open(fname).get_tensor(name)
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.dir / fname}: cannot read tensor {name!r}: {e}") from e

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Part of a tensor (one device's shard): only these bytes are read from the file."""
        fname = self.weight_map[name]
        try:
            return self._open(fname).get_slice(name)[index]
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.dir / fname}: cannot read tensor {name!r}: {e}") from e


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def load_hf_params(
    ckpt_dir: Path, abstract: nnx.State, shardings: nnx.State, dtype: DType
) -> nnx.State:
    """Fill the abstract parameter tree from the directory's safetensors.

    Each tensor is read as numpy, checked against the expected shape, transposed and cast on the
    host, and placed with its `NamedSharding` by `jax.device_put`; at most one tensor is on the
    host at a time. In a multi-host run each process reads only its own devices' slices. Tensors the model does not use (a tied `lm_head.weight`, rotary caches) are
    logged and skipped.
    """
    target = np.dtype(dtype.jnp)
    used: set[str] = set()
    with SafetensorsReader(ckpt_dir) as reader:

        def fill(path, leaf: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.Array:
            name, transposed = hf_tensor_name(path_names(path))
            if name not in reader.weight_map:
                where = (
                    ckpt_dir / SAFETENSORS_INDEX_FILE
                    if (ckpt_dir / SAFETENSORS_INDEX_FILE).is_file()
                    else ckpt_dir
                )
                raise CheckpointError(f"{where}: tensor {name!r} is missing")
            expected = tuple(reversed(leaf.shape)) if transposed else tuple(leaf.shape)
            shape, st_dtype = reader.shape_dtype(name)
            if shape != expected:
                raise CheckpointError(
                    f"{reader.file_of(name)}: tensor {name!r} has shape {list(shape)}; expected "
                    f"{list(expected)} from {CONFIG_FILE}"
                )
            if st_dtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"{reader.file_of(name)}: tensor {name!r} has dtype {st_dtype}; expected one "
                    f"of {list(_FLOAT_DTYPES)}"
                )
            used.add(name)
            if jax.process_count() > 1:
                # Multi-host: each process reads only the slices its own devices hold.
                def shard(index: tuple[slice, ...]) -> np.ndarray:
                    part = reader.read_slice(name, tuple(reversed(index)) if transposed else index)
                    return np.ascontiguousarray(part.T if transposed else part, dtype=target)

                return jax.make_array_from_callback(leaf.shape, sharding, shard)
            host = reader.read(name)
            if transposed:
                host = host.T
            return jax.device_put(np.ascontiguousarray(host, dtype=target), sharding)

        params = jax.tree_util.tree_map_with_path(fill, abstract, shardings)
        unused = sorted(
            n for n in reader.weight_map if n not in used and not n.endswith(_IGNORED_SUFFIXES)
        )
    if unused:
        log.info(
            "%s: %d tensors not used by the model: %s",
            ckpt_dir,
            len(unused),
            ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""),
        )
    return params


# --- writing -----------------------------------------------------------------------------------


def hf_tensors(params: nnx.State, dtype: DType) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array in HF layout) for each parameter, one at a time."""
    target = np.dtype(dtype.jnp)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name, transposed = hf_tensor_name(path_names(path))
        host = np.asarray(jax.device_get(leaf))
        if transposed:
            host = host.T
        yield name, np.ascontiguousarray(host, dtype=target)


def save_hf_checkpoint(
    config: ModelConfig,
    params: nnx.State,
    tokenizer_json_path: str | Path | None,
    out_dir: str | Path,
    dtype: DType | str = DType.FLOAT32,
    *,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write an HF checkpoint directory that `load_model` and transformers both read.

    Writes `config.json`, `generation_config.json` and `model.safetensors` (or, when the weights
    exceed `max_shard_bytes`, `model-0000i-of-0000n.safetensors` shards and their index), with HF
    names and `[out, in]` weights, in `dtype`. `tokenizer_json_path` is copied beside them (with
    its `tokenizer_config.json`, if any); `None` marks the checkpoint as using `ByteTokenizer`.
    Single-process only: parameters are gathered to this host one at a time.
    """
    dtype = DType.parse(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = dtype.value
    if tokenizer_json_path is None:
        hf_config[TOKENIZER_KIND_FIELD] = "byte"
    else:
        src = Path(tokenizer_json_path)
        if not src.is_file():
            raise CheckpointError(f"{src}: file not found (tokenizer_json_path)")
        shutil.copyfile(src, out / TOKENIZER_FILE)
        if (src.parent / TOKENIZER_CONFIG_FILE).is_file():
            shutil.copyfile(src.parent / TOKENIZER_CONFIG_FILE, out / TOKENIZER_CONFIG_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    write_generation_config(out, config)
    _write_safetensors(out, hf_tensors(params, dtype), max_shard_bytes)
    return out


def write_generation_config(out: Path, config: ModelConfig) -> None:
    gen: dict[str, Any] = {"bos_token_id": config.bos_token_id}
    if config.eos_token_ids:
        eos = config.eos_token_ids
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
    (out / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2) + "\n")


def _write_safetensors(
    out: Path, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int | None
) -> None:
    # transformers refuses safetensors files without this metadata.
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(dict(tensors), str(out / SAFETENSORS_FILE), metadata=metadata)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = total = 0
    for name, arr in tensors:
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
        total += arr.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

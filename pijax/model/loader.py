"""Load a model for serving: config, sharded parameters, tokenizer and eos ids, from one of

  * an HF checkpoint directory (`config.json`, `model.safetensors` or shards with their index,
    `tokenizer.json`, `generation_config.json`);
  * a native checkpoint directory (orbax params, written by `convert_checkpoint`; recognized by
    its marker file `pijax_checkpoint.json`);
  * a preset name from `configs/presets/` (random init from `seed`, `ByteTokenizer`).

The model is never materialized with random weights to be overwritten: `nnx.eval_shape` gives the
abstract parameter tree, `pijax.sharding` its shardings, and each leaf is filled by reading its
tensor straight onto its devices. Every failure to load is a `CheckpointError` (a `ValueError`)
naming the file and the field or tensor.

A local directory wins over a preset of the same name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pijax.config import ConfigError, DType, ModelConfig, load_preset, preset_names
from pijax.kernels.dispatch import AttentionImpl
from pijax.model import native
from pijax.model.hf_io import (
    CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TOKENIZER_KIND_FIELD,
    CheckpointError,
    load_hf_params,
    model_config_from_dict,
    read_eos_token_ids,
    read_model_config,
    save_hf_checkpoint,
    write_generation_config,
)
from pijax.model.llama import LOGICAL_AXES, LlamaModel
from pijax.model.tokenizer import ByteTokenizer, Tokenizer
from pijax.sharding import (
    TensorParallelPlan,
    loading_rules,
    param_shardings,
    plan_tensor_parallel,
    replicate_kv_heads,
)

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "convert_checkpoint",
    "load_model",
    "save_hf_checkpoint",
]


@dataclasses.dataclass
class LoadedModel:
    """A model ready for the engine. `params` live on the mesh, sharded per `pijax.sharding`.

    `config` is the checkpoint's. When the mesh's model axis exceeds its kv heads, the graph and
    params run each kv head `kv_head_replicas` times (`mesh_config` is that graph's config, and
    the one the KV pool is laid out by)."""

    config: ModelConfig  # with `eos_token_ids` as below
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Tokenizer | ByteTokenizer
    eos_token_ids: tuple[int, ...]  # generation_config.json if present, else config.json
    kv_head_replicas: int = 1

    @property
    def mesh_config(self) -> ModelConfig:
        if self.kv_head_replicas == 1:
            return self.config
        return dataclasses.replace(
            self.config, num_kv_heads=self.config.num_kv_heads * self.kv_head_replicas
        )

    def model(self) -> LlamaModel:
        """A live module over the same arrays (for `forward_dense`, tests, training)."""
        return nnx.merge(self.graphdef, self.params)


def load_model(
    source: str | Path,
    *,
    dtype: DType | str,
    mesh: Mesh,
    attention_impl: AttentionImpl | str = AttentionImpl.AUTO,
    seed: int = 0,
) -> LoadedModel:
    """Load `source` (checkpoint directory or preset name) onto `mesh` in `dtype`."""
    dtype = DType.parse(dtype)
    impl = AttentionImpl.parse(attention_impl)
    ckpt_dir = _resolve_source(source)
    if ckpt_dir is None:
        return _init_preset(str(source), dtype, mesh, impl, seed)

    cfg, raw = read_model_config(ckpt_dir)
    eos = read_eos_token_ids(ckpt_dir, cfg)
    cfg = dataclasses.replace(cfg, eos_token_ids=eos)
    plan = plan_tensor_parallel(cfg, mesh.shape["model"], str(ckpt_dir / CONFIG_FILE))
    tokenizer = _checkpoint_tokenizer(ckpt_dir, raw, cfg)
    graphdef, abstract = abstract_model(cfg, dtype, impl)
    shardings = param_shardings(abstract, mesh, LOGICAL_AXES, loading_rules(plan))
    if native.is_native_checkpoint(ckpt_dir):
        params = native.restore_params(ckpt_dir, abstract, shardings)
    else:
        params = load_hf_params(ckpt_dir, abstract, shardings, dtype)
    graphdef, params = _on_mesh(cfg, plan, dtype, impl, mesh, graphdef, params)
    return LoadedModel(cfg, graphdef, params, tokenizer, eos, plan.kv_head_replicas)


def _on_mesh(cfg, plan: TensorParallelPlan, dtype, impl, mesh: Mesh, graphdef, params):
    """(graphdef, params) as the mesh runs them: kv heads widened when they are replicated."""
    if plan.kv_head_replicas == 1:
        return graphdef, params
    graphdef, abstract = abstract_model(plan.mesh_config(cfg), dtype, impl)
    target = param_shardings(abstract, mesh, LOGICAL_AXES)
    return graphdef, replicate_kv_heads(params, LOGICAL_AXES, plan, target)


def abstract_model(
    cfg: ModelConfig, dtype: DType, impl: AttentionImpl = AttentionImpl.AUTO
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, parameter tree of `jax.ShapeDtypeStruct`s): no array is allocated."""
    model = nnx.eval_shape(
        lambda: LlamaModel(cfg, dtype=dtype.jnp, attention_impl=impl, rngs=nnx.Rngs(0))
    )
    return nnx.split(model)


def _resolve_source(source: str | Path) -> Path | None:
    """The checkpoint directory, or None for a preset name."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: not a directory; expected a checkpoint directory")
    if str(source) in preset_names():
        return None
    raise CheckpointError(
        f"{source}: no such checkpoint directory, and not a preset; presets: {preset_names()}"
    )


def _checkpoint_tokenizer(
    ckpt_dir: Path, raw_config: dict, cfg: ModelConfig
) -> Tokenizer | ByteTokenizer:
    kind = raw_config.get(TOKENIZER_KIND_FIELD)
    if kind == "byte":
        tok = ByteTokenizer()
        _check_byte_vocab(cfg, ckpt_dir / CONFIG_FILE)
        return tok
    if kind is not None:
        raise CheckpointError(
            f"{ckpt_dir / CONFIG_FILE}: {TOKENIZER_KIND_FIELD}={kind!r} is not supported; "
            "allowed: 'byte' or absent (tokenizer.json)"
        )
    path = ckpt_dir / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        tok = Tokenizer.from_file(
            path, bos_token_id=cfg.bos_token_id, eos_token_ids=cfg.eos_token_ids
        )
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if tok.vocab_size > cfg.vocab_size:
        # Some published checkpoints do this; ids past the embedding are refused per request.
        log.warning(
            "%s: tokenizer has %d tokens but vocab_size=%d; ids >= %d cannot be fed to the model",
            path,
            tok.vocab_size,
            cfg.vocab_size,
            cfg.vocab_size,
        )
    return tok


def _check_byte_vocab(cfg: ModelConfig, source) -> None:
    need = ByteTokenizer().vocab_size
    if cfg.vocab_size < need:
        raise CheckpointError(
            f"{source}: vocab_size={cfg.vocab_size} is too small for the byte tokenizer; "
            f"allowed: >= {need}"
        )


def _init_preset(
    name: str, dtype: DType, mesh: Mesh, impl: AttentionImpl, seed: int
) -> LoadedModel:
    """A random-initialized model from a preset, created directly in its sharding by `jit`."""
    source = f"preset {name!r}"
    try:
        preset = load_preset(name)
    except (ConfigError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: {e}") from e
    model_dict = preset.get("model")
    if not isinstance(model_dict, dict):
        raise CheckpointError(f"{source}: field 'model' must be an HF-style config object")
    kind = preset.get("tokenizer", "byte")
    if kind != "byte":
        raise CheckpointError(f"{source}: tokenizer={kind!r} is not supported; allowed: 'byte'")
    tokenizer = ByteTokenizer()
    cfg = model_config_from_dict(model_dict, source)
    _check_byte_vocab(cfg, source)
    cfg = dataclasses.replace(
        cfg,
        bos_token_id=cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id,
        eos_token_ids=cfg.eos_token_ids or tokenizer.eos_token_ids,
    )
    plan = plan_tensor_parallel(cfg, mesh.shape["model"], source)
    graphdef, _ = abstract_model(cfg, dtype, impl)
    params = _random_init_fn(cfg, dtype, impl, mesh)(jax.random.key(seed))
    graphdef, params = _on_mesh(cfg, plan, dtype, impl, mesh, graphdef, params)
    return LoadedModel(cfg, graphdef, params, tokenizer, cfg.eos_token_ids, plan.kv_head_replicas)


@functools.lru_cache(maxsize=4)
def _random_init_fn(cfg: ModelConfig, dtype: DType, impl: AttentionImpl, mesh: Mesh):
    """The jitted initializer, compiled once per model and mesh (compiling threefry for every
    parameter takes seconds; the seed is an argument so other seeds reuse it). Each parameter is
    created directly in its sharding."""
    _, abstract = abstract_model(cfg, dtype, impl)

    def init(key: jax.Array) -> nnx.State:
        return nnx.state(LlamaModel(cfg, dtype=dtype.jnp, attention_impl=impl, rngs=nnx.Rngs(key)))

    rules = loading_rules(plan_tensor_parallel(cfg, mesh.shape["model"]))
    return jax.jit(init, out_shardings=param_shardings(abstract, mesh, LOGICAL_AXES, rules))


# --- conversion to a native checkpoint -----------------------------------------------------------


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    dtype: DType | str = DType.BFLOAT16,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `source` (any source `load_model` reads) as a native orbax checkpoint in `output`.

    The parameters pass through host (CPU) memory only; the accelerator is not used. `overwrite`
    replaces an existing native checkpoint, never any other directory.
    """
    dtype = DType.parse(dtype)
    out = Path(output).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not native.is_native_checkpoint(out):
            raise CheckpointError(
                f"{out}: output exists, is not empty and is not a native "
                "checkpoint; allowed: a new or empty directory"
            )
        if not overwrite:
            raise CheckpointError(
                f"{out}: a native checkpoint exists; pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(out)
    loaded = load_model(
        source, dtype=dtype, mesh=_host_mesh(), attention_impl=AttentionImpl.REFERENCE
    )
    out.mkdir(parents=True, exist_ok=True)
    hf_config = loaded.config.to_hf_dict()
    hf_config["torch_dtype"] = dtype.value
    if isinstance(loaded.tokenizer, ByteTokenizer):
        hf_config[TOKENIZER_KIND_FIELD] = "byte"
    else:
        src_dir = Path(source).expanduser()
        for fname in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
            if (src_dir / fname).is_file():
                shutil.copyfile(src_dir / fname, out / fname)
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    write_generation_config(out, loaded.config)
    native.save_params(loaded.params, out, dtype)
    return out


def _host_mesh() -> Mesh:
    try:
        device = jax.devices("cpu")[0]
    except RuntimeError:  # a JAX built or configured without the CPU backend
        device = jax.devices()[0]
    return Mesh(np.asarray([[device]]), ("data", "model"))

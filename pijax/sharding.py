"""Mesh construction and the one table that maps logical axis names to mesh axes.

Mesh axes are (`data`, `model`). Tensor parallelism shards attention heads, kv heads and the MLP
hidden dimension on `model`; the KV pool is sharded on its kv-head axis the same way
(`kv_pool.pool_sharding`), so each device holds the pages of the heads it computes.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pijax.config import ConfigError, ModelConfig
from pijax.model.llama import LOGICAL_AXES

LOGICAL_TO_MESH: dict[str, str | None] = {
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": None,  # logits are small (last token per sequence); replicate the vocab
    "embed": None,
}


def make_mesh(shape: tuple[int, int], cfg: ModelConfig | None = None) -> Mesh:
    data, model = shape
    devices = jax.devices()
    if data * model > len(devices):
        raise ConfigError(
            f"mesh_shape={shape} needs {data * model} devices; {len(devices)} available"
        )
    if cfg is not None and cfg.num_kv_heads % model:
        raise ConfigError(
            f"mesh_shape model axis={model} must divide num_kv_heads={cfg.num_kv_heads}"
        )
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, ("data", "model"))


def param_spec(path: tuple, ndim: int) -> PartitionSpec:
    names = tuple(str(p) for p in path[-2:])
    logical = LOGICAL_AXES.get(names)
    if logical is None or len(logical) != ndim:
        return PartitionSpec()
    return PartitionSpec(*(LOGICAL_TO_MESH[a] if a else None for a in logical))


def _names(path) -> tuple:
    """Parameter names of a pytree path, without the trailing `.value` of nnx Variables."""
    names = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def param_shardings(state: nnx.State, mesh: Mesh):
    """A pytree of `NamedSharding`s with the structure of `state`, by parameter path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, param_spec(_names(path), leaf.ndim)), state
    )


def shard_params(state: nnx.State, mesh: Mesh) -> nnx.State:
    return jax.device_put(state, param_shardings(state, mesh))

"""Mesh construction and the mapping from a model's logical axes to mesh axes.

Mesh axes are (`data`, `model`). A model family declares, for each of its parameters, the logical
name of every dimension (`heads`, `kv_heads`, `mlp`, `vocab`, `embed`, or None) in a table keyed by
the last two names of the parameter's path, and hands that table in; this module knows no model
family. `LOGICAL_TO_MESH` maps logical names to mesh axes.

Tensor parallelism (`model` axis of size M) shards query heads, kv heads, the MLP hidden dimension
and the vocabulary (embedding rows and LM-head columns; the step gathers the logits once, for
sampling). When M exceeds the checkpoint's K kv heads, each kv head is replicated over M/K
devices, as vLLM does: the kv projections are widened to M heads by repeating each head's columns
M/K times (`replicate_kv_heads`), so the graph runs M kv heads, each device computes and caches
exactly one, and the KV pool (`kv_pool.pool_sharding`) and the kernels' `shard_map` see an
ordinary head-sharded layout. Repeating (not tiling) keeps query head h on its kv head
h // (H/K): with H/M query heads per device, device j holds query heads of kv head j // (M/K),
the copy it caches. The cost is the replicated pages: the pool holds M/K copies of each kv head,
one per device, which is what a device would hold anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pijax.config import ConfigError, ModelConfig

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Logical axis -> mesh axis. A dimension whose size the mesh axis does not divide is replicated
# (`param_spec`), so a vocabulary of 32,001 rows stays whole rather than failing to place.
LOGICAL_TO_MESH: dict[str, str | None] = {
    "heads": MODEL_AXIS,
    "kv_heads": MODEL_AXIS,
    "mlp": MODEL_AXIS,
    "vocab": MODEL_AXIS,
    "embed": None,
}

# A model family's table: (parent name, parameter name) -> logical name per dimension.
LogicalAxes = Mapping[tuple[str, str], tuple[str | None, ...]]


@dataclasses.dataclass(frozen=True)
class TensorParallelPlan:
    """How a model's heads fall on a `model` axis of `model_axis` devices."""

    model_axis: int
    num_kv_heads: int  # the checkpoint's
    kv_head_replicas: int  # devices per kv head (1 unless model_axis > num_kv_heads)

    @property
    def kv_heads_on_mesh(self) -> int:
        """kv heads the graph runs and the pool stores (each replica counted)."""
        return self.num_kv_heads * self.kv_head_replicas

    def mesh_config(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` as the graph on this mesh runs it: kv heads widened to `kv_heads_on_mesh`."""
        if self.kv_head_replicas == 1:
            return cfg
        return dataclasses.replace(cfg, num_kv_heads=self.kv_heads_on_mesh)


def plan_tensor_parallel(
    cfg: ModelConfig, model_axis: int, source: str = "model"
) -> TensorParallelPlan:
    """Check that `cfg` can be split over `model_axis` devices; say how the kv heads fall.

    Allowed: the model axis divides the query heads and the MLP hidden size, and either divides
    the kv heads (each device holds K/M of them) or is a multiple of them (each kv head is
    replicated over M/K devices).
    """
    m, k = model_axis, cfg.num_kv_heads
    for field, size in (
        ("num_attention_heads", cfg.num_heads),
        ("intermediate_size", cfg.intermediate_size),
    ):
        if size % m:
            raise ConfigError(
                f"{source}: {field}={size} is not divisible by the mesh's model axis ({m}); "
                "allowed: a mesh model axis that divides it"
            )
    if k % m and m % k:
        raise ConfigError(
            f"{source}: num_key_value_heads={k} and the mesh's model axis ({m}) must divide one "
            f"another (kv heads are split when the axis divides them, replicated when they divide "
            f"the axis); allowed model axes up to {cfg.num_heads}: "
            f"{[d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0 and (k % d == 0 or d % k == 0)]}"
        )
    return TensorParallelPlan(m, k, max(1, m // k))


def make_mesh(shape: tuple[int, int], cfg: ModelConfig | None = None) -> Mesh:
    """A (`data`, `model`) mesh over the first data*model devices (of every process)."""
    data, model = shape
    devices = jax.devices()
    if data * model > len(devices):
        raise ConfigError(
            f"mesh_shape={shape} needs {data * model} devices; {len(devices)} available"
        )
    if cfg is not None:
        plan_tensor_parallel(cfg, model, "mesh_shape")
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def _names(path) -> tuple:
    """Parameter names of a pytree path, without the trailing `.value` of nnx Variables."""
    names = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def _logical(path, ndim: int, logical_axes: LogicalAxes) -> tuple[str | None, ...] | None:
    names = tuple(str(p) for p in _names(path)[-2:])
    logical = logical_axes.get(names)
    return logical if logical is not None and len(logical) == ndim else None


def param_spec(
    logical: tuple[str | None, ...] | None,
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: Mapping[str, str | None] = LOGICAL_TO_MESH,
) -> PartitionSpec:
    """The spec of one parameter: each named dimension on its mesh axis if that axis divides it."""
    if logical is None:
        return PartitionSpec()
    axes = []
    for name, size in zip(logical, shape, strict=True):
        axis = rules.get(name) if name else None
        axes.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
    return PartitionSpec(*axes)


def param_shardings(
    state: nnx.State,
    mesh: Mesh,
    logical_axes: LogicalAxes,
    rules: Mapping[str, str | None] = LOGICAL_TO_MESH,
):
    """A pytree of `NamedSharding`s with the structure of `state`, by parameter path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh, param_spec(_logical(path, leaf.ndim, logical_axes), leaf.shape, mesh, rules)
        ),
        state,
    )


def loading_rules(plan: TensorParallelPlan) -> dict[str, str | None]:
    """Rules for the checkpoint-shaped tree: kv heads to be replicated load whole on each device
    (they are small: K x head_dim columns) and are widened by `replicate_kv_heads`."""
    if plan.kv_head_replicas == 1:
        return dict(LOGICAL_TO_MESH)
    return {**LOGICAL_TO_MESH, "kv_heads": None}


def replicate_kv_heads(
    params: nnx.State,
    logical_axes: LogicalAxes,
    plan: TensorParallelPlan,
    target_shardings: nnx.State,
) -> nnx.State:
    """Widen every `kv_heads` dimension from K to K*r heads (each head repeated r times in place),
    placing each result in its sharding from `target_shardings` (the widened tree's). One leaf at
    a time, so at most one parameter's copies are alive beside the tree."""
    k, r = plan.num_kv_heads, plan.kv_head_replicas

    def widen(path, x, sharding):
        logical = _logical(path, x.ndim, logical_axes)
        if r == 1 or logical is None or "kv_heads" not in logical:
            return jax.device_put(x, sharding) if x.sharding != sharding else x
        axis = logical.index("kv_heads")

        def repeat(a):
            shape = a.shape
            heads = a.reshape(*shape[:axis], k, shape[axis] // k, *shape[axis + 1 :])
            heads = jnp.repeat(heads, r, axis=axis)
            return heads.reshape(*shape[:axis], k * r * (shape[axis] // k), *shape[axis + 1 :])

        return jax.jit(repeat, out_shardings=sharding)(x)

    return jax.tree_util.tree_map_with_path(widen, params, target_shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())

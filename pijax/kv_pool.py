"""Device-side KV pool: per layer, K and V page arrays (and int8 scales), sharded on kv heads.

This module owns the physical pages only; which sequence owns which page is the block manager's
business (`block_manager.py`). Layout: `[num_pages, page_size, num_kv_heads, head_dim]`, the
layout the kernels in `pijax.kernels.paged_attention` read. Page 0 is the null page: padded
block-table entries point at it and padded tokens write into it, so the step needs no branch.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float

from pijax.config import CacheConfig, KVCacheDType, ModelConfig

log = logging.getLogger(__name__)

NULL_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerKV:
    """One layer's pages. Scales are None unless the pool is quantized."""

    k: Array  # [num_pages, page_size, num_kv_heads, head_dim]
    v: Array
    k_scale: Float[Array, "P S K"] | None = None
    v_scale: Float[Array, "P S K"] | None = None


KVPool = tuple[LayerKV, ...]


def kv_storage_dtype(kv_dtype: KVCacheDType, model_dtype) -> jnp.dtype:
    if kv_dtype is KVCacheDType.AUTO:
        return jnp.dtype(model_dtype)
    if kv_dtype is KVCacheDType.INT8:
        return jnp.dtype(jnp.int8)
    raise ValueError(
        f"kv_cache_dtype={kv_dtype.value} is not supported on backend "
        f"{jax.default_backend()!r}; allowed here: ['auto', 'int8']"
    )


def bytes_per_token(model: ModelConfig, kv_dtype: KVCacheDType, model_dtype) -> int:
    """Pool bytes one token costs across all layers, scales included."""
    dt = kv_storage_dtype(kv_dtype, model_dtype)
    per_layer = 2 * model.num_kv_heads * model.head_dim * dt.itemsize
    if kv_dtype is not KVCacheDType.AUTO:
        per_layer += 2 * model.num_kv_heads * 4  # float32 scale per token per kv head, K and V
    return per_layer * model.num_layers


def pool_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(None, None, "model", None))


def scale_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(None, None, "model"))


def num_pages_for_budget(model: ModelConfig, cache: CacheConfig, model_dtype,
                         free_bytes: int | None) -> int:
    """Pages that fit in `memory_fraction` of `free_bytes` (or the explicit `num_pages`)."""
    if cache.num_pages is not None:
        return cache.num_pages
    if free_bytes is None:
        free_bytes = _device_free_bytes()
    per_page = bytes_per_token(model, cache.kv_cache_dtype, model_dtype) * cache.page_size
    pages = int(free_bytes * cache.memory_fraction) // per_page
    if pages < 2:
        raise ValueError(
            f"memory_fraction={cache.memory_fraction} of {free_bytes} free bytes holds {pages} "
            f"pages of {per_page} bytes; need >= 2: raise memory_fraction or set num_pages"
        )
    return pages


def _device_free_bytes() -> int:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    # CPU reports no stats: budget a fixed 1 GiB so a default CPU run stays modest.
    return 1 << 30


def allocate_pool(model: ModelConfig, cache: CacheConfig, num_pages: int, model_dtype,
                  mesh: Mesh) -> KVPool:
    """Zero-filled pages placed directly on the mesh with their sharding (no host copy)."""
    dt = kv_storage_dtype(cache.kv_cache_dtype, model_dtype)
    shape = (num_pages, cache.page_size, model.num_kv_heads, model.head_dim)
    quantized = cache.kv_cache_dtype is not KVCacheDType.AUTO
    psh, ssh = pool_sharding(mesh), scale_sharding(mesh)

    def make_layer():
        k = jnp.zeros(shape, dt, device=psh)
        v = jnp.zeros(shape, dt, device=psh)
        if not quantized:
            return LayerKV(k, v)
        ones = lambda: jnp.ones(shape[:3], jnp.float32, device=ssh)  # noqa: E731
        return LayerKV(k, v, ones(), ones())

    pool = tuple(make_layer() for _ in range(model.num_layers))
    tokens = (num_pages - 1) * cache.page_size
    log.info("KV pool: %d pages x %d tokens (%s) = %d tokens of context, %.1f MiB",
             num_pages, cache.page_size, cache.kv_cache_dtype.value, tokens,
             pool_nbytes(pool) / 2**20)
    return pool


def pool_nbytes(pool: KVPool) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(pool)))

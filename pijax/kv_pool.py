"""Device-side KV pool: per layer, K and V page arrays (and their scales), sharded on kv heads.

This module owns the physical pages only; which sequence owns which page is the block manager's
business (`block_manager.py`). Layout: `[num_pages, page_size, num_kv_heads, head_dim]`, the
layout the kernels in `pijax.kernels.paged_attention` read. Page 0 is the null page: padded
block-table entries point at it and padded tokens write into it, so the step needs no branch.

The pool is sized in bytes, not tokens: `num_pages_for_budget` divides a byte budget by what one
token costs in the cache dtype, scales included (`bytes_per_token`), so switching `auto` to
`int8` buys about twice the tokens in the same memory. Quantized pools (`int8`, `fp8_e4m3`)
store one float32 scale per (token, kv head) for K and for V beside the pages; the kernels
quantize on write and dequantize on read (`pijax.kernels.quantization`), so a page, once written,
is never re-quantized: a block reused from the prefix cache or kept by a session is bit for bit
the block that was written. Whether a cache dtype is acceptable for a model is a separate
question, answered by the quality gate (`pijax.quant_gate`).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float

from pijax.config import CacheConfig, ConfigError, KVCacheDType, ModelConfig
from pijax.distributed import agree_min

log = logging.getLogger(__name__)

NULL_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerKV:
    """One layer's pages. Scales are None unless the pool is quantized."""

    k: Array  # [P PS K D] (shape letters: `pijax.model.metadata`)
    v: Array
    k_scale: Float[Array, "P PS K"] | None = None
    v_scale: Float[Array, "P PS K"] | None = None


KVPool = tuple[LayerKV, ...]


SCALE_DTYPE = jnp.float32  # one scale per (token, kv head), K and V: the kernels' layout

_STORAGE = {KVCacheDType.INT8: jnp.int8, KVCacheDType.FP8_E4M3: jnp.float8_e4m3fn}


def kv_storage_dtype(kv_dtype: KVCacheDType, model_dtype) -> jnp.dtype:
    """The pages' element type. Pure arithmetic: whether the backend can run it is
    `check_kv_cache_dtype`'s question, so capacity can be planned for any dtype anywhere."""
    if kv_dtype is KVCacheDType.AUTO:
        return jnp.dtype(model_dtype)
    return jnp.dtype(_STORAGE[kv_dtype])


def check_kv_cache_dtype(kv_dtype: KVCacheDType, backend: str | None = None) -> None:
    """Refuse, at start-up, a cache dtype the backend cannot store and attend over.

    fp8 pages need the kernels to write and read them; `pijax.kernels.quantization.supports_fp8`
    says where they can (CPU reference, CUDA compute capability >= 8.9).
    """
    if kv_dtype is not KVCacheDType.FP8_E4M3:
        return
    backend = backend or jax.default_backend()
    allowed = [KVCacheDType.AUTO.value, KVCacheDType.INT8.value]
    from pijax.kernels import quantization

    if not quantization.supports_fp8(backend):
        raise ConfigError(
            f"kv_cache_dtype={kv_dtype.value} is not supported on backend {backend!r} (no fp8 "
            f"support there); allowed here: {allowed}"
        )


def bytes_per_token(model: ModelConfig, kv_dtype: KVCacheDType, model_dtype) -> int:
    """Pool bytes one token costs across all layers, scales included."""
    dt = kv_storage_dtype(kv_dtype, model_dtype)
    per_layer = 2 * model.num_kv_heads * model.head_dim * dt.itemsize
    if kv_dtype is not KVCacheDType.AUTO:
        per_layer += 2 * model.num_kv_heads * jnp.dtype(SCALE_DTYPE).itemsize
    return per_layer * model.num_layers


def pool_sharding(mesh: Mesh) -> NamedSharding:
    """Pages split over `data` (each data shard owns a contiguous range of them, its own null
    page first), kv heads over `model`."""
    return NamedSharding(mesh, PartitionSpec("data", None, "model", None))


def scale_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data", None, "model"))


@dataclasses.dataclass(frozen=True)
class PoolCapacity:
    """What a byte budget buys: pages (the null page included) and the tokens they hold."""

    budget_bytes: int
    bytes_per_token: int
    num_pages: int
    page_size: int

    @property
    def tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size  # page 0 holds no sequence's tokens


def pool_capacity(
    model: ModelConfig, cache: CacheConfig, model_dtype, budget_bytes: int
) -> PoolCapacity:
    """Pages of `cache.kv_cache_dtype` (scales counted) that fit in `budget_bytes`."""
    per_token = bytes_per_token(model, cache.kv_cache_dtype, model_dtype)
    pages = int(budget_bytes) // (per_token * cache.page_size)
    return PoolCapacity(int(budget_bytes), per_token, pages, cache.page_size)


def kv_budget_bytes(cache: CacheConfig, free_bytes: int | None) -> int:
    """The pool's byte budget: `cache.kv_cache_memory_bytes` when the config has it set, else
    `memory_fraction` of `free_bytes` (of the device's free memory when None)."""
    explicit = getattr(cache, "kv_cache_memory_bytes", None)
    if explicit is not None:
        return int(explicit)
    if free_bytes is None:
        free_bytes = _device_free_bytes()
    return int(free_bytes * cache.memory_fraction)


def num_pages_for_budget(
    model: ModelConfig,
    cache: CacheConfig,
    model_dtype,
    free_bytes: int | None,
    kv_shards: int = 1,
) -> int:
    """Pages that fit in the byte budget (`kv_budget_bytes`), or the explicit `num_pages`.

    The budget is per device; with the pool sharded over `kv_shards` devices on its kv-head axis
    (the mesh's `model` axis), each device holds 1/kv_shards of every page, so the pool may
    have kv_shards times the pages.

    Sizing in bytes is what makes a quantized cache a capacity lever: the same budget holds
    `bytes_per_token(auto) / bytes_per_token(int8)` times the tokens (about 1.8-1.95x against
    bf16 for head_dim 32-128, the float32 scales being the difference to 2x).
    """
    check_kv_cache_dtype(cache.kv_cache_dtype)
    if cache.num_pages is not None:
        return cache.num_pages
    budget = kv_budget_bytes(cache, free_bytes) * kv_shards
    cap = pool_capacity(model, cache, model_dtype, budget)
    # Multi-host: every process must allocate the same global pool; take the tightest budget.
    cap = dataclasses.replace(cap, num_pages=agree_min(cap.num_pages))
    if cap.num_pages < 2:
        raise ConfigError(
            f"a KV budget of {cap.budget_bytes} bytes holds {cap.num_pages} pages of "
            f"{cap.bytes_per_token * cache.page_size} bytes; need >= 2: raise memory_fraction "
            "(or the byte budget) or set num_pages"
        )
    unquantized = bytes_per_token(model, KVCacheDType.AUTO, model_dtype)
    log.info(
        "KV budget %.1f MiB at %d bytes/token (%s%s): %d pages = %d tokens of context "
        "(%.2fx an unquantized %s pool)",
        cap.budget_bytes / 2**20,
        cap.bytes_per_token,
        cache.kv_cache_dtype.value,
        "" if cache.kv_cache_dtype is KVCacheDType.AUTO else ", scales included",
        cap.num_pages,
        cap.tokens,
        unquantized / cap.bytes_per_token,
        jnp.dtype(model_dtype).name,
    )
    return cap.num_pages


def _device_free_bytes() -> int:
    dev = jax.local_devices()[0]  # multi-host: the first device of this process
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    # CPU reports no stats: budget a fixed 1 GiB so a default CPU run stays modest.
    return 1 << 30


def allocate_pool(
    model: ModelConfig, cache: CacheConfig, num_pages: int, model_dtype, mesh: Mesh
) -> KVPool:
    """Zero-filled pages placed directly on the mesh with their sharding (no host copy).

    Quantized pools get scale arrays of their own, sharded on kv heads like the pages, so a
    device holds the scales of exactly the heads whose pages it holds.
    """
    check_kv_cache_dtype(cache.kv_cache_dtype)
    dt = kv_storage_dtype(cache.kv_cache_dtype, model_dtype)
    shape = (num_pages, cache.page_size, model.num_kv_heads, model.head_dim)
    quantized = cache.kv_cache_dtype is not KVCacheDType.AUTO
    psh, ssh = pool_sharding(mesh), scale_sharding(mesh)

    def make_layer():
        k = jnp.zeros(shape, dt, device=psh)
        v = jnp.zeros(shape, dt, device=psh)
        if not quantized:
            return LayerKV(k, v)
        ones = lambda: jnp.ones(shape[:3], SCALE_DTYPE, device=ssh)  # noqa: E731
        return LayerKV(k, v, ones(), ones())

    pool = tuple(make_layer() for _ in range(model.num_layers))
    tokens = (num_pages - 1) * cache.page_size
    log.info(
        "KV pool: %d pages x %d tokens (%s) = %d tokens of context, %.1f MiB",
        num_pages,
        cache.page_size,
        cache.kv_cache_dtype.value,
        tokens,
        pool_nbytes(pool) / 2**20,
    )
    return pool


def pool_nbytes(pool: KVPool) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(pool)))

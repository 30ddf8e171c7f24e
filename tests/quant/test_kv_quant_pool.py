"""int8 page quantization and the byte-sized pool: round trip, scale layout, capacity, fp8 refusal."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pijax.config import CacheConfig, ConfigError, KVCacheDType, ModelConfig
from pijax.kernels.paged_attention.reference import write_kv_reference
from pijax.kernels.quantization import dequantize, quantize_int8
from pijax.kv_pool import (
    allocate_pool,
    bytes_per_token,
    check_kv_cache_dtype,
    kv_budget_bytes,
    num_pages_for_budget,
    pool_capacity,
    pool_nbytes,
)
from pijax.sharding import make_mesh

# A Llama-3-8B-shaped cache (32 layers, 8 kv heads of 128): what a deployment sizes.
LLAMA8B = ModelConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
)
TINY = ModelConfig(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    max_position_embeddings=8192,
)


def with_outlier_channels(key, shape, channels=(3, 17), gain=60.0):
    """Random K/V vectors (never zero) where a few head-dim channels are `gain` times larger,
    the case per-tensor scales get wrong."""
    x = jax.random.normal(key, shape, jnp.float32) + 0.05
    return x.at[..., list(channels)].multiply(gain)


@pytest.mark.slow
def test_round_trip_within_half_a_scale_step_with_outlier_channels():
    x = with_outlier_channels(jax.random.key(0), (64, 4, 64))  # [tokens, kv heads, head dim]
    q, scale = quantize_int8(x)
    assert q.dtype == jnp.int8 and scale.shape == (64, 4)
    err = jnp.abs(dequantize(q, scale) - x)
    assert bool(jnp.all(err <= scale[..., None] / 2 * (1 + 1e-5)))
    # Per-(token, head) scales confine an outlier to its own vector: a head without outliers
    # keeps a fine step.
    y = x.at[:, 1].set(jax.random.normal(jax.random.key(1), (64, 64)) + 0.05)
    _, s2 = quantize_int8(y)
    assert float(jnp.mean(s2[:, 1])) < float(jnp.mean(s2[:, 0])) / 5


def test_fp8_round_trip_within_half_an_ulp_with_outlier_channels():
    from pijax.kernels.quantization import FP8_DTYPE, quantize_fp8

    x = with_outlier_channels(jax.random.key(2), (64, 4, 64))
    q, scale = quantize_fp8(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (64, 4)
    assert bool(jnp.all(jnp.isfinite(q.astype(jnp.float32))))  # clipped, never NaN
    err = jnp.abs(dequantize(q, scale) - x)
    # e4m3: 3 mantissa bits -> half an ulp is <= |x| 2^-4; subnormals: half of 2^-9 (scaled).
    bound = jnp.maximum(jnp.abs(x) * 2.0**-4, scale[..., None] * 2.0**-10) * (1 + 1e-5)
    assert bool(jnp.all(err <= bound))
    assert float(jnp.max(err / jnp.abs(x))) > 0.01  # coarser than int8 near its scale: a real bound


@pytest.mark.slow
def test_quantized_write_stores_per_token_per_head_scales():
    shape = (4, 16, 2, 32)  # pages, page size, kv heads, head dim
    k_new = with_outlier_channels(jax.random.key(2), (5, 2, 32))
    v_new = jax.random.normal(jax.random.key(3), (5, 2, 32)) + 0.1
    slots = jnp.array([16, 17, 18, 40, 63])
    pages = jnp.zeros(shape, jnp.int8)
    scales = jnp.ones(shape[:3], jnp.float32)
    kp, vp, ks, vs = write_kv_reference(pages, pages, k_new, v_new, slots, scales, scales)
    flat_k = dequantize(kp, ks).reshape(-1, 2, 32)[slots]
    _, want_scale = quantize_int8(k_new)
    np.testing.assert_allclose(ks.reshape(-1, 2)[slots], want_scale)
    assert bool(jnp.all(jnp.abs(flat_k - k_new) <= want_scale[..., None] / 2 * (1 + 1e-5)))
    untouched = jnp.ones(64, bool).at[slots].set(False)
    assert bool(jnp.all(vs.reshape(-1, 2)[untouched] == 1.0))


@pytest.mark.parametrize("model", [LLAMA8B, TINY], ids=["llama8b", "tiny"])
def test_int8_capacity_at_a_fixed_byte_budget(model):
    budget = 4 << 30
    int8 = pool_capacity(model, CacheConfig(kv_cache_dtype="int8"), jnp.bfloat16, budget)
    bf16 = pool_capacity(model, CacheConfig(), jnp.bfloat16, budget)
    f32 = pool_capacity(model, CacheConfig(), jnp.float32, budget)
    # Scales count: 2 bytes/element of bf16 against 1 byte + 4 bytes per head_dim elements.
    d = model.head_dim
    assert bytes_per_token(
        model, KVCacheDType.INT8, jnp.bfloat16
    ) == model.num_layers * 2 * model.num_kv_heads * (d + 4)
    ratio = int8.tokens / bf16.tokens
    assert ratio == pytest.approx(2 * d / (d + 4), rel=1e-3)
    assert int8.tokens / f32.tokens == pytest.approx(4 * d / (d + 4), rel=1e-3)
    if d >= 128:
        assert ratio >= 1.9  # realistic head dims; the f32 scales cost 3% at head_dim 128


def test_pool_bytes_are_what_the_budget_paid_for():
    mesh = make_mesh((1, 1))
    cache = CacheConfig(kv_cache_dtype="int8", page_size=16, num_pages=None)
    budget = 3 << 20
    pages = num_pages_for_budget(
        TINY,
        dataclasses.replace(cache),
        jnp.float32,
        free_bytes=int(budget / cache.memory_fraction),
    )
    pool = allocate_pool(TINY, cache, pages, jnp.float32, mesh)
    assert (
        pool_nbytes(pool)
        <= budget
        < pool_nbytes(pool) + bytes_per_token(TINY, KVCacheDType.INT8, jnp.float32) * 16
    )
    assert pool[0].k_scale.shape == (pages, 16, 2) and pool[0].k_scale.dtype == jnp.float32
    assert tuple(pool[0].k_scale.sharding.spec) == tuple(pool[0].k.sharding.spec)[:3]


def test_explicit_byte_budget_wins_over_memory_fraction():
    @dataclasses.dataclass(frozen=True)
    class WithBytes:  # what CacheConfig looks like once it has the field
        kv_cache_memory_bytes: int | None
        memory_fraction: float = 0.5

    assert kv_budget_bytes(WithBytes(123456), free_bytes=10**9) == 123456
    assert kv_budget_bytes(WithBytes(None), free_bytes=10**6) == 500000
    assert kv_budget_bytes(CacheConfig(memory_fraction=0.25), free_bytes=4000) == 1000


def test_fp8_is_refused_at_start_up_where_unsupported(monkeypatch):
    from pijax.kernels import quantization

    assert quantization.supports_fp8("cpu") and not quantization.supports_fp8("tpu")
    # A backend without fp8 (TPU, ROCm, CUDA before compute capability 8.9), seen from CPU:
    monkeypatch.setattr(quantization, "supports_fp8", lambda backend=None, device=None: False)
    cache = CacheConfig(kv_cache_dtype="fp8_e4m3", num_pages=4)
    with pytest.raises(
        ConfigError, match=r"kv_cache_dtype=fp8_e4m3 .*allowed here: \['auto', 'int8'\]"
    ):
        check_kv_cache_dtype(KVCacheDType.FP8_E4M3, backend="tpu")
    with pytest.raises(ConfigError, match="fp8_e4m3"):
        num_pages_for_budget(TINY, cache, jnp.float32, None)
    with pytest.raises(ConfigError, match="fp8_e4m3"):
        allocate_pool(TINY, cache, 4, jnp.float32, make_mesh((1, 1)))
    # Planning capacity needs no support: fp8 costs what int8 does.
    assert bytes_per_token(TINY, KVCacheDType.FP8_E4M3, jnp.float32) == bytes_per_token(
        TINY, KVCacheDType.INT8, jnp.float32
    )


def test_budget_sizing_logs_the_token_capacity_and_scales_with_kv_shards(caplog):
    cache = CacheConfig(kv_cache_dtype="int8", memory_fraction=0.5)
    with caplog.at_level(logging.INFO, logger="pijax.kv_pool"):
        one = num_pages_for_budget(TINY, cache, jnp.bfloat16, free_bytes=64 << 20)
    tokens = (one - 1) * cache.page_size
    assert f"{one} pages = {tokens} tokens of context" in caplog.text
    assert "scales included" in caplog.text and "1.78x an unquantized bfloat16 pool" in caplog.text
    # Sharded on kv heads over 2 devices, each device holds half of every page.
    two = num_pages_for_budget(TINY, cache, jnp.bfloat16, free_bytes=64 << 20, kv_shards=2)
    assert two in (2 * one, 2 * one + 1)

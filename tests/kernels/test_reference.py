"""The pure-JAX reference against naive float64 attention, sequence by sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pijax.kernels.paged_attention import reference
from pijax.kernels.paged_attention.cases import (
    dense_attention_numpy,
    make_case,
    mixed_seqs,
    padded_tokens,
)
from pijax.kernels.quantization import dequantize, quantize_int8

reference_jit = jax.jit(
    reference.ragged_paged_attention_reference,
    static_argnames=("sm_scale", "soft_cap", "sliding_window"),
)


def sm_scale(head_dim: int) -> float:
    return head_dim**-0.5


def run_reference(case, **kw):
    return reference_jit(*case.args(), **case.scale_kwargs(), **kw)


def rel_err(got, want):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_reference_matches_dense(group, head_dim, page_size):
    seqs = mixed_seqs(page_size)
    case = make_case(
        seqs,
        num_kv_heads=2,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        num_tokens=padded_tokens(seqs),
        max_seqs=len(seqs) + 2,
        width=5,
        seed=group * 1000 + head_dim + page_size,
    )
    out = run_reference(case, sm_scale=sm_scale(head_dim))
    want = dense_attention_numpy(case, sm_scale=sm_scale(head_dim))
    assert rel_err(out, want) < 1e-5
    total = int(case.cu_q_lens[case.num_seqs])
    assert np.all(np.asarray(out[total:]) == 0), "padded rows must be zero"


@pytest.mark.parametrize("soft_cap,window", [(30.0, None), (None, 7), (5.0, 20)])
def test_reference_soft_cap_and_window(soft_cap, window):
    seqs = mixed_seqs(16)
    case = make_case(
        seqs,
        num_kv_heads=2,
        group=4,
        head_dim=64,
        page_size=16,
        num_tokens=padded_tokens(seqs),
        width=4,
        seed=7,
    )
    kw = dict(sm_scale=sm_scale(64), soft_cap=soft_cap, sliding_window=window)
    assert rel_err(run_reference(case, **kw), dense_attention_numpy(case, **kw)) < 1e-5


def test_reference_int8_pages():
    seqs = mixed_seqs(16)
    case = make_case(
        seqs,
        num_kv_heads=2,
        group=4,
        head_dim=64,
        page_size=16,
        quantized=True,
        num_tokens=padded_tokens(seqs),
        width=4,
        seed=3,
    )
    kw = dict(sm_scale=sm_scale(64))
    assert rel_err(run_reference(case, **kw), dense_attention_numpy(case, **kw)) < 1e-5


def test_reference_bf16():
    seqs = mixed_seqs(16)
    case = make_case(
        seqs,
        num_kv_heads=2,
        group=4,
        head_dim=64,
        page_size=16,
        dtype=jnp.bfloat16,
        num_tokens=padded_tokens(seqs),
        width=4,
        seed=5,
    )
    kw = dict(sm_scale=sm_scale(64))
    assert rel_err(run_reference(case, **kw), dense_attention_numpy(case, **kw)) < 1e-2


def test_reference_all_sequences_padded():
    """num_seqs = 0: every row is padding and every block-table entry is the null page."""
    case = make_case(
        [(2, 3)],
        num_kv_heads=1,
        group=2,
        head_dim=64,
        page_size=16,
        num_tokens=8,
        max_seqs=3,
        width=2,
    )
    case = type(case)(
        **{
            **case.__dict__,
            "num_seqs": jnp.asarray(0, jnp.int32),
            "cu_q_lens": jnp.zeros_like(case.cu_q_lens),
            "kv_lens": jnp.zeros_like(case.kv_lens),
            "block_tables": jnp.zeros_like(case.block_tables),
        }
    )
    out = run_reference(case, sm_scale=0.125)
    assert np.all(np.asarray(out) == 0)


def test_quantize_round_trip_with_outlier_channels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 4, 128)).astype(np.float32)
    x[..., 3] *= 80.0  # an outlier channel, as seen in real K caches
    x[0, 0, 0] = 0.0  # an all-zero vector must not divide by zero
    qx, scale = quantize_int8(jnp.asarray(x))
    assert qx.dtype == jnp.int8 and scale.shape == x.shape[:-1]
    err = np.abs(np.asarray(dequantize(qx, scale)) - x)
    assert np.all(err <= np.asarray(scale)[..., None] / 2 + 1e-6 * np.abs(x))
    assert np.all(np.asarray(dequantize(qx, scale))[0, 0, 0] == 0)


def test_write_kv_reference_scatter_and_quantize():
    rng = np.random.default_rng(1)
    pages = jnp.asarray(rng.standard_normal((6, 4, 2, 8)), jnp.float32)
    new_k = jnp.asarray(rng.standard_normal((3, 2, 8)), jnp.float32)
    slots = jnp.asarray([9, 4 * 5 + 3, 0], jnp.int32)  # page 2 off 1, page 5 off 3, null page
    k, v, ks, vs = reference.write_kv_reference(pages, pages, new_k, -new_k, slots)
    assert ks is None and vs is None
    np.testing.assert_array_equal(k[2, 1], new_k[0])
    np.testing.assert_array_equal(v[5, 3], -new_k[1])
    np.testing.assert_array_equal(k[1], pages[1])  # untouched page
    qp, sc = quantize_int8(pages)
    k, v, ks, vs = reference.write_kv_reference(qp, qp, new_k, new_k, slots, sc, sc)
    np.testing.assert_allclose(dequantize(k[2, 1], ks[2, 1]), new_k[0], atol=float(ks[2, 1].max()))

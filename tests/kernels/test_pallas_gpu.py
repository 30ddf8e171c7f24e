"""GPU-style Pallas kernels (ragged and split-K decode) in interpret mode vs the reference, and
their Triton lowering (jit-lowered for `cuda` on this CPU host: catches lowering errors without
a GPU; PTX compilation and speed still need one)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pijax.kernels import dispatch
from pijax.kernels.paged_attention import common, decode, ragged, reference, tuning
from pijax.kernels.paged_attention.cases import make_case, mixed_seqs, padded_tokens
from pijax.kernels.quantization import FP8_DTYPE, dequantize

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
reference_jit = jax.jit(
    reference.ragged_paged_attention_reference,
    static_argnames=("sm_scale", "soft_cap", "sliding_window"),
)


def rel_err(got, want):
    got, want = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (got, want))
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


def ragged_case(
    group, head_dim, page_size, dtype=jnp.float32, quantized=False, seed=0, quant_dtype=jnp.int8
):
    seqs = mixed_seqs(page_size, max_pages=3)
    return make_case(
        seqs,
        num_kv_heads=2,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        quantized=quantized,
        quant_dtype=quant_dtype,
        num_tokens=padded_tokens(seqs),
        max_seqs=len(seqs) + 2,
        width=4,
        seed=seed,
    )


def decode_case(
    group, head_dim, page_size, dtype=jnp.float32, quantized=False, seed=0, quant_dtype=jnp.int8
):
    seqs = [(1, 1), (1, page_size), (1, page_size + 1), (1, 4 * page_size), (1, 2 * page_size)]
    return make_case(
        seqs,
        num_kv_heads=2,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        quantized=quantized,
        quant_dtype=quant_dtype,
        num_tokens=8,
        max_seqs=7,
        width=5,
        seed=seed,
    )


def check_ragged(case, dtype=jnp.float32, soft_cap=None, sliding_window=None, num_splits=1):
    kw = dict(
        sm_scale=case.q.shape[-1] ** -0.5,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        **case.scale_kwargs(),
    )

    @jax.jit
    def run(*args):  # the public wrapper's pieces, so the raw kernel outputs can be inspected
        parts, lse, tm, per_tile = ragged.ragged_output_tiles(
            *args,
            **kw,
            block_rows=None,
            pages_per_block=None,
            num_splits=num_splits,
            interpret=True,
        )
        tiles = parts[0] if lse is None else common.combine_splits(parts, lse)
        out = common.scatter_output_tiles(
            tiles.astype(case.q.dtype),
            tm,
            case.cu_q_lens,
            case.num_seqs,
            num_heads=case.q.shape[1],
            num_tokens=case.q.shape[0],
            tokens_per_tile=per_tile,
            head_dim=case.q.shape[2],
        )
        return parts, lse, out

    parts, lse, out = run(*case.args())
    assert parts.shape[0] == num_splits and (lse is None) == (num_splits == 1)
    # The interpreter fills every output buffer with NaN before the kernel runs; a tile left
    # unwritten would survive as NaN here.
    for raw in (parts, lse if lse is not None else parts):
        assert not np.any(np.isnan(np.asarray(raw, np.float32))), "kernel left output unwritten"
    check_output(out, case, dtype, **kw)


def check_output(out, case, dtype, **kw):
    want = reference_jit(*dequantized(case).args(), **{**kw, "k_scales": None, "v_scales": None})
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    assert rel_err(out, want) < TOL[dtype]
    total = int(case.cu_q_lens[case.num_seqs])
    assert np.all(np.asarray(out[total:], np.float32) == 0), "padded rows must be zero"


def dequantized(case):
    """The case with float32 pages holding the quantized pages' values (scales applied)."""
    if case.k_scales is None:
        return case
    return dataclasses.replace(
        case,
        k_pages=dequantize(case.k_pages, case.k_scales),
        v_pages=dequantize(case.v_pages, case.v_scales),
        k_scales=None,
        v_scales=None,
    )


def check_final(fn, case, dtype, **kw):
    check_output(fn(*case.args(), **kw, interpret=True), case, dtype, **kw)


@pytest.mark.parametrize(
    "group,head_dim,page_size,num_splits",
    [(1, 64, 16, 1), (4, 128, 32, 3), (8, 64, 32, 1), (4, 64, 16, 2)],
)
def test_ragged_f32(group, head_dim, page_size, num_splits):
    check_ragged(
        ragged_case(group, head_dim, page_size, seed=group + head_dim), num_splits=num_splits
    )


def test_ragged_bf16():
    check_ragged(ragged_case(4, 128, 16, dtype=jnp.bfloat16), dtype=jnp.bfloat16, num_splits=2)


def test_ragged_int8_pages():
    check_ragged(ragged_case(4, 64, 16, quantized=True, seed=11))


def test_ragged_fp8_pages_bf16_queries():
    case = ragged_case(
        4, 64, 16, dtype=jnp.bfloat16, quantized=True, quant_dtype=FP8_DTYPE, seed=12
    )
    assert case.k_pages.dtype == FP8_DTYPE
    check_ragged(case, dtype=jnp.bfloat16, num_splits=2)


def test_ragged_soft_cap_and_window_split():
    # Three partitions of a windowed range: some partitions see only masked keys for some rows.
    check_ragged(ragged_case(2, 64, 16, seed=4), soft_cap=4.0, sliding_window=19, num_splits=3)


def test_split_count_follows_grid_size():
    sizes = tuning.block_sizes("gpu")
    assert tuning.splits(8, sizes) == sizes.max_splits  # 1 sequence x 8 kv heads: split hard
    assert tuning.splits(8 * 68, sizes) == 1  # 64 decodes: the grid is already full
    assert 1 < tuning.splits(8 * 9, sizes) < sizes.max_splits


@pytest.mark.parametrize("group,head_dim,page_size", [(1, 64, 16), (8, 128, 32)])
def test_decode_f32(group, head_dim, page_size):
    case = decode_case(group, head_dim, page_size, seed=page_size)
    kw = dict(
        sm_scale=head_dim**-0.5,
        k_scales=None,
        v_scales=None,
        soft_cap=None,
        sliding_window=None,
        pages_per_block=None,
        num_splits=None,
        interpret=True,
    )
    parts, lse, _ = jax.jit(functools.partial(decode.decode_partials, **kw))(*case.args())
    assert not np.any(np.isnan(np.asarray(parts))) and not np.any(np.isnan(np.asarray(lse)))
    check_final(decode.paged_decode_attention, case, jnp.float32, sm_scale=head_dim**-0.5)


@pytest.mark.slow
def test_decode_bf16_int8_window():
    case = decode_case(4, 64, 16, dtype=jnp.bfloat16, seed=9)
    check_final(decode.paged_decode_attention, case, jnp.bfloat16, sm_scale=0.125)
    case = decode_case(4, 64, 16, quantized=True, seed=10)
    check_final(
        decode.paged_decode_attention,
        case,
        jnp.float32,
        sm_scale=0.125,
        soft_cap=3.0,
        sliding_window=21,
        **case.scale_kwargs(),
    )
    case = decode_case(2, 64, 16, quantized=True, quant_dtype=FP8_DTYPE, seed=13)
    check_final(
        decode.paged_decode_attention, case, jnp.float32, sm_scale=0.125, **case.scale_kwargs()
    )


def test_decode_split_combine_matches_single_split():
    case = decode_case(4, 64, 16, seed=2)
    kw = dict(sm_scale=0.125, interpret=True, pages_per_block=1)
    one = decode.paged_decode_attention(*case.args(), num_splits=1, **kw)
    many = decode.paged_decode_attention(*case.args(), num_splits=4, **kw)
    assert rel_err(many, one) < 1e-6


def test_dispatch_interpret_in_jitted_step_with_donated_pool():
    case = ragged_case(4, 64, 16, seed=5)
    k_new = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 64)), jnp.float32)
    slots = jnp.asarray([17, 18, 0], jnp.int32)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(k_pages, v_pages, q):
        k_pages, v_pages, _, _ = dispatch.write_kv(k_pages, v_pages, k_new, k_new, slots)
        out = dispatch.paged_attention(
            q,
            k_pages,
            v_pages,
            *case.args()[3:],
            sm_scale=0.125,
            impl=dispatch.AttentionImpl.PALLAS_INTERPRET,
        )
        return out, k_pages, v_pages

    k2, v2, _, _ = reference.write_kv_reference(case.k_pages, case.v_pages, k_new, k_new, slots)
    want = reference_jit(case.q, k2, v2, *case.args()[3:], sm_scale=0.125)
    out, _, _ = step(jnp.copy(case.k_pages), jnp.copy(case.v_pages), case.q)
    assert rel_err(out, want) < 1e-5


def test_dispatch_pallas_on_cpu_names_the_alternatives():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU error path; this host has an accelerator")
    case = decode_case(1, 64, 16)
    with pytest.raises(ValueError, match="pallas_interpret"):
        dispatch.paged_attention(*case.args(), sm_scale=0.1, impl=dispatch.AttentionImpl.PALLAS)


@pytest.mark.parametrize("kernel", ["ragged", "decode"])
@pytest.mark.parametrize(
    "dtype,quantized",
    [
        (jnp.bfloat16, False),
        (jnp.bfloat16, jnp.int8),
        (jnp.bfloat16, FP8_DTYPE),
        (jnp.float32, False),
    ],
)
def test_triton_lowering(kernel, dtype, quantized):
    make = ragged_case if kernel == "ragged" else decode_case
    fn = ragged.ragged_paged_attention if kernel == "ragged" else decode.paged_decode_attention
    case = make(
        4, 128, 16, dtype=dtype, quantized=quantized is not False, quant_dtype=quantized or jnp.int8
    )
    f = functools.partial(fn, sm_scale=0.1, soft_cap=30.0, sliding_window=40, **case.scale_kwargs())
    text = jax.jit(f).trace(*case.args()).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()

"""Every kernel lowers for its platform (cuda: Triton; tpu: Mosaic) on this CPU host over the
shapes the support table lists: every head dim x every GQA ratio, page sizes 16/32, float and
quantized (int8, fp8) pages. Lowering catches Triton's power-of-two rule, bad block shapes and
dtype casts without a GPU/TPU; PTX / Mosaic compilation and speed still need the device
(`scripts/device_check.py`). The fast tests rotate page size and page dtype along the
(head_dim, ratio) grid so every value is covered; the full product is marked slow.

Plus interpret-mode correctness against the reference for the head dims that are not powers of
two (the padded path)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pijax.kernels import support
from pijax.kernels.paged_attention import decode, ragged, reference, tpu
from pijax.kernels.paged_attention.cases import make_case, mixed_seqs, padded_tokens
from pijax.kernels.quantization import dequantize
from pijax.kernels.support import Kernel

RATIOS = (1, 2, 3, 4, 6, 8, 16)
PAGE_SIZES = (16, 32)
PAGES = ("bfloat16", "int8", "float8_e4m3fn")

KERNELS = {
    Kernel.TRITON_RAGGED: ("cuda", ragged.ragged_paged_attention, "triton"),
    Kernel.TRITON_DECODE: ("cuda", decode.paged_decode_attention, "triton"),
    Kernel.TPU_RAGGED: ("tpu", tpu.ragged_paged_attention_tpu, "tpu_custom_call"),
}


def small_case(kernel, head_dim, group, page_size, pages, seed=0, dtype=jnp.bfloat16):
    decode_only = kernel is Kernel.TRITON_DECODE
    seqs = [(1, 1), (1, page_size + 3), (1, 2 * page_size)] if decode_only else None
    seqs = seqs or mixed_seqs(page_size, max_pages=2)
    quantized = pages != "bfloat16"
    return make_case(
        seqs,
        num_kv_heads=2,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        quantized=quantized,
        quant_dtype=jnp.dtype(pages) if quantized else jnp.int8,
        num_tokens=len(seqs) + 1 if decode_only else padded_tokens(seqs),
        max_seqs=len(seqs) + 1,
        seed=seed,
    )


def lower(kernel, case, **kw):
    platform, fn, marker = KERNELS[kernel]
    f = functools.partial(fn, sm_scale=0.1, **case.scale_kwargs(), **kw)
    text = jax.jit(f).trace(*case.args()).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text.lower() if marker == "triton" else marker in text


def supported_pages(kernel):
    return [p for p in PAGES if p in support.SUPPORTED[kernel].kv_dtypes]


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("head_dim", support.HEAD_DIMS)
def test_lowers_every_ratio(kernel, head_dim):
    table = support.SUPPORTED[kernel]
    assert head_dim in table.head_dims
    pages = supported_pages(kernel)
    for i, group in enumerate(r for r in RATIOS if r <= table.max_group):
        page_size = PAGE_SIZES[i % len(PAGE_SIZES)]
        case = small_case(kernel, head_dim, group, page_size, pages[i % len(pages)])
        # soft cap and window on some, so their masks are lowered for every head dim too
        extra = dict(soft_cap=30.0, sliding_window=40) if i % 3 == 0 else {}
        lower(kernel, case, **extra)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_lowers_full_product(kernel):
    table = support.SUPPORTED[kernel]
    grid = itertools.product(table.head_dims, RATIOS, PAGE_SIZES, supported_pages(kernel))
    for head_dim, group, page_size, pages in grid:
        lower(kernel, small_case(kernel, head_dim, group, page_size, pages))


# --- interpret-mode correctness for non-power-of-two head dims --------------------------------


def check_interpret(kernel, case, tol):
    fn = KERNELS[kernel][1]
    kw = dict(sm_scale=case.q.shape[-1] ** -0.5, soft_cap=None, sliding_window=None)
    out = fn(*case.args(), **kw, **case.scale_kwargs(), interpret=True)
    k, v = case.k_pages, case.v_pages
    if case.k_scales is not None:
        k, v = dequantize(k, case.k_scales), dequantize(v, case.v_scales)
    want = reference.ragged_paged_attention_reference(
        case.q, k, v, *case.args()[3:], **kw, k_scales=None, v_scales=None
    )
    got, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert out.shape == case.q.shape and not np.any(np.isnan(got))
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < tol
    assert np.all(got[int(case.cu_q_lens[case.num_seqs]) :] == 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel,head_dim,group,page_size,pages",
    [
        (Kernel.TRITON_RAGGED, 48, 3, 16, "bfloat16"),
        (Kernel.TRITON_RAGGED, 80, 2, 32, "int8"),
        (Kernel.TRITON_RAGGED, 96, 6, 16, "float8_e4m3fn"),
        (Kernel.TRITON_DECODE, 48, 4, 32, "int8"),
        (Kernel.TRITON_DECODE, 80, 3, 16, "bfloat16"),
        (Kernel.TRITON_DECODE, 96, 1, 16, "float8_e4m3fn"),
    ],
)
def test_interpret_non_pow2_head_dim(kernel, head_dim, group, page_size, pages):
    case = small_case(kernel, head_dim, group, page_size, pages, seed=head_dim + group)
    check_interpret(kernel, case, 2e-2)


@pytest.mark.parametrize("head_dim", [48, 80])
def test_interpret_non_pow2_head_dim_f32_exact(head_dim):
    case = small_case(Kernel.TRITON_RAGGED, head_dim, 3, 16, "bfloat16", dtype=jnp.float32)
    check_interpret(Kernel.TRITON_RAGGED, case, 1e-5)


@pytest.mark.slow
def test_tpu_interpret_head_dim_80():
    from jax.experimental.pallas import tpu as pltpu

    case = small_case(Kernel.TPU_RAGGED, 80, 3, 16, "int8", seed=5, dtype=jnp.float32)
    try:
        check_interpret(Kernel.TPU_RAGGED, case, 1e-5)
    finally:
        pltpu.reset_tpu_interpret_mode_state()

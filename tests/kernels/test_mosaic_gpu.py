"""The Mosaic GPU (Hopper) kernel: lowering for cuda on this CPU host over the shapes its support
row lists, correctness through the Mosaic GPU interpreter (a private JAX module, present in JAX
0.10+), and dispatch's choice between it and the Triton kernel."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pijax.kernels import dispatch, support
from pijax.kernels.impl import AttentionImpl
from pijax.kernels.paged_attention import mosaic_gpu, reference, tuning
from pijax.kernels.paged_attention.cases import make_case, mixed_seqs, padded_tokens
from pijax.kernels.quantization import dequantize
from pijax.kernels.support import AttentionShape, Kernel

TABLE = support.SUPPORTED[Kernel.MOSAIC_GPU_RAGGED]
RATIOS = (1, 2, 3, 4, 6, 8, 16)

needs_mgpu = pytest.mark.skipif(
    not mosaic_gpu.available(), reason="this JAX has no Pallas Mosaic GPU backend"
)
needs_interpreter = pytest.mark.skipif(
    not mosaic_gpu.interpreter_available(),
    reason="this JAX has no Mosaic GPU interpreter (jax._src.pallas.mosaic_gpu.interpret)",
)


def case_for(head_dim, group, page_size, seqs=None, seed=0, pages="bfloat16"):
    seqs = seqs or mixed_seqs(page_size, max_pages=3)
    quantized = pages != "bfloat16"
    return make_case(
        seqs,
        num_kv_heads=2,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        dtype=jnp.bfloat16,
        quantized=quantized,
        quant_dtype=jnp.dtype(pages) if quantized else jnp.int8,
        num_tokens=padded_tokens(seqs),
        max_seqs=len(seqs) + 1,
        seed=seed,
    )


def lower(case, **kw):
    f = functools.partial(
        mosaic_gpu.ragged_paged_attention_mgpu, sm_scale=0.1, **case.scale_kwargs(), **kw
    )
    text = jax.jit(f).trace(*case.args()).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text.lower()


@needs_mgpu
@pytest.mark.parametrize("head_dim", TABLE.head_dims)
def test_lowers_for_cuda(head_dim):
    # bf16, int8 and fp8 pages; every page size of the row; a window and soft cap on one
    for i, (group, page_size, pages) in enumerate(
        [(1, 16, "bfloat16"), (3, 32, "int8"), (8, 64, "float8_e4m3fn"), (16, 8, "int8")]
    ):
        extra = dict(soft_cap=30.0, sliding_window=40) if i == 1 else {}
        # the default split count (split-K for these small grids) and one unsplit
        extra["num_splits"] = 1 if i == 2 else None
        lower(case_for(head_dim, group, page_size, pages=pages), **extra)


@needs_mgpu
@pytest.mark.slow
def test_lowers_full_grid():
    grid = itertools.product(TABLE.head_dims, RATIOS, (16, 32), TABLE.kv_dtypes)
    for head_dim, group, page_size, pages in grid:
        lower(case_for(head_dim, group, page_size, pages=pages))


def check_interpreted(case, num_splits=None, detect_races=False, **kw):
    kw = dict(sm_scale=case.q.shape[-1] ** -0.5, **kw)
    try:
        out = mosaic_gpu.interpret_fn(detect_races=detect_races)(
            *case.args(), **kw, **case.scale_kwargs(), num_splits=num_splits
        )
        jax.block_until_ready(out)
        # Double-buffered TMA copies vs the wgmma reads of the other slot, SMEM stores vs
        # the TMA store of the output: unordered accesses would show up here.
        assert not (detect_races and mosaic_gpu.races_found()), "the interpreter found a race"
    finally:
        mosaic_gpu.reset_interpreter()
    k, v = case.k_pages, case.v_pages
    if case.k_scales is not None:
        k, v = dequantize(k, case.k_scales), dequantize(v, case.v_scales)
    want = reference.ragged_paged_attention_reference(case.q, k, v, *case.args()[3:], **kw)
    got, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert not np.any(np.isnan(got)), "NaN: an output tile or SMEM buffer was left unwritten"
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 2e-2
    assert np.all(got[int(case.cu_q_lens[case.num_seqs]) :] == 0)


@needs_interpreter
def test_interpreter_decode_and_prefill_gqa4():
    # Two decodes and a chunked prefill that starts mid-page, over non-contiguous pages.
    check_interpreted(case_for(64, 4, 16, seqs=[(1, 20), (1, 33), (5, 40)], seed=3))


@needs_interpreter
def test_interpreter_window_soft_cap_gqa3_mixed():
    check_interpreted(case_for(64, 3, 32, seed=4), soft_cap=5.0, sliding_window=37)


@needs_interpreter
def test_interpreter_split_k_no_races():
    # A long decode over 3 double-buffered K/V tiles, cut into 2 partitions, race-checked.
    case = case_for(64, 2, 32, seqs=[(1, 300)], seed=7, pages="int8")
    check_interpreted(case, num_splits=2, detect_races=True)


@needs_interpreter
@pytest.mark.slow
def test_interpreter_split_k_long_decodes():
    # Two long decodes and a prefill chunk, cut into 3 partitions each, merged by lse.
    seqs = [(1, 300), (1, 45), (4, 200)]
    case = case_for(64, 4, 16, seqs=seqs, seed=6, pages="int8")
    check_interpreted(case, num_splits=3, detect_races=True)


@needs_interpreter
@pytest.mark.parametrize("pages,head_dim", [("int8", 64), ("float8_e4m3fn", 256)])
def test_interpreter_quantized_pages(pages, head_dim):
    # head_dim 256 takes the 64-key tiles (SMEM budget); int8 the 128-key ones.
    case = case_for(head_dim, 2, 16, seqs=[(1, 20), (1, 70), (4, 90)], seed=5, pages=pages)
    check_interpreted(case, sliding_window=66)


def test_dispatch_prefers_mosaic_on_hopper_and_hands_other_shapes_to_triton(monkeypatch):
    monkeypatch.setattr(tuning, "HOPPER_KERNEL", Kernel.MOSAIC_GPU_RAGGED.value)
    monkeypatch.setattr(support, "gpu_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(mosaic_gpu, "available", lambda: True)
    bf16 = AttentionShape(32, 8, 128, 16, "bfloat16", "bfloat16")
    int8 = AttentionShape(32, 8, 128, 16, "bfloat16", "int8")
    odd = AttentionShape(12, 4, 80, 16, "bfloat16", "bfloat16")
    f32 = AttentionShape(32, 8, 128, 16, "float32", "float32")
    pick = functools.partial(dispatch.choose_kernel, AttentionImpl.PALLAS, backend="cuda")
    assert pick(bf16) is Kernel.MOSAIC_GPU_RAGGED
    assert pick(int8) is Kernel.MOSAIC_GPU_RAGGED
    assert pick(odd) is Kernel.TRITON_RAGGED
    assert pick(f32) is Kernel.TRITON_RAGGED
    assert pick(bf16, decode_only=True) is Kernel.TRITON_DECODE
    monkeypatch.setattr(support, "gpu_capability", lambda device=None: (8, 0))  # Ampere
    assert pick(bf16) is Kernel.TRITON_RAGGED


def test_hopper_choice_is_recorded_as_unmeasured():
    assert tuning.HOPPER_KERNEL in {k.value for k in Kernel}
    if tuning.HOPPER_KERNEL_MEASURED is None:
        # No GPU has run either kernel: the default must be the one with a longer CPU record.
        assert tuning.HOPPER_KERNEL == Kernel.TRITON_RAGGED.value

"""The Mosaic kernel (scalar prefetch, double-buffered page DMAs) through the TPU interpreter
(`pltpu.InterpretParams`), which simulates SMEM/VMEM, DMAs and semaphores on CPU and fills
uninitialized buffers with NaN; plus its Mosaic lowering (jit-lowered for `tpu` on this host;
Mosaic's compiler passes still need a TPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pijax.kernels.paged_attention import reference, tpu
from pijax.kernels.paged_attention.cases import make_case, mixed_seqs, padded_tokens

reference_jit = jax.jit(
    reference.ragged_paged_attention_reference,
    static_argnames=("sm_scale", "soft_cap", "sliding_window"),
)


def tpu_case(group=4, dtype=jnp.float32, quantized=False, seed=0):
    seqs = mixed_seqs(16, max_pages=3)
    return make_case(
        seqs,
        num_kv_heads=2,
        group=group,
        head_dim=64,
        page_size=16,
        dtype=dtype,
        quantized=quantized,
        num_tokens=padded_tokens(seqs),
        max_seqs=len(seqs) + 1,
        width=4,
        seed=seed,
    )


def check(case, tol, **kw):
    kw = dict(sm_scale=0.125, **case.scale_kwargs(), **kw)
    out = tpu.ragged_paged_attention_tpu(*case.args(), **kw, interpret=True)
    want = reference_jit(*case.args(), **kw)
    out32 = np.asarray(out, np.float32)
    assert not np.any(np.isnan(out32)), "NaN: an unfilled VMEM slot or output tile was read"
    err = np.max(np.abs(out32 - np.asarray(want, np.float32))) / np.max(np.abs(want))
    assert err < tol
    assert np.all(out32[int(case.cu_q_lens[case.num_seqs]) :] == 0)


@pytest.fixture(autouse=True)
def _reset_interpreter():
    yield
    # The TPU interpreter keeps global state; after a failed kernel it must be reset.
    from jax.experimental.pallas import tpu as pltpu

    pltpu.reset_tpu_interpret_mode_state()


def test_tpu_f32_gqa4():
    check(tpu_case(), 1e-5)


def test_tpu_int8_pages_window_soft_cap():
    check(tpu_case(group=1, quantized=True, seed=3), 1e-5, soft_cap=6.0, sliding_window=20)


@pytest.mark.slow
def test_tpu_bf16_gqa8():
    check(tpu_case(group=8, dtype=jnp.bfloat16, seed=4), 1e-2)


@pytest.mark.parametrize("quantized", [False, True])
def test_mosaic_lowering(quantized):
    case = tpu_case(dtype=jnp.bfloat16, quantized=quantized)
    f = functools.partial(
        tpu.ragged_paged_attention_tpu,
        sm_scale=0.1,
        soft_cap=30.0,
        sliding_window=40,
        **case.scale_kwargs(),
    )
    text = jax.jit(f).trace(*case.args()).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text

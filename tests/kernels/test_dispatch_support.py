"""Dispatch never crashes on a shape: `auto` falls back to the XLA path (logged once per shape),
an explicit `pallas` refuses with the shape and the supported set; the table is data."""

from __future__ import annotations

import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pijax.kernels import dispatch, support
from pijax.kernels.impl import AttentionImpl
from pijax.kernels.paged_attention import reference
from pijax.kernels.paged_attention.cases import make_case
from pijax.kernels.support import AttentionShape, Kernel

# Not in the table on any backend: 72 is no supported family's head_dim.
ODD = AttentionShape(8, 2, 72, 16, "bfloat16", "bfloat16")
GOOD = AttentionShape(32, 8, 128, 16, "bfloat16", "bfloat16")


def test_every_kernel_has_a_row_and_the_family_head_dims():
    assert set(support.SUPPORTED) == set(Kernel)
    for kernel in (Kernel.TRITON_RAGGED, Kernel.TRITON_DECODE, Kernel.TPU_RAGGED):
        assert {48, 64, 80, 96, 128, 256} <= set(support.SUPPORTED[kernel].head_dims)
        assert {16, 32} <= set(support.SUPPORTED[kernel].page_sizes)


@pytest.mark.parametrize("backend", ["cuda", "tpu"])
def test_auto_falls_back_and_logs_once(backend, caplog):
    dispatch._FELL_BACK.clear()
    assert dispatch.choose_kernel(AttentionImpl.AUTO, GOOD, backend=backend) is not None
    with caplog.at_level(logging.WARNING, logger=dispatch.log.name):
        for _ in range(3):
            assert dispatch.choose_kernel(AttentionImpl.AUTO, ODD, backend=backend) is None
    records = [r for r in caplog.records if "XLA reference" in r.getMessage()]
    assert len(records) == 1
    assert "head_dim 72" in records[0].getMessage()


@pytest.mark.parametrize("backend", ["cuda", "tpu"])
def test_explicit_pallas_refuses_naming_shape_and_supported_set(backend):
    with pytest.raises(ValueError) as err:
        dispatch.check_supported("pallas", ODD, backend=backend)
    text = str(err.value)
    assert "head_dim 72" in text and "supported: head_dim in (16, 32, 48" in text
    dispatch.check_supported("pallas", GOOD, backend=backend)  # a listed shape passes


@pytest.mark.parametrize(
    "shape,needle",
    [
        (AttentionShape(8, 2, 64, 24, "bfloat16", "bfloat16"), "page_size 24"),
        (AttentionShape(64, 2, 64, 16, "bfloat16", "bfloat16"), "GQA ratio 64/2"),
        (AttentionShape(6, 4, 64, 16, "bfloat16", "bfloat16"), "GQA ratio 6/4"),
        (AttentionShape(8, 2, 64, 16, "bfloat16", "float8_e4m3fn"), "page dtype float8_e4m3fn"),
    ],
)
def test_tpu_refusals_name_the_field(shape, needle):
    with pytest.raises(ValueError, match=needle):
        dispatch.check_supported(AttentionImpl.PALLAS, shape, backend="tpu")


def test_cpu_auto_and_reference_never_check_shapes():
    assert dispatch.choose_kernel(AttentionImpl.AUTO, ODD, backend="cpu") is None
    assert dispatch.choose_kernel(AttentionImpl.REFERENCE, ODD, backend="cuda") is None
    with pytest.raises(ValueError, match="pallas_interpret"):
        dispatch.check_supported(AttentionImpl.PALLAS, GOOD, backend="cpu")


def test_traced_auto_on_gpu_falls_back_to_reference(monkeypatch):
    """A jitted call with an unsupported shape on a (pretended) GPU runs the reference."""
    case = make_case([(3, 20), (1, 9)], num_kv_heads=2, group=3, head_dim=72, page_size=16, seed=1)
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "cuda")
    run = jax.jit(lambda *a: dispatch.paged_attention(*a, sm_scale=0.1))
    out = run(*case.args())
    want = reference.ragged_paged_attention_reference(*case.args(), sm_scale=0.1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_traced_interpret_refuses_unsupported_shape():
    case = make_case([(2, 5)], num_kv_heads=1, group=2, head_dim=72, page_size=16, seed=2)
    with pytest.raises(ValueError, match="head_dim 72"):
        dispatch.paged_attention(*case.args(), sm_scale=0.1, impl=AttentionImpl.PALLAS_INTERPRET)


def test_shape_of_arrays():
    q = jnp.zeros((5, 12, 80), jnp.bfloat16)
    k = jnp.zeros((9, 32, 4, 80), jnp.int8)
    shape = AttentionShape.of(q, k, sliding_window=128)
    assert shape == AttentionShape(12, 4, 80, 32, "bfloat16", "int8", False, True)


def test_config_imports_no_pallas():
    code = (
        "import sys, pijax.config, pijax.kernels.impl, pijax.kernels.support; "
        "print(sorted(m for m in sys.modules if 'pallas' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_engine_start_up_refuses_an_explicit_kernel_on_an_unsupported_shape(monkeypatch):
    """With a support table that lacks tiny-random's head dim (32), `pallas_interpret` fails at
    LLM(...), before any request, naming the shape and the supported set; the same engine with
    `auto` starts (it would fall back per shape)."""
    import dataclasses

    from pijax import LLM

    row = support.SUPPORTED[Kernel.TRITON_RAGGED]
    monkeypatch.setitem(
        support.SUPPORTED, Kernel.TRITON_RAGGED, dataclasses.replace(row, head_dims=(64,))
    )
    limits = dict(num_pages=64, max_model_len=128, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match=r"head_dim 32.*head_dim in \(64,\)"):
        LLM("tiny-random", attention_impl="pallas_interpret", **limits)
    assert LLM("tiny-random", attention_impl="auto", **limits).engine is not None

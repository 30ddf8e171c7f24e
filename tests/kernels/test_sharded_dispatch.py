"""Dispatch under a 4-device mesh: the Pallas path is wrapped in shard_map over kv heads and
agrees with the reference on one device.

JAX fixes its device count at start-up, so the check runs in a subprocess with
`--xla_force_host_platform_device_count=4` (CPU devices; kernels in interpret mode).
"""

from __future__ import annotations

import textwrap

import pytest

from pijax.testing import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from pijax.kernels import dispatch
    from pijax.kernels.paged_attention import reference
    from pijax.kernels.paged_attention.cases import make_case, mixed_seqs, padded_tokens

    mesh = Mesh(np.asarray(jax.devices()).reshape(1, 4), ("data", "model"))
    seqs = mixed_seqs(16, max_pages=3)
    result = {}
    for quantized in (False, True):
        case = make_case(seqs, num_kv_heads=4, group=2, head_dim=32, page_size=16,
                         quantized=quantized, num_tokens=padded_tokens(seqs),
                         max_seqs=len(seqs) + 1, width=4, seed=21 + quantized)
        put = lambda x, *spec: None if x is None else jax.device_put(
            x, NamedSharding(mesh, P(*spec)))
        args = (put(case.q, None, "model", None), put(case.k_pages, None, None, "model", None),
                put(case.v_pages, None, None, "model", None), *case.args()[3:])
        scales = dict(k_scales=put(case.k_scales, None, None, "model"),
                      v_scales=put(case.v_scales, None, None, "model"))

        def attend(*a, impl):
            return dispatch.paged_attention(*a, **scales, sm_scale=0.2, impl=impl)

        kernel = jax.jit(lambda *a: attend(*a, impl=dispatch.AttentionImpl.PALLAS_INTERPRET))
        want = reference.ragged_paged_attention_reference(*case.args(), **case.scale_kwargs(),
                                                          sm_scale=0.2)
        out = kernel(*args)
        with jax.set_mesh(mesh):  # a context mesh is found the same way
            out_ctx = kernel(*args)
        ref_jaxpr = str(jax.make_jaxpr(
            lambda *a: attend(*a, impl=dispatch.AttentionImpl.REFERENCE))(*args))
        rel = lambda o: float(jnp.max(jnp.abs(o - want)) / jnp.max(jnp.abs(want)))
        result[str(quantized)] = dict(
            err=rel(out), err_ctx=rel(out_ctx),
            kernel_shard_map="shard_map" in str(jax.make_jaxpr(kernel)(*args)),
            reference_shard_map="shard_map" in ref_jaxpr,
            out_spec=[str(a) for a in out.sharding.spec])
    print("RESULT" + json.dumps(result))
""")


@pytest.mark.slow
def test_pallas_under_mesh_shards_over_kv_heads_and_matches_reference():
    for quantized, r in run_on_cpu_devices(SCRIPT, 4).items():
        assert r["kernel_shard_map"], quantized
        assert not r["reference_shard_map"], quantized  # GSPMD partitions the reference itself
        assert r["err"] < 1e-5 and r["err_ctx"] < 1e-5, (quantized, r)
        assert r["out_spec"] == ["None", "model", "None"], quantized

"""Tensor-parallel sharding on a 4-device CPU mesh gives the same tokens as one device.

JAX fixes its device count at start-up, so the check runs in a subprocess with
`--xla_force_host_platform_device_count=4`.
"""

from __future__ import annotations

import textwrap

import pytest

from pijax.testing import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import json
    import jax
    from pijax import LLM, SamplingParams
    prompts = [[5, 6, 7], list(range(40)), list(range(100, 121))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    result = {"devices": len(jax.devices())}
    for mesh in [(1, 1), (1, 2), (1, 4)]:
        # 4 kv heads so a model axis of 4 divides them.
        llm = LLM("tiny-random-4kv", mesh_shape=mesh, num_pages=64, max_num_seqs=4,
                  max_num_batched_tokens=64, max_model_len=256)
        eng = llm.engine
        k = eng.kv_pool[0].k
        q = eng.model.params["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
        # Read the pool's layout before generating: each step donates the pool it is given.
        result[str(mesh)] = {
            "pool_spec": [str(a) for a in k.sharding.spec],
            "pool_devices": len(k.sharding.device_set),
            "pool_shard_heads": k.addressable_shards[0].data.shape[2],
            "q_spec": [str(a) for a in q.sharding.spec],
        }
        result[str(mesh)]["tokens"] = [o.token_ids for o in llm.generate(prompts, params)]
        k = eng.kv_pool[0].k
        result[str(mesh)]["pool_spec_after"] = [str(a) for a in k.sharding.spec]
    print("RESULT" + json.dumps(result))
""")


@pytest.mark.slow
def test_mesh_1x2_and_1x4_match_one_device():
    r = run_on_cpu_devices(SCRIPT, 4)
    assert r["devices"] == 4
    one = r["(1, 1)"]
    for mesh, n in [("(1, 2)", 2), ("(1, 4)", 4)]:
        assert r[mesh]["tokens"] == one["tokens"], mesh
        assert r[mesh]["pool_spec"] == ["data", "None", "model", "None"]
        assert r[mesh]["pool_spec_after"] == r[mesh]["pool_spec"], "a step changed the layout"
        assert r[mesh]["pool_devices"] == n
        assert r[mesh]["pool_shard_heads"] == 4 // n
        assert r[mesh]["q_spec"] == ["None", "model"]

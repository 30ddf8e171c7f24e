"""Tensor parallelism on any head count: a model axis larger than the kv heads replicates each kv
head over the extra devices, and the vocabulary is sharded; greedy tokens equal one device's.

(1, 4) on tiny-random (2 kv heads, 4 query heads) and (1, 8) on tiny-random-4kv (4 kv heads,
8 query heads), on 8 fake CPU devices, and the interpreted Pallas kernels with an int8 pool
on (1, 4); JAX fixes its device count at start-up, so the check runs
in a subprocess.
"""

from __future__ import annotations

import textwrap

import pytest

from pijax.testing import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    from pijax import LLM, SamplingParams

    def spec(x):
        return [str(a) for a in x.sharding.spec]

    prompts = [[5, 6, 7], list(range(40)), list(range(100, 121))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    result = {"devices": len(jax.devices())}
    for model, meshes in [("tiny-random", [(1, 1), (1, 4)]), ("tiny-random-4kv", [(1, 1), (1, 8)])]:
        for mesh in meshes:
            llm = LLM(model, mesh_shape=mesh, num_pages=64, max_num_seqs=4,
                      max_num_batched_tokens=64, max_model_len=256)
            eng = llm.engine
            k = eng.kv_pool[0].k
            attn = eng.model.params["layers"][0]["self_attn"]
            kp = attn["k_proj"]["kernel"][...]
            emb = eng.model.params["embed_tokens"]["embedding"][...]
            head = eng.model.params["lm_head"]["kernel"][...]
            r = {
                "kv_heads": eng.model.config.num_kv_heads,
                "replicas": eng.model.kv_head_replicas,
                "pool_spec": spec(k),
                "pool_heads": k.shape[2],
                "pool_shard_heads": k.addressable_shards[0].data.shape[2],
                "k_proj_shard": list(kp.addressable_shards[0].data.shape),
                "head_dim": eng.model.config.head_dim,
                "embed_spec": spec(emb),
                "embed_shard": list(emb.addressable_shards[0].data.shape),
                "lm_head_spec": spec(head),
                "num_pages": eng.blocks.num_usable_pages,
            }
            # Each kv head's copies hold the same weights (head j of the widened projection is
            # head j // replicas of the checkpoint's).
            d = r["head_dim"]
            full = np.asarray(kp).reshape(kp.shape[0], -1, d)
            reps = r["replicas"]
            r["copies_equal"] = bool(all(
                np.array_equal(full[:, j], full[:, (j // reps) * reps]) for j in range(full.shape[1])
            ))
            r["tokens"] = [o.token_ids for o in llm.generate(prompts, params)]
            result[f"{model} {mesh}"] = r
    # The Pallas kernels (interpreted) under dispatch's shard_map over the model axis, with
    # replicated kv heads and an int8 pool (scales sharded like the pages).
    for mesh, impl in [((1, 1), "reference"), ((1, 4), "pallas_interpret")]:
        llm = LLM("tiny-random", mesh_shape=mesh, attention_impl=impl, kv_cache_dtype="int8",
                  skip_kv_quant_gate=True,
                  num_pages=64, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)
        # Read the layout before generating: each step donates the pool it is given.
        heads = llm.engine.kv_pool[0].k_scale.addressable_shards[0].data.shape[2]
        result[f"int8 {mesh}"] = {
            "scale_shard_heads": heads,
            "tokens": [o.token_ids for o in llm.generate(prompts[:2], params)],
        }
    print("RESULT" + json.dumps(result))
""")


@pytest.mark.slow
def test_model_axis_beyond_kv_heads_matches_one_device():
    r = run_on_cpu_devices(SCRIPT, 8, timeout=900)
    assert r["devices"] == 8
    for model, mesh, kv, n in [
        ("tiny-random", "(1, 4)", 2, 4),
        ("tiny-random-4kv", "(1, 8)", 4, 8),
    ]:
        one, tp = r[f"{model} (1, 1)"], r[f"{model} {mesh}"]
        assert tp["tokens"] == one["tokens"], (model, mesh)
        assert one["replicas"] == 1 and one["pool_heads"] == kv
        # Each kv head on n // kv devices: the pool stores n heads, one per device.
        assert tp["kv_heads"] == kv and tp["replicas"] == n // kv
        assert tp["pool_heads"] == n and tp["pool_shard_heads"] == 1
        assert tp["pool_spec"] == ["data", "None", "model", "None"]
        assert tp["k_proj_shard"] == [128, tp["head_dim"]]
        assert tp["copies_equal"]
        # Vocabulary-parallel embedding and LM head (vocab 320).
        assert tp["embed_spec"] == ["model", "None"] and tp["embed_shard"] == [320 // n, 128]
        assert tp["lm_head_spec"] == ["None", "model"]
        # Explicit num_pages: the same page count whatever the mesh.
        assert tp["num_pages"] == one["num_pages"]
    kernel, ref = r["int8 (1, 4)"], r["int8 (1, 1)"]
    assert kernel["tokens"] == ref["tokens"]
    assert kernel["scale_shard_heads"] == 1 and ref["scale_shard_heads"] == 2

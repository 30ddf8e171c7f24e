"""A data axis that does work: on a (2, 2) mesh the pool's pages are split over `data`, each shard
holds only its own requests' KV, the greedy tokens equal one device's, prefix reuse and sessions
still hit, and a (2, 1) mesh holds twice the KV of (1, 1) at the same per-device byte budget.

JAX fixes its device count at start-up, so the checks run in a subprocess on 4 fake CPU devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pijax.testing import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    from pijax import LLM, SamplingParams
    from pijax.request import PromptSegment, Scope

    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 40, 21, 70, 9, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    opts = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)
    result = {"devices": len(jax.devices())}

    def spec(x):
        return [str(a) for a in x.sharding.spec]

    # Capacity: the same per-device byte budget on every mesh.
    for mesh in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        llm = LLM("tiny-random", mesh_shape=mesh, kv_cache_memory_bytes=1 << 20, **opts)
        result[f"capacity {mesh}"] = llm.engine.kv_capacity_tokens
        del llm

    for mesh in [(1, 1), (2, 1), (2, 2)]:
        llm = LLM("tiny-random", mesh_shape=mesh, num_pages=64, **opts)
        eng = llm.engine
        k = eng.kv_pool[0].k
        r = {"pool_spec": spec(k), "pool_shape": list(k.shape),
             "shard_shape": list(k.addressable_shards[0].data.shape)}
        # Drive the engine by hand to see where every request's pages are while it runs.
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", p, params)
        shard_of, pages, tokens, steps_on = {}, {}, {}, set()
        while eng.has_unfinished_requests():
            for out in eng.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            inflight = eng._inflight
            if inflight is not None:
                steps_on |= {s.shard for s in inflight.plan.seqs}
                for s in inflight.plan.seqs:
                    shard_of[s.request_id] = s.shard
                    pages.setdefault(s.request_id, set()).update(s.block_ids)
        r["tokens"] = [tokens[f"r{i}"] for i in range(len(prompts))]
        r["shards_used"] = sorted(steps_on)
        # Each shard's part of the pool (device data): the pages written are exactly those its
        # requests were given (its null page aside, which padding writes).
        d_shards = mesh[0]
        k = np.asarray(eng.kv_pool[0].k, np.float32).reshape(d_shards, 64, -1)
        written = []
        for d in range(d_shards):
            nonzero = set(np.flatnonzero(np.abs(k[d]).sum(-1) > 0).tolist()) - {0}
            mine = set().union(*[pages[rid] for rid, s in shard_of.items() if s == d])
            written.append(nonzero == mine and bool(mine))
        r["each_shard_holds_its_own"] = written
        r["free_after"] = eng.blocks.num_free_pages() == eng.blocks.num_usable_pages
        result[str(mesh)] = r

    # Quantized pages (scales split like the pages) and the interpreted Pallas kernel, per shard.
    for mesh, impl in [((1, 1), "reference"), ((2, 2), "auto"), ((2, 1), "pallas_interpret")]:
        llm = LLM("tiny-random", mesh_shape=mesh, attention_impl=impl, kv_cache_dtype="int8",
                  skip_kv_quant_gate=True, num_pages=64, **opts)
        result[f"int8 {mesh}"] = [o.token_ids for o in llm.generate(prompts[:3], params)]

    # Prefix reuse and sessions on (2, 2).
    llm = LLM("tiny-random", mesh_shape=(2, 2), num_pages=64, warmup=True, **opts)
    eng = llm.engine
    warm = eng.compile_count
    policy = rng.integers(0, 256, 48).tolist()
    eng.register_trusted_prefix("policy", policy, source="test")

    def run(rid, prompt, **kw):
        eng.add_request(rid, prompt, params, tenant="A", **kw)
        req = eng._requests[rid]
        shard = eng.kv.shard_of(req)
        while eng.has_unfinished_requests():
            eng.step()
        return shard, req.num_cached_prompt_tokens

    def claim(n):
        return [PromptSegment(tuple(policy), Scope.parse("shared:policy")),
                PromptSegment(tuple(rng.integers(0, 256, n).tolist()), Scope())]

    zones = frozenset({"policy"})
    reuse = [run("p0", claim(20), permitted_zones=zones)]
    eng.add_request("busy", prompts[3], params)  # load the policy's shard
    reuse.append(run("p1", claim(30), permitted_zones=zones))
    s1 = run("s-1", prompts[1], session_id="sess")
    turn2 = prompts[1] + [7] * 8 + prompts[0]
    eng.add_request("busy2", prompts[3], params)
    s2 = run("s-2", turn2, session_id="sess")
    result["reuse"] = reuse
    result["session"] = [s1, s2]
    result["hits"] = eng.stats().prefix_hits_by_zone
    result["compiles_after_warmup"] = eng.compile_count - warm
    print("RESULT" + json.dumps(result))
""")


@pytest.mark.slow
def test_data_axis_splits_the_pool_and_matches_one_device():
    r = run_on_cpu_devices(SCRIPT, 4, timeout=800)
    assert r["devices"] == 4

    one = r["capacity (1, 1)"]
    assert r["capacity (2, 1)"] == 2 * one  # a (2, 1) mesh holds twice the KV of (1, 1)
    # kv heads split over `model`: a page costs half per device (one null page, not two).
    assert r["capacity (1, 2)"] >= 2 * one
    assert r["capacity (2, 2)"] == 2 * r["capacity (1, 2)"]

    base = r["(1, 1)"]
    for mesh, heads in [("(2, 1)", 2), ("(2, 2)", 1)]:
        m = r[mesh]
        assert m["tokens"] == base["tokens"], mesh
        assert m["pool_spec"] == ["data", "None", "model", "None"]
        assert m["pool_shape"][0] == 128 and m["shard_shape"][:1] == [64], mesh
        assert m["shard_shape"][2] == heads
        assert m["shards_used"] == [0, 1], "both data shards ran requests"
        assert m["each_shard_holds_its_own"] == [True, True]
        assert m["free_after"]
    assert base["each_shard_holds_its_own"] == [True]

    assert r["int8 (2, 2)"] == r["int8 (1, 1)"]
    assert r["int8 (2, 1)"] == r["int8 (1, 1)"]

    (s0, cached0), (s1, cached1) = r["reuse"]
    assert cached0 == 0 and cached1 == 48  # the policy's 3 full pages
    assert s1 == s0, "a cached shared prefix draws the request to its shard"
    (h1, c1), (h2, c2) = r["session"]
    assert h2 == h1 and c1 == 0 and c2 >= 32  # the first turn's full pages, kept by the session
    assert r["hits"]["policy"] == 3
    assert r["compiles_after_warmup"] == 0  # warm-up covers every per-shard bucket


SERVE_KEYS = {"key-ops": {"tenant": "ops", "zones": ["*"], "admin": True}}


@pytest.mark.slow
def test_serve_on_a_2x1_mesh_holds_twice_the_kv_and_serves(tmp_path):
    """`serve.py --mesh=2,1` at the same per-device budget as one device: twice the pages
    (ModelInfo), and a served greedy request gives one device's tokens."""
    import grpc

    from pijax import LLM, SamplingParams
    from pijax.serving.proto.pijax.v1 import inference_pb2 as pb
    from pijax.serving.proto.pijax.v1 import inference_pb2_grpc as pb_grpc

    root = Path(__file__).resolve().parents[2]
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(SERVE_KEYS))
    fraction = 1 / 1024  # of the 1 GiB a CPU device is budgeted: 1 MiB of KV per device
    engine = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)
    one = LLM("tiny-random", memory_fraction=fraction, **engine)
    prompt = list(range(30, 70))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = one.generate([prompt], params)[0].token_ids
    one_pages = one.engine.blocks.num_usable_pages

    cmd = [sys.executable, str(root / "scripts" / "serve.py"), "--model=tiny-random"]
    cmd += ["--mesh=2,1", "--port=0", "--metrics_port=-1", "--http_port=0", "--warmup=off"]
    cmd += [f"--api_keys={keys}", f"--memory_fraction={fraction}"]
    cmd += [f"--{k}={v}" for k, v in engine.items()]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(root),
    )
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        for line in proc.stdout:  # ends at exit, so a failed start cannot hang here
            lines.append(line)
            if "pijax server ready on" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
                break
        else:
            pytest.fail("serve.py exited before it was ready:\n" + "".join(lines[-30:]))
        auth = (("authorization", "Bearer key-ops"),)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=auth, timeout=120)
            assert list(info.mesh_shape) == [2, 1]
            assert info.num_pages == 2 * one_pages
            req = pb.GenerateRequest(
                prompt=[pb.PromptSegment(token_ids=pb.TokenIds(ids=prompt))],
                sampling=pb.SamplingParams(temperature=0.0),
                max_tokens=8,
                ignore_eos=True,
            )
            got = [t for r in stub.Generate(req, metadata=auth, timeout=300) for t in r.token_ids]
        assert got == expected
    finally:
        proc.kill()
        proc.wait(timeout=30)

"""The engine through the Pallas kernels (interpret mode on CPU) gives the reference's tokens.

Greedy decoding of a random model is a sharp check: one wrong attention row anywhere in the
prompt or in a decode step changes a later argmax. The prompts are sized so the token budget
forces chunked prefill beside running decodes: steps mix prefill chunks and decode tokens.
"""

from __future__ import annotations

import textwrap

import pytest

import pijax.engine
from pijax import LLM, SamplingParams
from pijax.testing import run_on_cpu_devices

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
# A short prompt that starts decoding at once, a long one prefilled in chunks of the 32-token
# budget beside it, and two more that join while the long one is still prefilling.
PROMPTS = [[5, 6, 7], list(range(30, 80)), list(range(100, 121)), [9] * 17]


def greedy(impl: str, **overrides) -> list[list[int]]:
    llm = LLM(
        "tiny-random",
        attention_impl=impl,
        num_pages=48,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_model_len=64,
        **overrides,
    )
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.slow
def test_pallas_interpret_matches_reference_on_mixed_batches(monkeypatch):
    q_lens = []
    build = pijax.engine.build_step_input

    def recording(plan, *args, **kwargs):
        q_lens.append(sorted(s.num_new_tokens for s in plan.seqs))
        return build(plan, *args, **kwargs)

    monkeypatch.setattr(pijax.engine, "build_step_input", recording)
    assert greedy("pallas_interpret") == greedy("reference")
    assert any(q[0] == 1 and q[-1] > 1 for q in q_lens), (
        f"no step mixed prefill and decode: {q_lens}"
    )


SHARDED = textwrap.dedent("""
    import json
    import jax
    from pijax import LLM, SamplingParams
    from pijax.kernels import dispatch

    sharded_calls = []
    wrap = dispatch._shard_over_kv_heads
    def counting(*args):
        sharded_calls.append(1)  # runs while tracing: one per layer per compiled step
        return wrap(*args)
    dispatch._shard_over_kv_heads = counting

    prompts = [[5, 6, 7], list(range(40)), list(range(100, 121))]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    result = {"devices": len(jax.devices())}
    for impl, mesh in [("reference", (1, 1)), ("pallas_interpret", (1, 4))]:
        llm = LLM("tiny-random-4kv", mesh_shape=mesh, attention_impl=impl, num_pages=64,
                  max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)
        result[impl] = [o.token_ids for o in llm.generate(prompts, params)]
    result["sharded_calls"] = len(sharded_calls)
    print("RESULT" + json.dumps(result))
""")


@pytest.mark.slow
def test_pallas_interpret_on_1x4_mesh_matches_reference_on_one_device():
    r = run_on_cpu_devices(SHARDED, 4)
    assert r["devices"] == 4
    assert r["sharded_calls"] > 0, "the kernels ran without shard_map on a 1x4 mesh"
    assert r["pallas_interpret"] == r["reference"]

"""Trust-zone prefix reuse, sessions and preemption through the real engine (tiny random model).

The adversarial cases: another tenant sending byte-identical claim text must reuse nothing, and
the audit log must record exactly the reuses that happened.
"""

from __future__ import annotations

import numpy as np
import pytest

from pijax import LLM, SamplingParams
from pijax.engine import Engine
from pijax.request import PromptSegment, Scope

PAGE = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
rng = np.random.default_rng(3)
POLICY = rng.integers(0, 256, 4 * PAGE).tolist()  # a 64-token "policy scaffold"
CLAIM = rng.integers(0, 256, 40).tolist()


def make_engine(**kw) -> Engine:
    opts = dict(num_pages=128, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1024)
    opts.update(kw)
    return LLM("tiny-random", **opts).engine


def run(
    engine: Engine,
    rid: str,
    prompt,
    *,
    tenant="A",
    zones=frozenset({"policy"}),
    session=None,
    params=GREEDY,
):
    engine.add_request(
        rid, prompt, params, tenant=tenant, session_id=session, permitted_zones=zones
    )
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                final = out
    return final


def claim(scope: str) -> list[PromptSegment]:
    return [
        PromptSegment(tuple(POLICY), Scope.parse("shared:policy")),
        PromptSegment(tuple(CLAIM), Scope.parse(scope)),
    ]


@pytest.fixture(scope="module")
def engine():
    eng = make_engine()
    eng.register_trusted_prefix("policy", POLICY, source="test")
    return eng


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["private", "tenant", "session:case-1"])
def test_other_tenant_reuses_nothing_of_a_claim(engine, scope):
    session = "case-1" if scope.startswith("session") else None
    run(engine, f"a-{scope}", claim(scope), tenant="A", session=session)
    # B sends exactly A's claim text, with no shared zone permitted: nothing may match.
    out = run(engine, f"b-{scope}", claim(scope), tenant="B", zones=frozenset(), session=session)
    assert out.num_cached_tokens == 0
    reuse = engine.read_audit_log(kind="reuse", request_id=f"b-{scope}")
    assert reuse == []


def test_registered_policy_prefix_is_reused_by_permitted_tenants_only(engine):
    engine.clear_prefix_cache()
    a = run(engine, "pa", claim("private"), tenant="A")
    b = run(engine, "pb", claim("private"), tenant="B")
    c = run(engine, "pc", claim("private"), tenant="C", zones=frozenset())
    assert a.num_cached_tokens == 0 or a.num_cached_tokens == len(POLICY)
    assert b.num_cached_tokens == len(POLICY)  # only the shared scaffold, never the claim
    assert c.num_cached_tokens == 0
    assert [
        r["request_id"]
        for r in engine.read_audit_log(kind="reuse", zone="policy")
        if r["request_id"] in ("pa", "pb", "pc")
    ] == (["pb"] if a.num_cached_tokens == 0 else ["pa", "pb"])


def test_unregistered_shared_segment_is_private(engine):
    fake = rng.integers(0, 256, 4 * PAGE).tolist()
    segs = [
        PromptSegment(tuple(fake), Scope.parse("shared:policy")),
        PromptSegment(tuple(CLAIM), Scope()),
    ]
    run(engine, "u1", segs, tenant="A")
    out = run(engine, "u2", segs, tenant="B")
    assert out.num_cached_tokens == 0


def test_audit_records_match_actual_reuses(engine):
    before = len(engine.read_audit_log(kind="reuse"))
    reused = 0
    for i in range(4):
        out = run(engine, f"aud{i}", claim("private"), tenant="AB"[i % 2])
        reused += out.num_cached_tokens > 0
    records = engine.read_audit_log(kind="reuse")[before:]
    assert len(records) == reused
    assert all("tokens" not in r and "token_ids" not in r for r in records)


@pytest.mark.slow
def test_greedy_identical_with_and_without_reuse_and_across_chunk_sizes():
    prompts = [claim("private"), claim("tenant")]
    results = []
    for reuse, budget in [(False, 64), (True, 64), (True, 16), (True, 128)]:
        eng = make_engine(enable_prefix_reuse=reuse, max_num_batched_tokens=budget)
        eng.register_trusted_prefix("policy", POLICY)
        toks = []
        for i, p in enumerate(prompts * 2):
            toks.append(run(eng, f"g{i}", p).token_ids)
        results.append(toks)
    assert all(r == results[0] for r in results[1:])


@pytest.mark.slow  # 20 s; overlap's preemption case covers the fast lane
def test_greedy_identical_under_forced_preemption(monkeypatch):
    # Admission that projects no growth, so the pool runs out and preemption happens.
    monkeypatch.setattr("pijax.scheduler.GROWTH_RATIO_INIT", 0.0)
    monkeypatch.setattr("pijax.scheduler.GROWTH_RATIO_MIN", 0.0)
    prompts = [[int(x) for x in rng.integers(0, 256, n)] for n in (30, 45, 60, 20)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    roomy = LLM(
        "tiny-random", num_pages=128, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256
    )
    tight = LLM(
        "tiny-random", num_pages=14, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256
    )  # 13 usable pages: not enough for all four at once
    ref = [o.token_ids for o in roomy.generate(prompts, params)]
    got = [o.token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.stats().num_preemptions > 0
    assert got == ref


def test_session_resume_prefills_only_new_tokens_and_matches_full_prefill():
    eng = make_engine()
    turn1 = rng.integers(0, 256, 50).tolist()
    out1 = run(eng, "s1", turn1, tenant="A", session="inv-7")
    tool_output = rng.integers(0, 256, 30).tolist()
    turn2 = turn1 + out1.token_ids + tool_output
    out2 = run(eng, "s2", turn2, tenant="A", session="inv-7")
    assert out2.num_cached_tokens >= (len(turn1) + len(out1.token_ids)) // PAGE * PAGE - PAGE
    assert out2.num_cached_tokens > 0
    fresh = make_engine(enable_prefix_reuse=False)
    assert run(fresh, "f", turn2, tenant="A").token_ids == out2.token_ids
    # Another tenant with the same session id gets nothing of it.
    assert run(eng, "s3", turn2, tenant="B", session="inv-7").num_cached_tokens == 0
    assert eng.end_session("A", "inv-7")
    assert not eng.end_session("A", "inv-7")
    assert eng.end_session("B", "inv-7")  # B's same-named session is its own
    assert eng.stats().pages_held_by_sessions == 0


def test_overload_raises_without_disturbing_running_requests():
    from pijax.request import OverloadedError

    eng = make_engine(max_waiting=2, max_num_seqs=1)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eng.add_request("run", [1, 2, 3], params)
    eng.step()
    eng.add_request("w1", [4, 5], params)
    eng.add_request("w2", [6, 7], params)
    with pytest.raises(OverloadedError):
        eng.add_request("w3", [8], params)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert sorted(done) == ["run", "w1", "w2"]
    assert all(len(o.token_ids) == 8 for o in done.values())

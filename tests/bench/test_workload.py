"""The payment-integrity mix generator: a pure function of its config and seed, with the shape the
design asks for (log-normal claims with an institutional tail, sessions of 1-3 follow-ups with
200-800 tool tokens, Poisson gaps), and prompts scoped by trust zone."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from pijax.request import ScopeKind
from pijax.workload import (
    POLICY_ZONE,
    ClaimKind,
    LogNormal,
    WorkloadConfig,
    generate_workload,
    text_tokens,
)


def zeros(rng, n):  # a cheap token source: shapes do not depend on token content
    return (0,) * n


@pytest.fixture(scope="module")
def big():
    """Many conversations, so shares and medians are close to their configured values."""
    return generate_workload(WorkloadConfig(num_conversations=4000, seed=3), tokens=zeros)


def test_same_seed_same_request_list():
    cfg = WorkloadConfig(num_conversations=20, seed=11)
    a, b = generate_workload(cfg), generate_workload(cfg)
    assert a == b
    assert a.arrival_times(2.0) == b.arrival_times(2.0)


def test_other_seed_other_request_list():
    a = generate_workload(WorkloadConfig(num_conversations=20, seed=1))
    b = generate_workload(WorkloadConfig(num_conversations=20, seed=2))
    assert a.policy != b.policy
    assert [c.turns for c in a.conversations] != [c.turns for c in b.conversations]


def test_token_source_changes_content_not_shape():
    cfg = WorkloadConfig(num_conversations=30, seed=5)
    a = generate_workload(cfg)
    b = generate_workload(cfg, tokens=text_tokens(lambda text: [len(w) for w in text.split()]))

    def shape(w):
        return [
            (
                c.kind,
                c.tenant,
                c.session_id,
                c.unit_gap,
                [(len(t.new_tokens), t.output_len) for t in c.turns],
            )
            for c in w.conversations
        ]

    assert shape(a) == shape(b)
    assert a.policy != b.policy


def test_random_tokens_stay_in_range():
    w = generate_workload(WorkloadConfig(num_conversations=10, token_range=(5, 9)))
    ids = set(w.policy) | {t for c in w.conversations for turn in c.turns for t in turn.new_tokens}
    assert ids <= set(range(5, 9)) and len(ids) == 4


def test_policy_scaffold_length():
    assert len(generate_workload(WorkloadConfig(num_conversations=1)).policy) == 1024
    w = generate_workload(WorkloadConfig(num_conversations=1, policy_tokens=300))
    assert len(w.policy) == 300


def test_claim_mix_and_long_tail(big):
    cfg = big.config
    convs = big.conversations
    inst = [c.claim_tokens for c in convs if c.kind is ClaimKind.INSTITUTIONAL]
    prof = [c.claim_tokens for c in convs if c.kind is ClaimKind.PROFESSIONAL]
    assert len(inst) / len(convs) == pytest.approx(cfg.institutional_share, abs=0.03)
    # Medians sit at the configured ones (clipping and the context cut touch only the tails).
    assert np.median(prof) == pytest.approx(cfg.professional_claim.median, rel=0.06)
    assert np.median(inst) == pytest.approx(cfg.institutional_claim.median, rel=0.06)
    # Log-normal: the log-lengths' spread is sigma (away from the clip points).
    assert np.std(np.log(prof)) == pytest.approx(cfg.professional_claim.sigma, rel=0.15)
    # The long tail: institutional claims with attachments run to several thousand tokens.
    assert max(inst) >= 2500 and np.percentile(inst, 99) > 4 * np.median(prof)
    assert min(prof) >= cfg.professional_claim.lo and max(inst) <= cfg.institutional_claim.hi


def test_sessions_follow_ups_and_context(big):
    cfg = big.config
    convs = big.conversations
    sessions = [c for c in convs if c.session_id is not None]
    # A drawn session whose first follow-up would overflow the context ends as a single review,
    # so the realized share is at most the configured one, and close to it.
    assert 0.8 * cfg.session_share <= len(sessions) / len(convs) <= cfg.session_share + 0.02
    for c in convs:
        assert (len(c.turns) > 1) == (c.session_id is not None)
        assert 1 <= len(c.turns) <= 1 + cfg.follow_up_turns[1]
        for t in c.turns[1:]:
            assert cfg.tool_tokens[0] <= len(t.new_tokens) <= cfg.tool_tokens[1]
        last = len(c.turns) - 1
        assert big.prompt_len(c, last) + c.turns[last].output_len <= cfg.max_context
    assert {len(c.turns) - 1 for c in sessions} == {1, 2, 3}
    outputs = [t.output_len for c in convs for t in c.turns]
    assert min(outputs) >= 1 and max(outputs) <= cfg.max_tokens_cap


def test_poisson_gaps_and_rate_scaling(big):
    gaps = np.array([c.unit_gap for c in big.conversations])
    assert gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential(1)
    assert np.std(gaps) == pytest.approx(1.0, rel=0.08)
    t1, t4 = big.arrival_times(1.0), big.arrival_times(4.0)
    assert np.all(np.diff(t1) >= 0)
    np.testing.assert_allclose(np.array(t1) / 4.0, t4)  # a rate sweep replays the same list
    with pytest.raises(ValueError, match="rate"):
        big.arrival_times(0.0)


def test_prompt_segments_carry_trust_zones():
    w = generate_workload(WorkloadConfig(num_conversations=40, seed=2))
    single = next(c for c in w.conversations if c.session_id is None)
    policy, own = w.prompt(single, [], 0)
    assert policy.scope.kind is ScopeKind.SHARED and policy.scope.name == POLICY_ZONE
    assert policy.content == w.policy
    assert own.scope.kind is ScopeKind.PRIVATE and own.content == single.turns[0].new_tokens
    sess = next(c for c in w.conversations if c.session_id is not None)
    history = list(sess.turns[0].new_tokens) + [1] * sess.turns[0].output_len
    _, own = w.prompt(sess, history, 1)
    assert own.scope.kind is ScopeKind.SESSION and own.scope.name == sess.session_id
    assert own.content == tuple(history) + sess.turns[1].new_tokens
    assert len(policy.content) + len(own.content) == w.prompt_len(sess, 1)


def test_summary_counts():
    w = generate_workload(WorkloadConfig(num_conversations=25, seed=4))
    s = w.summary()
    assert s["conversations"] == 25 and s["requests"] == w.num_requests
    assert s["sessions"] == sum(c.session_id is not None for c in w.conversations)
    assert s["output_tokens"]["total"] == sum(
        t.output_len for c in w.conversations for t in c.turns
    )


def test_config_from_dict_and_validation():
    cfg = WorkloadConfig.from_dict(
        {
            "num_conversations": 3,
            "tool_tokens": [10, 20],
            "narrative_output": {"median": 5, "sigma": 0.1, "lo": 1, "hi": 9},
        }
    )
    assert cfg.tool_tokens == (10, 20) and cfg.narrative_output == LogNormal(5, 0.1, 1, 9)
    assert WorkloadConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown workload field"):
        WorkloadConfig.from_dict({"num_convs": 3})
    with pytest.raises(ValueError, match="session_share"):
        WorkloadConfig(session_share=1.5)
    with pytest.raises(ValueError, match="max_context"):
        WorkloadConfig(policy_tokens=4000, max_context=4000)
    with pytest.raises(ValueError, match="LogNormal"):
        LogNormal(median=0, sigma=1, lo=1, hi=2)
    assert dataclasses.replace(cfg, seed=9).seed == 9
    assert math.isfinite(LogNormal(10, 0.5, 1, 100).sample(np.random.default_rng(0)))

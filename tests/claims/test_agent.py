"""The review agent's investigation turns: the tool calls, the FAKE lookups, how the turns are
trained (token for token what the agent sends) and the oversampling of hard flag types."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pijax.claims import agent, train
from pijax.claims.prompt import END, render_claim_segment, render_target


def test_tool_calls_ask_for_each_flag_policy_and_line_fee_once():
    codes = {1: "99213", 2: "36415", 3: "36415"}
    calls = agent.tool_calls([("DUPLICATE_BILLING", 3), ("DUPLICATE_BILLING", 2)], codes)
    assert calls.splitlines() == ["policy(DUPLICATE_BILLING)", "fee(36415)"]
    many = [("UNBUNDLING", 1), ("UNITS_EXCEED_MAX", 2), ("MODIFIER_MISUSE", 3)]
    assert len(agent.tool_calls(many, codes).splitlines()) == agent.MAX_TOOL_CALLS
    assert agent.tool_calls([], codes) == "policy(none)"


def test_parse_tool_calls_takes_well_formed_calls_only():
    text = "policy(UNBUNDLING)\nfee(99213)\nfee 99213\npolicy(\nmystery(x)\npolicy(none)"
    assert agent.parse_tool_calls(text) == [
        ("policy", "UNBUNDLING"),
        ("fee", "99213"),
        ("policy", "none"),
    ]
    assert agent.parse_tool_calls("\n".join(["fee(1)"] * 9)) == [("fee", "1")] * 4
    assert agent.parse_tool_calls("noise") == []


def test_tool_output_is_labelled_fake_and_answers_each_call():
    out = agent.tool_output(
        [("policy", "DUPLICATE_BILLING"), ("fee", "99213"), ("policy", "NOPE"), ("fee", "0")]
    )
    lines = out.splitlines()
    assert lines[0] == agent.FAKE_TOOL_BANNER
    assert lines[1].startswith("policy(DUPLICATE_BILLING) -> PI-DUP-01 ")
    assert lines[2].startswith("fee(99213) -> allowed amount ") and "per unit" in lines[2]
    assert lines[3] == "policy(NOPE) -> no such policy in the demo index"
    assert lines[4] == "fee(0) -> not in the demo fee table"
    assert "no well-formed tool call" in agent.tool_output([])
    segment = agent.tool_output_segment([("policy", "none")])
    assert segment.startswith("\n" + agent.FAKE_TOOL_BANNER)
    assert segment.endswith(agent.NARRATIVE_REQUEST)


def test_agent_transcript_is_the_agent_session_piece_by_piece(tokenizer, examples):
    """An agent row is the pieces the agent sends, each tokenized on its own (as the server
    tokenizes each prompt segment), with exactly the model's own turns as targets."""
    corpus = train.encode_examples(tokenizer, examples, agent_share=1.0, seed=0)
    for ex, row in zip(examples[:8], corpus.rows, strict=False):
        codes = {line.number: line.code for line in ex.claim.lines}
        calls = agent.findings_calls(ex.findings, codes)
        pieces = [
            (render_claim_segment(ex.claim), False),
            (render_target(ex.findings, ex.narrative), True),
            (agent.TOOL_REQUEST, False),
            (calls + END, True),
            (agent.tool_output_segment(agent.parse_tool_calls(calls)), False),
            (ex.narrative + END, True),
        ]
        ids, targets = [], []
        for text, is_target in pieces:
            piece = tokenizer.encode(text, add_special_tokens=False).ids
            ids += piece
            targets += [is_target] * len(piece)
        assert row.ids.tolist() == ids
        assert row.targets.tolist() == targets
        # Every flag type the findings carry is looked up, and the narrative cites its policy.
        for flag in ex.findings.flags[:2]:
            assert f"policy({flag.code.value})" in calls
        assert (
            tokenizer.decode(row.ids[row.targets].tolist(), skip_special_tokens=False).count(END)
            == 3
        )


def test_agent_share_is_seeded_and_plain_rows_end_with_the_findings(tokenizer, examples):
    def agent_rows(share, seed):
        rows = train.encode_examples(tokenizer, examples, share, seed).rows
        return [int(np.diff(r.targets.astype(int)).clip(0).sum() > 1) for r in rows]

    a = agent_rows(0.5, 1)
    assert a == agent_rows(0.5, 1)
    assert 5 < sum(a) < 35
    assert sum(agent_rows(0.0, 1)) == 0
    plain = train.encode_examples(tokenizer, examples[:3], 0.0).rows
    for ex, row in zip(examples, plain, strict=False):
        answer = tokenizer.encode(
            render_target(ex.findings, ex.narrative), add_special_tokens=False
        )
        assert row.ids[row.answer_start :].tolist() == answer.ids
        assert row.targets[row.answer_start :].all() and not row.targets[: row.answer_start].any()


def test_focus_flags_oversample_without_repeating():
    base = dict(num_examples=300, data_offset=500, seed=2)
    plain, plain_end = train.training_examples(
        train.TrainConfig(**base, focus_flags=(), focus_share=0.0)
    )
    focus = ("DUPLICATE_BILLING", "DIAGNOSIS_MISMATCH")
    chosen, end = train.training_examples(
        train.TrainConfig(**base, focus_flags=focus, focus_share=0.6)
    )
    assert plain_end == 800 and len(plain) == len(chosen) == 300 and end > 800

    def share(exs):
        return sum(any(f.code.value in focus for f in e.findings.flags) for e in exs) / len(exs)

    assert share(chosen) >= 0.6 > share(plain)
    ids = [e.claim.claim_id for e in chosen]
    assert len(set(ids)) == len(ids)
    kinds = collections.Counter(f.code.value for e in chosen for f in e.findings.flags)
    assert set(kinds) >= {"UNBUNDLING", "UNITS_EXCEED_MAX", "MODIFIER_MISUSE"}
    with pytest.raises(ValueError, match="focus_flags must be flag types"):
        train.TrainConfig(focus_flags=("DUPLICATES",), focus_share=0.5)
    with pytest.raises(ValueError, match="agent_share must be in"):
        train.TrainConfig(agent_share=1.5)

"""The prompt format, the findings schema and the BPE tokenizer trained on the corpus."""

from __future__ import annotations

import json

import pytest

from pijax.claims.bpe import special_token_ids, train_tokenizer, training_texts
from pijax.claims.codes import POLICIES
from pijax.claims.corpus import generate_examples
from pijax.claims.prompt import (
    CLAIM,
    END,
    REVIEW,
    SPECIAL_TOKENS,
    answer_text,
    policy_scaffold,
    render_claim,
    render_claim_segment,
    render_policy_segment,
    render_prompt,
    render_target,
)
from pijax.claims.schema import findings_errors, findings_schema, is_valid_findings


@pytest.fixture(scope="module")
def examples():
    return generate_examples(seed=5, count=120)


@pytest.fixture(scope="module")
def tokenizer(examples):
    return train_tokenizer(training_texts(examples[:100]), vocab_size=600)


def test_policy_scaffold_cites_every_policy():
    text = policy_scaffold()
    for policy in POLICIES.values():
        assert policy.reference in text
    assert "synthetic" in text


def test_prompt_is_policy_segment_then_claim_segment(examples):
    claim = examples[0].claim
    prompt = render_prompt(policy_scaffold(), claim)
    assert prompt == render_policy_segment(policy_scaffold()) + render_claim_segment(claim)
    assert prompt.endswith(REVIEW)
    assert render_claim_segment(claim).startswith(CLAIM)
    for line in claim.lines:
        assert f"\n{line.number} | {line.date} | " in render_claim(claim)


def test_target_is_findings_json_then_stop(examples):
    for ex in examples:
        target = render_target(ex.findings, ex.narrative)
        assert target.endswith(END)
        obj = json.loads(answer_text(target))
        assert obj == ex.findings_json()
        assert list(obj) == list(findings_schema()["properties"])  # schema order


def test_answer_text_cuts_at_stop_tokens():
    assert answer_text(' {"a":1}<|end|>junk') == '{"a":1}'
    assert answer_text('{"a":1}<eos>') == '{"a":1}'
    assert answer_text('{"a":1}') == '{"a":1}'


def test_schema_rejects_malformed_findings(examples):
    good = next(ex for ex in examples if ex.findings.flags).findings_json()
    assert is_valid_findings(good)
    for mutate in (
        lambda o: o["flags"][0].update(confidence=1.5),
        lambda o: o["flags"][0].update(code="UPCODING"),
        lambda o: o["flags"][0].pop("policy_reference"),
        lambda o: o.update(risk_category="severe"),
        lambda o: o.update(recommended_action="pay"),
        lambda o: o.pop("narrative"),
        lambda o: o.update(extra=1),
    ):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        assert findings_errors(bad), bad


def test_schema_compiles_for_llguidance():
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema(findings_schema())
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    assert not is_error, messages
    assert messages == []


def test_special_tokens_come_first(tokenizer):
    ids = special_token_ids(tokenizer)
    assert [ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


def test_prompt_and_target_round_trip_through_tokenizer(tokenizer, examples):
    for ex in examples[100:]:  # claims the tokenizer was not trained on
        text = render_prompt(policy_scaffold(), ex.claim) + render_target(ex.findings, ex.narrative)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_segments_tokenize_independently(tokenizer, examples):
    # The server tokenizes the shared policy segment and the private claim segment apart.
    policy = render_policy_segment(policy_scaffold())
    for ex in examples[100:110]:
        claim = render_claim_segment(ex.claim)
        whole = tokenizer.encode(policy + claim, add_special_tokens=False).ids
        parts = (
            tokenizer.encode(policy, add_special_tokens=False).ids
            + tokenizer.encode(claim, add_special_tokens=False).ids
        )
        assert whole == parts


def test_tokenizer_training_is_deterministic(examples, tokenizer):
    again = train_tokenizer(training_texts(examples[:100]), vocab_size=600)
    assert again.to_str() == tokenizer.to_str()

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


def _pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False).ids]


def test_digits_are_single_tokens_and_copy_token_for_token(tokenizer, examples):
    """Copy-friendly inputs: every digit is its own token, so a claim id, code, date or amount is
    the same token sequence in the claim and in the answer (copying is a token-level copy)."""
    for ex in examples[100:]:
        prompt = render_prompt(policy_scaffold(), ex.claim)
        answer = render_target(ex.findings, ex.narrative)
        for text in (prompt, answer):
            for piece in _pieces(tokenizer, text):
                assert not (any(c.isdigit() for c in piece) and len(piece) > 1), piece
        ids_prompt = tokenizer.encode(prompt, add_special_tokens=False).ids
        ids_answer = tokenizer.encode(answer, add_special_tokens=False).ids
        values = [ex.claim.claim_id]
        for flag in ex.findings.flags:
            line = ex.claim.lines[flag.line - 1]
            values += [line.code, line.date, line.diagnosis]
        for value in values:
            span = tokenizer.encode(value, add_special_tokens=False).ids
            assert "".join(tokenizer.decode([i]) for i in span) == value
            assert _contains(ids_prompt, span), value
            if value in answer:
                assert _contains(ids_answer, span), value
    # Code characters: a diagnosis code splits into its characters around the digits.
    assert _pieces(tokenizer, "S93.401A") == ["S", "9", "3", ".", "4", "0", "1", "A"]


def _contains(seq: list[int], span: list[int]) -> bool:
    return any(seq[i : i + len(span)] == span for i in range(len(seq) - len(span) + 1))


def test_claim_lines_carry_their_codes_edit_data(examples):
    from pijax.claims.codes import DIAGNOSES, PROCEDURES
    from pijax.claims.prompt import GROUP_TAGS, line_edit_data

    for ex in examples[:20]:
        text = render_claim(ex.claim)
        for line in ex.claim.lines:
            proc = PROCEDURES[line.code]
            data = line_edit_data(line.code)
            assert f"max {proc.max_units}" in data and ("E/M" in data) == proc.is_em
            tag = GROUP_TAGS[DIAGNOSES[line.diagnosis].group]
            # The diagnosis and its group close the row, right after the code's edit data.
            row = f"{line.number} | {line.date} | "
            assert any(
                r.startswith(row) and r.endswith(f"| {data} | {line.diagnosis} {tag}")
                for r in text.splitlines()
            ), (row, text)
    # The claim id closes the claim too, right before <|review|>: the answer's first copy.
    claim = examples[0].claim
    assert render_claim(claim).splitlines()[-1].endswith(f" | claim {claim.claim_id}")
    assert line_edit_data("97140") == "max 4; dx MSK INJ; in 97530 59 ok"
    assert line_edit_data("99213") == "E/M; max 1; dx all"
    assert line_edit_data("93010") == "max 1; dx CIR; in 93000"
    for tag in GROUP_TAGS.values():
        assert tag in policy_scaffold()


def test_tokenizer_training_is_deterministic(examples, tokenizer):
    again = train_tokenizer(training_texts(examples[:100]), vocab_size=600)
    assert again.to_str() == tokenizer.to_str()

"""Structured output is an engine feature: `LLM.generate(..., SamplingParams(json_schema=...))`
(or `regex=`, `grammar=`) on the embedded default model returns text that matches.

Greedy decoding under the constraint; a completion that ends (STOP) must parse and validate, and
one that ran out of tokens (LENGTH) fails the test, so the budgets here are generous.
"""

from __future__ import annotations

import json
import re
from importlib import resources

import jsonschema
import pytest

from pijax import LLM, FinishReason, InvalidRequestError, SamplingParams
from pijax.claims.samples import sample_review_prompt

SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "risk": {"enum": ["low", "medium", "high"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["risk", "count", "note"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=2048, max_num_seqs=4, num_pages=513)  # no source: the default model


def findings_schema_text() -> str:
    return (resources.files("pijax.configs") / "schemas" / "findings.schema.json").read_text()


@pytest.mark.slow
def test_json_schema_output_validates_on_the_default_model(llm):
    schema = json.loads(findings_schema_text())
    prompts = [sample_review_prompt(), "Write anything at all:"]
    outs = llm.generate(
        prompts,
        [
            SamplingParams(temperature=0.0, max_tokens=600, json_schema=findings_schema_text()),
            SamplingParams(temperature=0.0, max_tokens=200, json_schema=SMALL_SCHEMA),  # a dict
        ],
    )
    assert [o.finish_reason for o in outs] == [FinishReason.STOP, FinishReason.STOP]
    jsonschema.validate(json.loads(outs[0].text), schema)
    jsonschema.validate(json.loads(outs[1].text), SMALL_SCHEMA)


def test_seeded_sampling_under_a_schema_still_validates(llm):
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=200, json_schema=SMALL_SCHEMA)
        for s in range(3)
    ]
    for out in llm.generate(["Anything:"] * 3, params):
        assert out.finish_reason is FinishReason.STOP
        jsonschema.validate(json.loads(out.text), SMALL_SCHEMA)


def test_regex_and_lark_grammar(llm):
    pattern = r"CLM-[0-9]{4}"
    grammar = 'start: "approve" | "deny" | "review"'
    outs = llm.generate(
        ["Claim id:", "Decision:"],
        [
            SamplingParams(temperature=0.0, max_tokens=40, regex=pattern),
            SamplingParams(temperature=0.0, max_tokens=40, grammar=grammar),
        ],
    )
    assert re.fullmatch(pattern, outs[0].text), outs[0].text
    assert outs[1].text in ("approve", "deny", "review"), outs[1].text
    assert all(o.finish_reason is FinishReason.STOP for o in outs)


def test_unconstrained_requests_batched_with_constrained_ones_are_unchanged(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["Claim id:"], plain)[0].token_ids
    mixed = llm.generate(
        ["Claim id:", "Anything:"],
        [plain, SamplingParams(temperature=0.0, max_tokens=200, json_schema=SMALL_SCHEMA)],
    )
    assert mixed[0].token_ids == alone


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(json_schema="{not json"), "json_schema must be valid JSON"),
        (dict(json_schema='{"type": "strng"}'), "json_schema is not a valid JSON Schema"),
        (dict(regex="(unclosed"), "regex is not supported for structured output"),
        (dict(grammar="start: undefined_rule"), "grammar"),
    ],
)
def test_bad_constraints_are_refused_naming_the_field(llm, kwargs, needle):
    with pytest.raises(InvalidRequestError, match=re.escape(needle)):
        llm.generate(["x"], SamplingParams(**kwargs))
    assert not llm.engine.has_unfinished_requests()


def test_at_most_one_constraint_and_text_only():
    with pytest.raises(InvalidRequestError, match="at most one"):
        SamplingParams(json_schema=SMALL_SCHEMA, regex="a+")
    with pytest.raises(InvalidRequestError, match="regex must be None or non-empty text"):
        SamplingParams(regex="")
    assert SamplingParams(json_schema=SMALL_SCHEMA).structured == (
        "json_schema",
        json.dumps(SMALL_SCHEMA),
    )

"""The claim-review prompt format the default model is trained on.

    <bos><|policy|>{policy scaffold}\n<|claim|>{claim}\n<|review|>{findings JSON}<|end|>

The prompt is two segments, split right before `<|claim|>`:
  * the policy segment (`render_policy_segment`), identical for every claim: what a server puts in
    the `shared:policy` trust zone so its KV pages are computed once;
  * the claim segment (`render_claim_segment`), private to one request.
Because the claim segment opens with a special token, tokenizing the two segments separately
gives exactly the tokens of the whole prompt (a test checks this), so segment boundaries never
shift a token.

The answer is one JSON object, valid against `configs/schemas/findings.schema.json`, with the
investigator narrative as its last field, then `<|end|>` (the stop token).
"""

from __future__ import annotations

import functools
import json

from pijax.claims.claim import PLACES_OF_SERVICE, Claim, ClaimType, Findings, format_money
from pijax.claims.codes import DIAGNOSES, POLICIES

BOS = "<bos>"
EOS = "<eos>"
PAD = "<pad>"
POLICY = "<|policy|>"
CLAIM = "<|claim|>"
REVIEW = "<|review|>"
END = "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, POLICY, CLAIM, REVIEW, END)  # ids 0..6 in the trained tokenizer
STOP_TOKENS = (END, EOS)


@functools.cache
def policy_scaffold() -> str:
    """The policy text every review sees: one synthetic excerpt per policy the reviewer cites.

    Short on purpose: it is in every training sequence, and on a 2-core CPU the training budget is
    counted in tokens. The edit tables themselves (pairs, unit limits, diagnosis support) live in
    `pijax.claims.codes` and are learned from the corpus rather than read from the prompt.
    """
    out = ["Payment integrity policy excerpts (synthetic)."]
    out += [f"{p.reference} {p.title}: {p.text}" for p in POLICIES.values()]
    return "\n".join(out)


def render_claim(claim: Claim) -> str:
    """The claim as the reviewer reads it: a header, the diagnoses, a table of service lines."""
    inst = claim.claim_type is ClaimType.INSTITUTIONAL
    header = [f"claim {claim.claim_id}", claim.claim_type.value]
    if inst:
        header.append(f"bill type {claim.bill_type}")
    header += [
        f"POS {claim.place_of_service} {PLACES_OF_SERVICE[claim.place_of_service]}",
        f"provider {claim.provider_id}",
        f"member {claim.member_id}, {claim.member_age} {claim.member_sex}",
    ]
    columns = (
        ["line", "date"] + (["rev"] if inst else []) + ["code", "mod", "units", "dx", "billed"]
    )
    rows = [
        " | ".join(header),
        "diagnoses " + "; ".join(f"{d} {DIAGNOSES[d].description}" for d in claim.diagnoses),
        " | ".join(columns),
    ]
    for line in claim.lines:
        cells = [str(line.number), line.date] + ([line.revenue_code] if inst else [])
        cells += [
            line.code,
            " ".join(line.modifiers) or "-",
            str(line.units),
            line.diagnosis,
            format_money(line.billed_cents)[1:],
        ]
        rows.append(" | ".join(cells))
    rows.append(f"total billed {format_money(claim.total_billed_cents)}")
    return "\n".join(rows)


def render_policy_segment(policy_text: str) -> str:
    return f"{BOS}{POLICY}{policy_text}\n"


def render_claim_segment(claim: Claim) -> str:
    return f"{CLAIM}{render_claim(claim)}\n{REVIEW}"


def render_prompt(policy_text: str, claim: Claim) -> str:
    return render_policy_segment(policy_text) + render_claim_segment(claim)


def render_findings_json(findings: Findings, narrative: str) -> str:
    # Compact separators: what a JSON-schema constraint without flexible whitespace emits.
    return json.dumps(findings.to_json(narrative), ensure_ascii=False, separators=(",", ":"))


def render_target(findings: Findings, narrative: str) -> str:
    """What the model is trained to answer: the findings JSON, then the stop token."""
    return render_findings_json(findings, narrative) + END


def answer_text(completion: str) -> str:
    """A completion up to (not including) its stop token, stripped: the JSON text to parse."""
    for stop in STOP_TOKENS:
        completion = completion.split(stop, 1)[0]
    return completion.strip()

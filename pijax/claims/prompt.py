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
from pijax.claims.codes import BUNDLING_EDITS, DIAGNOSES, POLICIES, PROCEDURES, DxGroup

BOS = "<bos>"
EOS = "<eos>"
PAD = "<pad>"
POLICY = "<|policy|>"
CLAIM = "<|claim|>"
REVIEW = "<|review|>"
END = "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, POLICY, CLAIM, REVIEW, END)  # ids 0..6 in the trained tokenizer
STOP_TOKENS = (END, EOS)


# Short tags for the diagnosis groups: what the claim's edit-data column and the diagnosis list
# show, so that "does this line's diagnosis support its procedure" is a comparison of tags on one
# row rather than a table the model must have memorized.
GROUP_TAGS: dict[DxGroup, str] = {
    DxGroup.CIRCULATORY: "CIR",
    DxGroup.METABOLIC: "MET",
    DxGroup.RESPIRATORY: "RES",
    DxGroup.MUSCULOSKELETAL: "MSK",
    DxGroup.INJURY: "INJ",
    DxGroup.INFECTION: "INF",
    DxGroup.PREVENTIVE: "PRE",
}


@functools.cache
def policy_scaffold() -> str:
    """The policy text every review sees: one synthetic excerpt per policy the reviewer cites,
    and how to read the edit data that the claim table carries on each line.

    Short on purpose: it is in every training sequence, and on a 2-core CPU the training budget is
    counted in tokens. The edit tables (unit limits, diagnosis support, bundling pairs, E/M codes)
    are not listed here in full (about 800 tokens with one token per digit, attended by every
    claim token); each claim line carries its own code's entries instead (`line_edit_data`), so a
    flag is a lookup on the line's row, chosen by code.
    """
    out = ["Payment integrity policy excerpts (synthetic)."]
    out += [f"{p.reference} {p.title}: {p.text}" for p in POLICIES.values()]
    out.append(
        "Edit data on each line: E/M if the code is a visit; max = daily unit limit; "
        "dx = diagnosis groups that support the code; in X = bundled into X on the same "
        "date (59 ok = modifier 59 allowed). Diagnosis groups: "
        + ", ".join(f"{tag} {g.value}" for g, tag in GROUP_TAGS.items())
        + "."
    )
    return "\n".join(out)


def line_edit_data(code: str) -> str:
    """The policy excerpt for one procedure code (what the claim table shows on its line)."""
    proc = PROCEDURES[code]
    parts = ["E/M"] if proc.is_em else []
    parts.append(f"max {proc.max_units}")
    if proc.supported_by == frozenset(DxGroup):
        parts.append("dx all")
    else:
        parts.append("dx " + " ".join(t for g, t in GROUP_TAGS.items() if g in proc.supported_by))
    for edit in BUNDLING_EDITS:
        if edit.component == code:
            parts.append(f"in {edit.comprehensive}" + (" 59 ok" if edit.modifier_allowed else ""))
    return "; ".join(parts)


def render_claim(claim: Claim) -> str:
    """The claim as the reviewer reads it: a header, the diagnoses, a table of service lines (each
    with the edit data of its code, `line_edit_data`, then its diagnosis and the diagnosis's
    group), the total billed and the claim id.

    The diagnosis closes the row, right after the code's supporting groups (`dx MSK INJ |
    S61.411A INJ`), so that "is this line's group among them" can be decided at one token, the
    group tag, by looking a few tokens back for the same token; with the diagnosis before the
    edit data (stages 1 to 5 of the default model) it was spread over the list's tokens.
    Measured, diagnosis support stays the weakest flag type either way (the model card).

    Per-line amounts are left out: no rule reads them, and with one token per digit they were
    about an eighth of a claim's tokens (the training budget is counted in tokens)."""
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
        ["line", "date"] + (["rev"] if inst else []) + ["code", "mod", "units", "edit data", "dx"]
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
            line_edit_data(line.code),
            f"{line.diagnosis} {GROUP_TAGS[DIAGNOSES[line.diagnosis].group]}",
        ]
        rows.append(" | ".join(cells))
    # The claim id once more, last: the answer opens by copying it, and right before
    # `<|review|>` its digits sit a fixed number of tokens behind the answer's, a copy that
    # one attention head at a fixed relative offset does (from the header, 100 to 500 tokens
    # back, a small model did not learn it within the CPU budget).
    rows.append(f"total billed {format_money(claim.total_billed_cents)} | claim {claim.claim_id}")
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

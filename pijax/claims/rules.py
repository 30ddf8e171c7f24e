"""The rules that decide a claim's findings: the ground truth of the synthetic corpus.

Each policy in `codes.POLICIES` is one small function from a claim to its flags. `review` runs
them all, orders the flags by line (then by policy), and derives the risk category and the
recommended action from the flags alone, so the whole answer is a pure function of the claim.
`narrative` writes the investigator's short explanation, one sentence per flag citing its policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pijax.claims.claim import (
    Action,
    Claim,
    Findings,
    Flag,
    RiskCategory,
    ServiceLine,
)
from pijax.claims.codes import (
    BUNDLING_EDITS,
    DISTINCT_MODIFIER,
    EM_MODIFIER,
    POLICIES,
    PROCEDURES,
    FlagCode,
    bundling_edit,
    dx_supports,
)


def _flag(code: FlagCode, line: ServiceLine, description: str) -> Flag:
    policy = POLICIES[code]
    return Flag(code, line.number, description, policy.reference, policy.confidence)


def duplicate_billing(claim: Claim) -> Iterator[Flag]:
    """A line repeating an earlier line's code, date and modifiers."""
    for j, line in enumerate(claim.lines):
        for earlier in claim.lines[:j]:
            if (earlier.code, earlier.date, earlier.modifiers) == (
                line.code,
                line.date,
                line.modifiers,
            ):
                yield _flag(
                    FlagCode.DUPLICATE_BILLING,
                    line,
                    f"{line.code} on {line.date} repeats line {earlier.number}.",
                )
                break


def unbundling(claim: Claim) -> Iterator[Flag]:
    """A component billed the same date as its comprehensive code, not excused by modifier 59."""
    for line in claim.lines:
        for other in claim.lines:
            if other.date != line.date:
                continue
            edit = bundling_edit(other.code, line.code)
            if edit is None:
                continue
            if edit.modifier_allowed and DISTINCT_MODIFIER in line.modifiers:
                continue
            yield _flag(
                FlagCode.UNBUNDLING,
                line,
                f"{line.code} is bundled into {other.code} on line {other.number}.",
            )
            break


def units_exceed_max(claim: Claim) -> Iterator[Flag]:
    for line in claim.lines:
        limit = PROCEDURES[line.code].max_units
        if line.units > limit:
            yield _flag(
                FlagCode.UNITS_EXCEED_MAX,
                line,
                f"{line.units} units of {line.code} exceed the daily maximum of {limit}.",
            )


def diagnosis_mismatch(claim: Claim) -> Iterator[Flag]:
    for line in claim.lines:
        if not dx_supports(line.diagnosis, line.code):
            yield _flag(
                FlagCode.DIAGNOSIS_MISMATCH,
                line,
                f"Diagnosis {line.diagnosis} does not support {line.code}.",
            )


def modifier_misuse(claim: Claim) -> Iterator[Flag]:
    """Modifier 25 off an E/M code; modifier 59 with no comprehensive partner that day."""
    for line in claim.lines:
        if EM_MODIFIER in line.modifiers and not PROCEDURES[line.code].is_em:
            yield _flag(
                FlagCode.MODIFIER_MISUSE,
                line,
                f"Modifier 25 on {line.code}, which is not an E/M visit.",
            )
        elif DISTINCT_MODIFIER in line.modifiers and not _has_comprehensive_partner(claim, line):
            yield _flag(
                FlagCode.MODIFIER_MISUSE,
                line,
                f"Modifier 59 on {line.code} without a bundling pair that day.",
            )


def _has_comprehensive_partner(claim: Claim, line: ServiceLine) -> bool:
    partners = {e.comprehensive for e in BUNDLING_EDITS if e.component == line.code}
    return any(o.code in partners and o.date == line.date for o in claim.lines)


RULES: dict[FlagCode, Callable[[Claim], Iterator[Flag]]] = {
    FlagCode.DUPLICATE_BILLING: duplicate_billing,
    FlagCode.UNBUNDLING: unbundling,
    FlagCode.UNITS_EXCEED_MAX: units_exceed_max,
    FlagCode.DIAGNOSIS_MISMATCH: diagnosis_mismatch,
    FlagCode.MODIFIER_MISUSE: modifier_misuse,
}
_RULE_ORDER = {code: i for i, code in enumerate(RULES)}


def risk_category(flags: tuple[Flag, ...]) -> RiskCategory:
    levels = (RiskCategory.NONE, RiskCategory.LOW, RiskCategory.MEDIUM, RiskCategory.HIGH)
    return levels[min(len(flags), 3)]


def recommended_action(flags: tuple[Flag, ...]) -> Action:
    if not flags:
        return Action.APPROVE
    if len(flags) >= 3:
        return Action.REFER_TO_SIU
    if all(f.code is FlagCode.DIAGNOSIS_MISMATCH for f in flags):
        return Action.REQUEST_RECORDS
    return Action.DENY_LINES


def review(claim: Claim) -> Findings:
    """The rule-derived findings of a claim (the corpus's ground truth)."""
    flags = [flag for rule in RULES.values() for flag in rule(claim)]
    flags.sort(key=lambda f: (f.line, _RULE_ORDER[f.code]))
    flags = tuple(flags)
    return Findings(claim.claim_id, flags, risk_category(flags), recommended_action(flags))


_CLOSING = {
    Action.APPROVE: "No policy edits apply; pay as billed.",
    Action.DENY_LINES: "Deny the flagged lines and pay the rest.",
    Action.REQUEST_RECORDS: "Pend the flagged lines and request medical records.",
    Action.REFER_TO_SIU: "Several edits on one claim; refer to the special investigations unit.",
}


def narrative(claim: Claim, findings: Findings) -> str:
    """The investigator's note: the claim in a phrase, each flag with its policy, the action."""
    n = len(claim.lines)
    parts = [f"{claim.claim_type.value.capitalize()} claim, {n} line{'s' if n > 1 else ''}."]
    for flag in findings.flags:
        title = POLICIES[flag.code].title.lower()
        parts.append(f"Line {flag.line}: {title} per {flag.policy_reference}.")
    parts.append(_CLOSING[findings.recommended_action])
    return " ".join(parts)

"""The synthetic corpus: deterministic per seed, schema-valid, and consistent with its rules."""

from __future__ import annotations

import dataclasses

import pytest

from pijax.claims import rules
from pijax.claims.claim import Action, Claim, ClaimType, RiskCategory, ServiceLine
from pijax.claims.codes import DIAGNOSES, PROCEDURES, FlagCode, dx_supports
from pijax.claims.corpus import Anomaly, generate_example, generate_examples
from pijax.claims.schema import findings_errors

N = 300


@pytest.fixture(scope="module")
def examples():
    return generate_examples(seed=11, count=N)


def test_same_seed_same_corpus(examples):
    assert generate_examples(seed=11, count=N) == examples


def test_other_seed_or_split_differs(examples):
    assert generate_examples(seed=12, count=20) != examples[:20]
    assert generate_examples(seed=11, count=20, split="heldout") != examples[:20]


def test_claim_depends_only_on_seed_split_index(examples):
    assert generate_example(11, 37) == examples[37]
    assert generate_examples(seed=11, count=5, start=40) == examples[40:45]


def test_findings_validate_against_schema(examples):
    for ex in examples:
        assert findings_errors(ex.findings_json()) == [], ex.claim.claim_id


def test_findings_are_the_rules_answer(examples):
    for ex in examples:
        assert ex.findings == rules.review(ex.claim)
        assert ex.narrative == rules.narrative(ex.claim, ex.findings)


def test_corpus_covers_every_flag_and_clean_claims(examples):
    seen = {f.code for ex in examples for f in ex.findings.flags}
    assert seen == set(FlagCode)
    clean = sum(not ex.findings.flags for ex in examples)
    assert 0.15 * N < clean < 0.6 * N
    assert {ex.claim.claim_type for ex in examples} == set(ClaimType)


def test_claims_are_well_formed(examples):
    for ex in examples:
        c = ex.claim
        assert [line.number for line in c.lines] == list(range(1, len(c.lines) + 1))
        assert all(line.code in PROCEDURES for line in c.lines)
        assert all(line.diagnosis in c.diagnoses for line in c.lines)
        assert all(d in DIAGNOSES for d in c.diagnoses)
        institutional = c.claim_type is ClaimType.INSTITUTIONAL
        assert all((line.revenue_code is not None) == institutional for line in c.lines)


# Injections that always produce their flag (a 59 may be legitimate, so MODIFIER may not).
_GUARANTEED = {
    Anomaly.DUPLICATE: FlagCode.DUPLICATE_BILLING,
    Anomaly.UNBUNDLE: FlagCode.UNBUNDLING,
    Anomaly.UNITS: FlagCode.UNITS_EXCEED_MAX,
    Anomaly.DIAGNOSIS: FlagCode.DIAGNOSIS_MISMATCH,
}


def test_injected_anomalies_are_flagged(examples):
    # With one injection nothing can undo it (a later one may alter a duplicated line).
    single = [ex for ex in examples if len(ex.anomalies) == 1 and ex.anomalies[0] in _GUARANTEED]
    assert len(single) > N // 5
    for ex in single:
        codes = {f.code for f in ex.findings.flags}
        assert _GUARANTEED[ex.anomalies[0]] in codes, (ex.claim.claim_id, ex.anomalies)


# --- the rules on hand-written claims -----------------------------------------------------------


def _line(n, code, *, date="2024-05-02", mods=(), units=1, dx=None):
    if dx is None:
        dx = next(d for d in DIAGNOSES if dx_supports(d, code))
    return ServiceLine(n, date, code, tuple(mods), units, dx, 10_000)


def _claim(*lines: ServiceLine) -> Claim:
    return Claim(
        "CLM-100001",
        ClaimType.PROFESSIONAL,
        "11",
        None,
        "P-1000",
        "M-10000",
        50,
        "F",
        tuple(dict.fromkeys(line.diagnosis for line in lines)),
        lines,
    )


def _keys(claim: Claim):
    return sorted((f.code.value, f.line) for f in rules.review(claim).flags)


def test_clean_claim_is_approved():
    findings = rules.review(_claim(_line(1, "99213"), _line(2, "93000", dx="I10")))
    assert findings.flags == ()
    assert findings.risk_category is RiskCategory.NONE
    assert findings.recommended_action is Action.APPROVE


def test_duplicated_line_gets_duplicate_billing_flag():
    claim = _claim(_line(1, "99213"), _line(2, "85025", dx="N39.0"), _line(3, "85025", dx="N39.0"))
    assert _keys(claim) == [("DUPLICATE_BILLING", 3)]


def test_same_code_other_date_or_laterality_is_not_duplicate():
    claim = _claim(
        _line(1, "97110", units=2),
        _line(2, "97110", units=2, date="2024-05-03"),
        _line(3, "20610", mods=("RT",)),
        _line(4, "20610", mods=("LT",)),
    )
    assert _keys(claim) == []


def test_unbundled_pair_flags_the_component():
    claim = _claim(_line(1, "80053", dx="E11.9"), _line(2, "80048", dx="E11.9"))
    assert _keys(claim) == [("UNBUNDLING", 2)]


def test_modifier_59_excuses_only_pairs_that_allow_it():
    allowed = _claim(_line(1, "97530"), _line(2, "97140", mods=("59",)))
    assert _keys(allowed) == []
    not_allowed = _claim(_line(1, "93000", dx="I10"), _line(2, "93005", mods=("59",), dx="I10"))
    assert _keys(not_allowed) == [("UNBUNDLING", 2)]
    other_day = _claim(
        _line(1, "80053", dx="E11.9"), _line(2, "80048", dx="E11.9", date="2024-05-09")
    )
    assert _keys(other_day) == []


def test_units_over_daily_maximum():
    claim = _claim(_line(1, "97110", units=4), _line(2, "J1100", units=21, dx="M17.11"))
    assert _keys(claim) == [("UNITS_EXCEED_MAX", 2)]


def test_diagnosis_not_supporting_procedure():
    claim = _claim(_line(1, "99214", dx="E11.9"), _line(2, "93000", dx="E11.9"))
    findings = rules.review(claim)
    assert _keys(claim) == [("DIAGNOSIS_MISMATCH", 2)]
    assert findings.recommended_action is Action.REQUEST_RECORDS


def test_modifier_misuse():
    claim = _claim(
        _line(1, "99213", mods=("25",)),
        _line(2, "71046", mods=("25",), dx="J18.9"),
        _line(3, "96372", mods=("59",), dx="J18.9"),
    )
    assert _keys(claim) == [("MODIFIER_MISUSE", 2), ("MODIFIER_MISUSE", 3)]


def test_risk_and_action_follow_the_flags():
    claim = _claim(
        _line(1, "85025", dx="N39.0"),
        _line(2, "85025", dx="N39.0"),
        _line(3, "85027", units=3, dx="N39.0"),
    )
    findings = rules.review(claim)
    assert _keys(claim) == [("DUPLICATE_BILLING", 2), ("UNBUNDLING", 3), ("UNITS_EXCEED_MAX", 3)]
    assert findings.risk_category is RiskCategory.HIGH
    assert findings.recommended_action is Action.REFER_TO_SIU


def test_narrative_cites_every_flag_policy(examples):
    for ex in examples:
        for flag in ex.findings.flags:
            assert f"Line {flag.line}: " in ex.narrative
            assert flag.policy_reference in ex.narrative
        assert ex.narrative.startswith(ex.claim.claim_type.value.capitalize())


def test_flag_keys_ignore_wording():
    ex = next(e for e in generate_examples(seed=3, count=50) if e.findings.flags)
    reworded = dataclasses.replace(
        ex.findings, flags=tuple(dataclasses.replace(f, description="x") for f in ex.findings.flags)
    )
    assert reworded.flag_keys() == ex.findings.flag_keys()

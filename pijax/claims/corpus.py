"""Seeded generator of the synthetic payment-integrity corpus.

SYNTHETIC DATA ONLY. Every claim, member, provider and amount here is invented by a random number
generator from the small made-up tables in `pijax.claims.codes`; nothing is drawn from, or
resembles on purpose, any real patient, provider or payer record.

A claim is built in three passes: a coherent clean visit from one of a few scenarios (a diabetes
follow-up, an emergency chest-pain work-up, a physical-therapy session, ...), then "near misses"
that look suspicious but break no rule (modifier 59 where a pair allows it, bilateral RT/LT lines),
then zero to three injected anomalies (a duplicated line, an unbundled pair, too many units, a
diagnosis that does not support its procedure, a misused modifier). The injections only make
anomalies likely; the answer is always `rules.review(claim)`, so the corpus is consistent by
construction.

Determinism: claim `index` of `split` under `seed` depends on those three values only (its own
`random.Random`), not on how many claims are generated or in which order.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import random

from pijax.claims import rules
from pijax.claims.claim import Claim, ClaimType, Findings, ServiceLine
from pijax.claims.codes import (
    BUNDLING_EDITS,
    DIAGNOSES,
    DISTINCT_MODIFIER,
    EM_MODIFIER,
    PROCEDURES,
    BundlingEdit,
    bundling_edit,
    dx_supports,
)

MAX_LINES = 8
_LATERAL_CODES = ("20610", "73030", "73610")
_THERAPY_CODES = ("97161", "97110", "97140", "97530")
# Lab and supply codes do not make an E/M visit "separately identifiable" work worth modifier 25.
_NO_25_TRIGGER = ("80048", "80053", "80061", "83036", "84443", "85025", "85027", "81001", "36415")


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    diagnoses: tuple[str, ...]
    visits: tuple[str, ...]  # E/M codes, one of which opens the claim (may be empty)
    services: tuple[str, ...]  # procedures sampled for the rest of the claim
    professional_pos: str
    institutional_pos: str


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "hypertension follow-up",
        ("I10", "E78.5", "I25.10"),
        ("99213", "99214"),
        ("93000", "80061", "80048", "36415", "93306"),
        "11",
        "22",
    ),
    Scenario(
        "diabetes follow-up",
        ("E11.9", "E78.5", "E03.9"),
        ("99213", "99214", "99215"),
        ("83036", "80053", "80061", "84443", "36415", "81001"),
        "11",
        "22",
    ),
    Scenario(
        "respiratory illness",
        ("J18.9", "J06.9", "J45.909", "R05.9"),
        ("99203", "99213", "99214"),
        ("71046", "85025", "96372", "J0696", "J1100"),
        "11",
        "23",
    ),
    Scenario(
        "joint pain",
        ("M25.511", "M17.11"),
        ("99203", "99213", "99214"),
        ("73030", "20610", "J3301", "J1100"),
        "11",
        "22",
    ),
    Scenario(
        "physical therapy",
        ("M54.50", "M25.511", "M17.11", "S93.401A"),
        (),
        ("97161", "97110", "97140", "97530", "72100"),
        "11",
        "22",
    ),
    Scenario(
        "emergency chest pain",
        ("R07.9", "I48.91", "I10"),
        ("99284", "99285"),
        ("93000", "71046", "80053", "85025", "36415", "93306"),
        "23",
        "23",
    ),
    Scenario(
        "emergency injury",
        ("S93.401A", "S52.501A", "S61.411A"),
        ("99284", "99285"),
        ("73610", "12001", "J1885", "96372"),
        "23",
        "23",
    ),
    Scenario(
        "infection",
        ("N39.0", "L03.115", "A09"),
        ("99213", "99214", "99284"),
        ("81001", "85025", "80048", "96372", "J0696"),
        "11",
        "23",
    ),
    Scenario(
        "preventive visit",
        ("Z00.00", "Z23", "E78.5"),
        ("99203", "99213"),
        ("90686", "90471", "80061", "80053", "85025", "36415"),
        "11",
        "22",
    ),
)


class Anomaly(enum.Enum):
    DUPLICATE = "duplicate"
    UNBUNDLE = "unbundle"
    UNITS = "units"
    DIAGNOSIS = "diagnosis"
    MODIFIER = "modifier"


ANOMALY_COUNT_WEIGHTS = (0.34, 0.36, 0.2, 0.1)  # P(0), P(1), P(2), P(3) injected anomalies


@dataclasses.dataclass
class _Draft:
    """A service line under construction (numbered and priced when the claim is finalized)."""

    date: str
    code: str
    modifiers: list[str]
    units: int
    diagnosis: str
    markup: float

    def copy(self) -> _Draft:
        return dataclasses.replace(self, modifiers=list(self.modifiers))


@dataclasses.dataclass(frozen=True)
class Example:
    """One corpus record: the claim and the reviewer's answer (findings + narrative)."""

    claim: Claim
    findings: Findings
    narrative: str
    anomalies: tuple[Anomaly, ...]  # what the generator injected (the truth is `findings`)

    def findings_json(self) -> dict:
        return self.findings.to_json(self.narrative)


def claim_rng(seed: int, index: int, split: str) -> random.Random:
    # String seeds hash through SHA-512 in CPython: stable across runs and platforms.
    return random.Random(f"pijax-claims/{split}/{seed}/{index}")


def generate_example(seed: int, index: int, split: str = "train") -> Example:
    rng = claim_rng(seed, index, split)
    scenario = rng.choice(SCENARIOS)
    claim_type = ClaimType.INSTITUTIONAL if rng.random() < 0.35 else ClaimType.PROFESSIONAL
    diagnoses = rng.sample(scenario.diagnoses, k=rng.choice((1, 1, 2)))
    dates = _service_dates(rng, claim_type)
    lines = _clean_lines(rng, scenario, claim_type, diagnoses, dates)
    _add_near_misses(rng, lines, diagnoses)
    k = rng.choices(range(len(ANOMALY_COUNT_WEIGHTS)), weights=ANOMALY_COUNT_WEIGHTS)[0]
    injected = _inject(rng, lines, diagnoses, k)
    claim = _finalize(rng, scenario, claim_type, diagnoses, lines)
    findings = rules.review(claim)
    return Example(claim, findings, rules.narrative(claim, findings), tuple(injected))


def generate_examples(seed: int, count: int, split: str = "train", start: int = 0) -> list[Example]:
    return [generate_example(seed, i, split) for i in range(start, start + count)]


# --- clean claims -------------------------------------------------------------------------------


def _service_dates(rng: random.Random, claim_type: ClaimType) -> list[str]:
    first = datetime.date(2024, 1, 1) + datetime.timedelta(days=rng.randrange(540))
    if claim_type is ClaimType.INSTITUTIONAL:
        span = rng.choice((1, 1, 2, 3))
    else:
        span = 1 if rng.random() < 0.85 else 2
    return [(first + datetime.timedelta(days=d)).isoformat() for d in range(span)]


def _units(rng: random.Random, code: str) -> int:
    limit = PROCEDURES[code].max_units
    return 1 if limit == 1 else rng.randint(1, limit)


def _supporting_dx(rng: random.Random, code: str, diagnoses: list[str]) -> str | None:
    options = [d for d in diagnoses if dx_supports(d, code)]
    return rng.choice(options) if options else None


def _clean_lines(
    rng: random.Random,
    scenario: Scenario,
    claim_type: ClaimType,
    diagnoses: list[str],
    dates: list[str],
) -> list[_Draft]:
    markup = lambda: round(rng.uniform(1.1, 1.9), 2)  # noqa: E731
    lines: list[_Draft] = []
    if scenario.visits:
        code = rng.choice(scenario.visits)
        lines.append(_Draft(dates[0], code, [], 1, rng.choice(diagnoses), markup()))
    lo, hi = (1, 3) if claim_type is ClaimType.PROFESSIONAL else (2, 5)
    wanted = rng.randint(lo, hi)
    for code in rng.sample(scenario.services, k=len(scenario.services)):
        if len(lines) >= wanted + (1 if scenario.visits else 0):
            break
        dx = _supporting_dx(rng, code, diagnoses)
        if dx is None or _bundles_with_existing(code, lines):
            continue
        mods = []
        if code in _LATERAL_CODES and rng.random() < 0.7:
            mods.append(rng.choice(("RT", "LT")))
        if code in _THERAPY_CODES and rng.random() < 0.8:
            mods.append("GP")
        lines.append(_Draft(rng.choice(dates), code, mods, _units(rng, code), dx, markup()))
    visit = lines[0] if lines and PROCEDURES[lines[0].code].is_em else None
    if (
        visit is not None
        and rng.random() < 0.7
        and any(line.date == visit.date and line.code not in _NO_25_TRIGGER for line in lines[1:])
    ):
        visit.modifiers.append(EM_MODIFIER)
    lines.sort(key=lambda line: line.date)  # stable: the visit stays first on its date
    return lines


def _bundles_with_existing(code: str, lines: list[_Draft]) -> bool:
    return any(bundling_edit(code, x.code) or bundling_edit(x.code, code) for x in lines)


def _add_near_misses(rng: random.Random, lines: list[_Draft], diagnoses: list[str]) -> None:
    """Lines that look like edits but are allowed: 59 on a pair that permits it, RT + LT."""
    if rng.random() < 0.12:
        edits = [
            e
            for e in BUNDLING_EDITS
            if e.modifier_allowed
            and _supporting_dx(rng, e.comprehensive, diagnoses)
            and _supporting_dx(rng, e.component, diagnoses)
        ]
        if edits:
            edit = rng.choice(edits)
            _add_pair(rng, lines, diagnoses, edit, component_mods=[DISTINCT_MODIFIER])
    if rng.random() < 0.12:
        lateral = [
            x for x in lines if x.code in _LATERAL_CODES and x.modifiers[:1] in (["RT"], ["LT"])
        ]
        if lateral:
            line = rng.choice(lateral)
            other = line.copy()
            other.modifiers[0] = "LT" if line.modifiers[0] == "RT" else "RT"
            lines.insert(lines.index(line) + 1, other)


def _add_pair(
    rng: random.Random,
    lines: list[_Draft],
    diagnoses: list[str],
    edit: BundlingEdit,
    component_mods: list[str],
) -> None:
    """Bill `edit.component` on the date of `edit.comprehensive` (adding the latter if absent)."""
    host = next((x for x in lines if x.code == edit.comprehensive), None)
    if host is None:
        date = rng.choice(sorted({x.date for x in lines})) if lines else "2024-06-01"
        dx = _supporting_dx(rng, edit.comprehensive, diagnoses) or _add_dx_for(
            rng, edit.comprehensive, diagnoses
        )
        host = _Draft(
            date,
            edit.comprehensive,
            [],
            _units(rng, edit.comprehensive),
            dx,
            round(rng.uniform(1.1, 1.9), 2),
        )
        lines.append(host)
    dx = _supporting_dx(rng, edit.component, diagnoses) or _add_dx_for(
        rng, edit.component, diagnoses
    )
    lines.insert(
        lines.index(host) + 1,
        _Draft(
            host.date,
            edit.component,
            list(component_mods),
            _units(rng, edit.component),
            dx,
            round(rng.uniform(1.1, 1.9), 2),
        ),
    )


def _add_dx_for(rng: random.Random, code: str, diagnoses: list[str]) -> str:
    dx = rng.choice([d for d in DIAGNOSES if dx_supports(d, code)])
    if dx not in diagnoses:
        diagnoses.append(dx)
    return dx


# --- anomalies ----------------------------------------------------------------------------------


def _inject(rng: random.Random, lines: list[_Draft], diagnoses: list[str], k: int) -> list[Anomaly]:
    kinds = rng.sample(list(Anomaly), k=len(Anomaly))
    done: list[Anomaly] = []
    for kind in kinds:
        if len(done) == k:
            break
        if len(lines) < MAX_LINES and _INJECTORS[kind](rng, lines, diagnoses):
            done.append(kind)
    return done


def _inject_duplicate(rng: random.Random, lines: list[_Draft], diagnoses: list[str]) -> bool:
    if not lines:
        return False
    line = rng.choice(lines)
    at = lines.index(line) + 1 if rng.random() < 0.5 else len(lines)
    lines.insert(at, line.copy())
    return True


def _inject_unbundle(rng: random.Random, lines: list[_Draft], diagnoses: list[str]) -> bool:
    present = {x.code for x in lines}
    hosted = [
        e for e in BUNDLING_EDITS if e.comprehensive in present and e.component not in present
    ]
    edit = rng.choice(hosted) if hosted and rng.random() < 0.7 else rng.choice(BUNDLING_EDITS)
    # A 59 on a pair that does not allow it changes nothing: the component is still denied.
    mods = [DISTINCT_MODIFIER] if not edit.modifier_allowed and rng.random() < 0.25 else []
    _add_pair(rng, lines, diagnoses, edit, component_mods=mods)
    return True


def _inject_units(rng: random.Random, lines: list[_Draft], diagnoses: list[str]) -> bool:
    if not lines:
        return False
    line = rng.choice(lines)
    limit = PROCEDURES[line.code].max_units
    line.units = limit + rng.randint(1, max(2, limit // 2))
    return True


def _inject_diagnosis(rng: random.Random, lines: list[_Draft], diagnoses: list[str]) -> bool:
    candidates = [
        x
        for x in lines
        if len(PROCEDURES[x.code].supported_by) < len(set(d.group for d in DIAGNOSES.values()))
    ]
    if not candidates:
        return False
    line = rng.choice(candidates)
    in_claim = [d for d in diagnoses if not dx_supports(d, line.code)]
    if in_claim and rng.random() < 0.5:
        line.diagnosis = rng.choice(in_claim)
    else:
        line.diagnosis = rng.choice([d for d in DIAGNOSES if not dx_supports(d, line.code)])
        if line.diagnosis not in diagnoses:
            diagnoses.append(line.diagnosis)
    return True


def _inject_modifier(rng: random.Random, lines: list[_Draft], diagnoses: list[str]) -> bool:
    non_em = [x for x in lines if not PROCEDURES[x.code].is_em]
    if not non_em:
        return False
    line = rng.choice(non_em)
    mod = EM_MODIFIER if rng.random() < 0.5 else DISTINCT_MODIFIER
    if mod in line.modifiers:
        return False
    line.modifiers.insert(0, mod)
    return True


_INJECTORS = {
    Anomaly.DUPLICATE: _inject_duplicate,
    Anomaly.UNBUNDLE: _inject_unbundle,
    Anomaly.UNITS: _inject_units,
    Anomaly.DIAGNOSIS: _inject_diagnosis,
    Anomaly.MODIFIER: _inject_modifier,
}


# --- finalize -----------------------------------------------------------------------------------


def _finalize(
    rng: random.Random,
    scenario: Scenario,
    claim_type: ClaimType,
    diagnoses: list[str],
    drafts: list[_Draft],
) -> Claim:
    institutional = claim_type is ClaimType.INSTITUTIONAL
    lines = tuple(
        ServiceLine(
            number=i + 1,
            date=d.date,
            code=d.code,
            modifiers=tuple(d.modifiers),
            units=d.units,
            diagnosis=d.diagnosis,
            billed_cents=round(PROCEDURES[d.code].fee * d.units * d.markup * 100),
            revenue_code=PROCEDURES[d.code].revenue_code if institutional else None,
        )
        for i, d in enumerate(drafts)
    )
    used = {x.diagnosis for x in lines}
    return Claim(
        claim_id=f"CLM-{rng.randrange(100000, 1000000)}",
        claim_type=claim_type,
        place_of_service=scenario.institutional_pos if institutional else scenario.professional_pos,
        bill_type="0131" if institutional else None,
        provider_id=f"P-{rng.randrange(1000, 10000)}",
        member_id=f"M-{rng.randrange(10000, 100000)}",
        member_age=rng.randint(18, 89),
        member_sex=rng.choice(("F", "M")),
        diagnoses=tuple(d for d in diagnoses if d in used),
        lines=lines,
    )

"""Claim and findings records of the synthetic payment-integrity corpus.

A `Claim` is what the reviewer reads; `Findings` is what it answers: flags on service lines, a
risk category and a recommended action. `Findings.to_json(narrative)` is the object the findings
schema (`configs/schemas/findings.schema.json`) describes, with keys in the order the model is
trained to emit them.
"""

from __future__ import annotations

import dataclasses
import enum

from pijax.claims.codes import FlagCode


class ClaimType(enum.Enum):
    PROFESSIONAL = "professional"
    INSTITUTIONAL = "institutional"


class RiskCategory(enum.Enum):
    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Action(enum.Enum):
    APPROVE = "approve"
    DENY_LINES = "deny_lines"
    REQUEST_RECORDS = "request_records"
    REFER_TO_SIU = "refer_to_siu"


PLACES_OF_SERVICE = {
    "11": "office",
    "22": "outpatient hospital",
    "23": "emergency room",
}


@dataclasses.dataclass(frozen=True)
class ServiceLine:
    number: int  # 1-based position on the claim
    date: str  # ISO date of service
    code: str  # CPT/HCPCS-style procedure code
    modifiers: tuple[str, ...]
    units: int
    diagnosis: str  # ICD-10-style code; always one of the claim's diagnoses
    billed_cents: int
    revenue_code: str | None = None  # institutional claims only


@dataclasses.dataclass(frozen=True)
class Claim:
    claim_id: str
    claim_type: ClaimType
    place_of_service: str  # a key of PLACES_OF_SERVICE
    bill_type: str | None  # institutional type of bill, e.g. "0131"
    provider_id: str
    member_id: str
    member_age: int
    member_sex: str
    diagnoses: tuple[str, ...]
    lines: tuple[ServiceLine, ...]

    @property
    def total_billed_cents(self) -> int:
        return sum(line.billed_cents for line in self.lines)


@dataclasses.dataclass(frozen=True)
class Flag:
    code: FlagCode
    line: int
    description: str
    policy_reference: str
    confidence: float

    def to_json(self) -> dict:
        return {
            "code": self.code.value,
            "line": self.line,
            "description": self.description,
            "policy_reference": self.policy_reference,
            "confidence": self.confidence,
        }


@dataclasses.dataclass(frozen=True)
class Findings:
    claim_id: str
    flags: tuple[Flag, ...]
    risk_category: RiskCategory
    recommended_action: Action

    def to_json(self, narrative: str) -> dict:
        return {
            "claim_id": self.claim_id,
            "flags": [f.to_json() for f in self.flags],
            "risk_category": self.risk_category.value,
            "recommended_action": self.recommended_action.value,
            "narrative": narrative,
        }

    def flag_keys(self) -> frozenset[tuple[str, int]]:
        """What a flag-match evaluation compares: which edit fired on which line."""
        return frozenset((f.code.value, f.line) for f in self.flags)


def format_money(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"

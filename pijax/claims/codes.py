"""The synthetic code tables the claims corpus draws from: procedures, diagnoses, edits, policies.

Everything here is made up for training and testing. Codes are CPT/HCPCS-style and ICD-10-style
so the text looks like what a reviewer reads, but descriptions, fees, unit limits, bundling pairs
and diagnosis rules are simplified inventions, not any payer's real edits. The tables are kept
small (a few dozen codes) so a model of a few million parameters can learn them.
"""

from __future__ import annotations

import dataclasses
import enum


class DxGroup(enum.Enum):
    """Diagnosis groups; a procedure lists the groups that support it."""

    CIRCULATORY = "circulatory"
    METABOLIC = "metabolic"
    RESPIRATORY = "respiratory"
    MUSCULOSKELETAL = "musculoskeletal"
    INJURY = "injury"
    INFECTION = "infection"
    PREVENTIVE = "preventive"


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    code: str
    description: str
    group: DxGroup


@dataclasses.dataclass(frozen=True)
class Procedure:
    code: str
    description: str
    max_units: int  # the per-day maximum (a medically-unlikely-edit style limit)
    fee: float  # billed per unit before the generator's markup
    supported_by: frozenset[DxGroup]
    revenue_code: str  # what an institutional claim bills the line under
    is_em: bool = False  # evaluation-and-management visit: the only codes modifier 25 may ride on


_G = DxGroup
_ALL = frozenset(DxGroup)


def _groups(*groups: DxGroup) -> frozenset[DxGroup]:
    return frozenset(groups)


DIAGNOSES: dict[str, Diagnosis] = {
    d.code: d
    for d in [
        Diagnosis("I10", "essential hypertension", _G.CIRCULATORY),
        Diagnosis("I25.10", "coronary artery disease", _G.CIRCULATORY),
        Diagnosis("I48.91", "atrial fibrillation", _G.CIRCULATORY),
        Diagnosis("R07.9", "chest pain", _G.CIRCULATORY),
        Diagnosis("E11.9", "type 2 diabetes", _G.METABOLIC),
        Diagnosis("E78.5", "hyperlipidemia", _G.METABOLIC),
        Diagnosis("E03.9", "hypothyroidism", _G.METABOLIC),
        Diagnosis("J18.9", "pneumonia", _G.RESPIRATORY),
        Diagnosis("J06.9", "upper respiratory infection", _G.RESPIRATORY),
        Diagnosis("J45.909", "asthma", _G.RESPIRATORY),
        Diagnosis("R05.9", "cough", _G.RESPIRATORY),
        Diagnosis("M54.50", "low back pain", _G.MUSCULOSKELETAL),
        Diagnosis("M25.511", "right shoulder pain", _G.MUSCULOSKELETAL),
        Diagnosis("M17.11", "right knee osteoarthritis", _G.MUSCULOSKELETAL),
        Diagnosis("S93.401A", "ankle sprain", _G.INJURY),
        Diagnosis("S52.501A", "radius fracture", _G.INJURY),
        Diagnosis("S61.411A", "hand laceration", _G.INJURY),
        Diagnosis("N39.0", "urinary tract infection", _G.INFECTION),
        Diagnosis("L03.115", "cellulitis of leg", _G.INFECTION),
        Diagnosis("A09", "infectious gastroenteritis", _G.INFECTION),
        Diagnosis("Z00.00", "adult general exam", _G.PREVENTIVE),
        Diagnosis("Z23", "immunization encounter", _G.PREVENTIVE),
    ]
}

_LAB = _groups(_G.METABOLIC, _G.CIRCULATORY, _G.INFECTION, _G.PREVENTIVE)
_CBC = _groups(_G.INFECTION, _G.RESPIRATORY, _G.CIRCULATORY, _G.PREVENTIVE)
_CARDIO = _groups(_G.CIRCULATORY)
_CHEST = _groups(_G.RESPIRATORY, _G.CIRCULATORY)
_MSK = _groups(_G.MUSCULOSKELETAL, _G.INJURY)

PROCEDURES: dict[str, Procedure] = {
    p.code: p
    for p in [
        Procedure("99203", "new patient office visit", 1, 165.0, _ALL, "0510", is_em=True),
        Procedure("99213", "office visit, low complexity", 1, 110.0, _ALL, "0510", is_em=True),
        Procedure("99214", "office visit, moderate complexity", 1, 160.0, _ALL, "0510", is_em=True),
        Procedure("99215", "office visit, high complexity", 1, 215.0, _ALL, "0510", is_em=True),
        Procedure("99284", "emergency visit, moderate", 1, 420.0, _ALL, "0450", is_em=True),
        Procedure("99285", "emergency visit, high", 1, 610.0, _ALL, "0450", is_em=True),
        Procedure("80048", "basic metabolic panel", 1, 28.0, _LAB, "0301"),
        Procedure("80053", "comprehensive metabolic panel", 1, 36.0, _LAB, "0301"),
        Procedure(
            "80061",
            "lipid panel",
            1,
            42.0,
            _groups(_G.METABOLIC, _G.CIRCULATORY, _G.PREVENTIVE),
            "0301",
        ),
        Procedure("83036", "hemoglobin A1c", 1, 31.0, _groups(_G.METABOLIC), "0301"),
        Procedure("84443", "thyroid stimulating hormone", 1, 45.0, _groups(_G.METABOLIC), "0301"),
        Procedure("85025", "complete blood count with differential", 1, 24.0, _CBC, "0305"),
        Procedure("85027", "complete blood count, automated", 1, 19.0, _CBC, "0305"),
        Procedure(
            "81001",
            "urinalysis with microscopy",
            1,
            12.0,
            _groups(_G.INFECTION, _G.METABOLIC, _G.PREVENTIVE),
            "0307",
        ),
        Procedure("36415", "venipuncture", 1, 9.0, _ALL, "0300"),
        Procedure("93000", "electrocardiogram, complete", 1, 55.0, _CARDIO, "0730"),
        Procedure("93005", "electrocardiogram, tracing only", 1, 30.0, _CARDIO, "0730"),
        Procedure("93010", "electrocardiogram, interpretation", 1, 22.0, _CARDIO, "0730"),
        Procedure("93306", "echocardiogram, complete", 1, 780.0, _CARDIO, "0483"),
        Procedure("71045", "chest x-ray, one view", 1, 48.0, _CHEST, "0324"),
        Procedure("71046", "chest x-ray, two views", 1, 66.0, _CHEST, "0324"),
        Procedure("73030", "shoulder x-ray", 1, 70.0, _MSK, "0320"),
        Procedure("72100", "lumbar spine x-ray", 1, 82.0, _MSK, "0320"),
        Procedure("73610", "ankle x-ray", 1, 64.0, _MSK, "0320"),
        Procedure("97161", "physical therapy evaluation", 1, 120.0, _MSK, "0424"),
        Procedure("97110", "therapeutic exercise, 15 min", 4, 38.0, _MSK, "0420"),
        Procedure("97140", "manual therapy, 15 min", 4, 36.0, _MSK, "0420"),
        Procedure("97530", "therapeutic activities, 15 min", 4, 41.0, _MSK, "0420"),
        Procedure(
            "96372",
            "therapeutic injection",
            4,
            32.0,
            _groups(_G.MUSCULOSKELETAL, _G.INFECTION, _G.RESPIRATORY, _G.INJURY),
            "0940",
        ),
        Procedure(
            "20610", "arthrocentesis, major joint", 2, 150.0, _groups(_G.MUSCULOSKELETAL), "0360"
        ),
        Procedure("12001", "simple wound repair", 1, 185.0, _groups(_G.INJURY), "0450"),
        Procedure(
            "J1100",
            "dexamethasone, 1 mg",
            20,
            1.5,
            _groups(_G.MUSCULOSKELETAL, _G.RESPIRATORY),
            "0636",
        ),
        Procedure(
            "J0696", "ceftriaxone, 250 mg", 8, 9.0, _groups(_G.INFECTION, _G.RESPIRATORY), "0636"
        ),
        Procedure("J1885", "ketorolac, 15 mg", 8, 4.0, _MSK, "0636"),
        Procedure("J3301", "triamcinolone, 10 mg", 8, 6.0, _groups(_G.MUSCULOSKELETAL), "0636"),
        Procedure("90686", "influenza vaccine", 1, 28.0, _groups(_G.PREVENTIVE), "0636"),
        Procedure("90471", "vaccine administration", 1, 25.0, _groups(_G.PREVENTIVE), "0771"),
    ]
}


@dataclasses.dataclass(frozen=True)
class BundlingEdit:
    """A procedure-to-procedure edit: `component` is paid inside `comprehensive` on the same day.

    `modifier_allowed` says whether modifier 59 on the component line (a distinct, separate
    service) lets both be paid.
    """

    comprehensive: str
    component: str
    modifier_allowed: bool


BUNDLING_EDITS: tuple[BundlingEdit, ...] = (
    BundlingEdit("80053", "80048", False),
    BundlingEdit("85025", "85027", False),
    BundlingEdit("93000", "93005", False),
    BundlingEdit("93000", "93010", False),
    BundlingEdit("71046", "71045", False),
    BundlingEdit("97530", "97140", True),
    BundlingEdit("20610", "96372", True),
)

EM_MODIFIER = "25"  # significant, separately identifiable E/M service
DISTINCT_MODIFIER = "59"  # distinct procedural service
# Modifiers that never trigger an edit here (laterality, therapy plan of care).
NEUTRAL_MODIFIERS = ("RT", "LT", "GP")


class FlagCode(enum.Enum):
    DUPLICATE_BILLING = "DUPLICATE_BILLING"
    UNBUNDLING = "UNBUNDLING"
    UNITS_EXCEED_MAX = "UNITS_EXCEED_MAX"
    DIAGNOSIS_MISMATCH = "DIAGNOSIS_MISMATCH"
    MODIFIER_MISUSE = "MODIFIER_MISUSE"


@dataclasses.dataclass(frozen=True)
class Policy:
    reference: str
    title: str
    confidence: float  # how sure a rule-based reviewer is when this policy fires
    text: str


POLICIES: dict[FlagCode, Policy] = {
    FlagCode.DUPLICATE_BILLING: Policy(
        "PI-DUP-01",
        "Duplicate billing",
        0.97,
        "a line repeating the code, date and modifiers of another line is denied.",
    ),
    FlagCode.UNBUNDLING: Policy(
        "PI-NCCI-02",
        "Unbundling of procedure pairs",
        0.92,
        "a component billed on the date of its comprehensive code is denied unless the "
        "pair allows modifier 59 and the component carries it.",
    ),
    FlagCode.UNITS_EXCEED_MAX: Policy(
        "PI-MUE-03",
        "Units exceeding the per-day maximum",
        0.9,
        "units above the code's daily maximum are denied.",
    ),
    FlagCode.DIAGNOSIS_MISMATCH: Policy(
        "PI-DX-04",
        "Diagnosis not supporting the procedure",
        0.75,
        "a line whose diagnosis does not support its procedure needs records.",
    ),
    FlagCode.MODIFIER_MISUSE: Policy(
        "PI-MOD-05",
        "Modifier misuse",
        0.85,
        "25 only on an E/M visit; 59 only on the component of a pair billed that date.",
    ),
}


def bundling_edit(comprehensive: str, component: str) -> BundlingEdit | None:
    for edit in BUNDLING_EDITS:
        if edit.comprehensive == comprehensive and edit.component == component:
            return edit
    return None


def dx_supports(dx_code: str, procedure_code: str) -> bool:
    return DIAGNOSES[dx_code].group in PROCEDURES[procedure_code].supported_by

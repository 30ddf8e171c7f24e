"""A small bundled sample for `scripts/review_claims.py` when `pijax.claims` (the synthetic
corpus generator) is not installed. Entirely synthetic: no real patient, provider or payer data.
"""

from __future__ import annotations

POLICY_TEXT = """Payment integrity policy excerpts (synthetic, for demonstration only).
PI-DUP-01 Duplicate billing: the same procedure code on the same date of service with the same \
modifiers is billed once.
PI-NCCI-02 Unbundling: a component procedure billed with its comprehensive procedure on the same \
date is included in the comprehensive one unless modifier 59 documents a distinct service.
PI-MUE-03 Units: units above the per-day maximum for a code are not payable.
PI-DX-04 Medical necessity: the line's diagnosis must support the procedure.
PI-MOD-05 Modifiers: modifier 25 needs a separately identifiable E/M service.
Answer with one JSON object: claim_id, flags, risk_category, recommended_action, narrative.
"""

CLAIMS = [
    {
        "claim_id": "SYN-1001",
        "text": """claim SYN-1001 | professional | POS 11 office | provider P-204 | member M-5531, 47 F
diagnoses E11.9 type 2 diabetes without complications
line | date | code | mod | units | dx | billed
1 | 2024-03-04 | 99213 | - | 1 | E11.9 | 92.00
2 | 2024-03-04 | 99213 | - | 1 | E11.9 | 92.00
3 | 2024-03-04 | 83036 | - | 1 | E11.9 | 13.00
total billed $197.00""",
    },
    {
        "claim_id": "SYN-1002",
        "text": """claim SYN-1002 | professional | POS 11 office | provider P-118 | member M-7702, 63 M
diagnoses M54.5 low back pain
line | date | code | mod | units | dx | billed
1 | 2024-05-12 | 97110 | GP | 6 | M54.5 | 210.00
2 | 2024-05-12 | 97140 | GP | 2 | M54.5 | 70.00
total billed $280.00""",
    },
    {
        "claim_id": "SYN-1003",
        "text": """claim SYN-1003 | institutional | bill type 0131 | POS 22 outpatient hospital | provider H-031 | member M-2210, 58 F
diagnoses R07.9 chest pain, unspecified
line | date | rev | code | mod | units | dx | billed
1 | 2024-07-01 | 0730 | 93000 | - | 1 | R07.9 | 48.00
2 | 2024-07-01 | 0730 | 93010 | - | 1 | R07.9 | 21.00
3 | 2024-07-01 | 0300 | 36415 | - | 1 | R07.9 | 9.00
total billed $78.00""",
    },
]

# Clearly fake lookup tables for the agent's demonstration tool calls.
FAKE_FEE_SCHEDULE = {
    "99213": "92.00",
    "83036": "13.00",
    "97110": "31.00",
    "97140": "35.00",
    "93000": "17.00",
    "93010": "8.50",
    "36415": "3.00",
}
FAKE_POLICY_INDEX = {
    "DUPLICATE_BILLING": "PI-DUP-01",
    "UNBUNDLING": "PI-NCCI-02",
    "UNITS_EXCEED_MAX": "PI-MUE-03",
    "DIAGNOSIS_MISMATCH": "PI-DX-04",
    "MODIFIER_MISUSE": "PI-MOD-05",
}

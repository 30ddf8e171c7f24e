"""The review agent's investigation turns: what the model is trained on and what the agent sends.

After the findings, `scripts/review_claims.py` opens a session and runs two more turns:

    ...<|review|>{findings JSON}<|end|>            the findings turn (its tokens, as generated)
    \\n[investigator] Which lookups confirm these findings? Call tools.\\n
    policy(DUPLICATE_BILLING)\\n...<|end|>   turn one: the model calls tools
    \\n[FAKE TOOL OUTPUT: ...]\\npolicy(DUPLICATE_BILLING) -> PI-DUP-01 ...
    \\n[investigator] Narrative for the case file:\\n
    Professional claim, 4 lines. Line 3: ...<|end|>  turn two: the model writes the narrative

Each piece is its own prompt segment (tokenized on its own, as the server does), so the tokens
the model was trained on are the tokens the agent sends. The tools are FAKE: lookups over the
synthetic tables of `pijax.claims.codes`, clearly labelled, never real policy or fee data.

The model's calls are parsed (`parse_tool_calls`) and run, so what it asks for is what it gets;
the training target (`tool_calls`) asks for each flagged line's policy and fee, which is what the
narrative then cites.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pijax.claims.claim import Findings
from pijax.claims.codes import POLICIES, PROCEDURES, FlagCode

TOOL_REQUEST = "\n[investigator] Which lookups confirm these findings? Call tools.\n"
NARRATIVE_REQUEST = "\n[investigator] Narrative for the case file:\n"
FAKE_TOOL_BANNER = "[FAKE TOOL OUTPUT: synthetic demo lookups, not real policy or fee data]"
MAX_TOOL_CALLS = 4
TOOLS = ("policy", "fee")  # short names: a few tokens each in the default vocabulary
_CALL = re.compile(r"\b(" + "|".join(TOOLS) + r")\(([A-Za-z0-9_]{0,40})\)")


def tool_calls(flags: Sequence[tuple[str, int]], codes_by_line: Mapping[int, str]) -> str:
    """The calls a reviewer makes to confirm the findings' `flags` ((flag type, line) pairs, in
    the findings' order): the training target of turn one. Each flag type's policy once and the
    fee of each flagged line's code once, at most MAX_TOOL_CALLS; `policy(none)` when nothing
    is flagged."""
    calls: list[str] = []
    for code, line in flags:
        for call in (f"policy({code})", f"fee({codes_by_line[line]})"):
            if call not in calls:
                calls.append(call)
    return "\n".join(calls[:MAX_TOOL_CALLS] or ["policy(none)"])


def findings_calls(findings: Findings, codes_by_line: Mapping[int, str]) -> str:
    return tool_calls([(f.code.value, f.line) for f in findings.flags], codes_by_line)


def parse_tool_calls(text: str) -> list[tuple[str, str]]:
    """(tool, argument) for each well-formed call in the model's turn, at most MAX_TOOL_CALLS."""
    return [(m.group(1), m.group(2)) for m in _CALL.finditer(text)][:MAX_TOOL_CALLS]


def run_tool(tool: str, arg: str) -> str:
    """One FAKE lookup over the synthetic tables: `policy(FLAG_TYPE)` gives the policy's reference
    and title, `fee(CODE)` the demo fee schedule's allowed amount."""
    if tool == "policy":
        if arg == "none":
            return "no flags to look up"
        if arg in FlagCode.__members__:
            policy = POLICIES[FlagCode[arg]]
            return f"{policy.reference} {policy.title}"
        return "no such policy in the demo index"
    proc = PROCEDURES.get(arg)
    return f"allowed amount {proc.fee:.2f} per unit" if proc else "not in the demo fee table"


def tool_output(calls: Sequence[tuple[str, str]]) -> str:
    """The agent's answer to turn one: the banner, then `tool(arg) -> result` per call (a turn
    with no well-formed call gets `none` and says so)."""
    lines = [FAKE_TOOL_BANNER]
    lines += [f"{tool}({arg}) -> {run_tool(tool, arg)}" for tool, arg in calls]
    if not calls:
        lines.append("no well-formed tool call (policy(FLAG), fee(CODE))")
    return "\n".join(lines)


def tool_output_segment(calls: Sequence[tuple[str, str]]) -> str:
    """What follows the model's tool-call turn: the lookups' results and the narrative request."""
    return f"\n{tool_output(calls)}{NARRATIVE_REQUEST}"

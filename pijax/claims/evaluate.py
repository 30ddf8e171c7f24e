"""Evaluate a claim-review model on held-out synthetic claims.

What a reviewer would measure, against the rules' ground truth (`rules.review`):
  * schema-valid share: the answer parses as JSON and validates against the findings schema;
  * claim id exact: the answer names the claim it reviewed;
  * flag-match share: the set of (flag code, line) pairs equals the true set; and per flag type,
    precision and recall over (code, line) pairs;
  * action accuracy: the recommended action equals the rules' action;
  * narrative cites: the narrative names every truly flagged line with its policy reference
    (over the claims that have flags);
  * exact match: the whole findings object, narrative included.
`EvalReport.goals()` holds them against `GOALS` (the default model's targets).

The evaluations run through the offline API (`pijax.LLM`), greedy, all prompts at once:
unconstrained, and with the findings schema as structured output
(`SamplingParams(json_schema=...)`). `dense_greedy` is the slow reference decoder (no cache,
no engine) that tests hold the engine to.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pijax.claims import agent
from pijax.claims.codes import FlagCode
from pijax.claims.corpus import Example
from pijax.claims.prompt import answer_text, render_findings_json
from pijax.claims.schema import findings_schema, is_valid_findings
from pijax.model.llama import LlamaModel
from pijax.request import PromptSegment, SamplingParams


def dense_greedy(
    model: LlamaModel, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[int]:
    """The slow reference: re-run `forward_dense` over the whole sequence for every new token.

    The sequence is padded at the end to one fixed length so the forward compiles once; causal
    attention keeps the padding from touching the positions that are read.
    """
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, t: nnx.merge(graphdef, st).forward_dense(t))
    length = len(prompt) + max_new_tokens
    seq = np.zeros((1, length), np.int32)
    seq[0, : len(prompt)] = prompt
    out: list[int] = []
    for i in range(len(prompt), length):
        tok = int(jnp.argmax(forward(state, jnp.asarray(seq))[0, i - 1]))
        out.append(tok)
        seq[0, i] = tok
        if tok in stop_ids:
            break
    return out


# --- scoring ------------------------------------------------------------------------------------

# The goals of the default model's held-out review (greedy, constrained decoding): what a reviewer
# needs from it. `per_flag_recall`/`per_flag_precision` hold for every flag type with at least
# `PER_FLAG_MIN_SUPPORT` held-out instances.
GOALS = {
    "claim_id_share": 0.99,
    "flags_match_share": 0.85,
    "per_flag_precision": 0.85,
    "per_flag_recall": 0.85,
    "action_match_share": 0.90,
    "narrative_cites_share": 0.90,
}
PER_FLAG_MIN_SUPPORT = 20


@dataclasses.dataclass(frozen=True)
class Score:
    parsed: bool
    schema_valid: bool
    flags_match: bool
    action_match: bool
    exact_match: bool
    claim_id_match: bool = False
    # The narrative names every truly flagged line ("Line 3") and its policy reference; None for
    # a claim with no true flags (nothing to cite).
    narrative_cites: bool | None = None
    predicted_flags: frozenset[tuple[str, int]] = frozenset()  # (code, line) the answer flags


def narrative_cites(narrative: object, example: Example) -> bool | None:
    """Whether `narrative` names each truly flagged line with its policy reference (the reference
    after the line's mention, before the next line's); None when the claim has no flags."""
    flags = example.findings.flags
    if not flags:
        return None
    if not isinstance(narrative, str):
        return False
    for flag in flags:
        at = narrative.find(f"Line {flag.line}:")
        if at < 0:
            return False
        end = narrative.find("Line ", at + 1)
        if flag.policy_reference not in narrative[at : end if end > 0 else None]:
            return False
    return True


def score_answer(text: str, example: Example) -> Score:
    """Score one completion (text after `<|review|>`, stop token optional) against the truth."""
    try:
        obj = json.loads(answer_text(text))
    except json.JSONDecodeError:
        return Score(False, False, False, False, False)
    valid = is_valid_findings(obj)
    truth = example.findings_json()
    try:
        keys = frozenset((f["code"], f["line"]) for f in obj["flags"])
        flags_match = keys == example.findings.flag_keys()
    except (KeyError, TypeError):
        keys, flags_match = frozenset(), False
    is_obj = isinstance(obj, dict)
    action = is_obj and obj.get("recommended_action") == truth["recommended_action"]
    claim_id = is_obj and obj.get("claim_id") == truth["claim_id"]
    cites = narrative_cites(obj.get("narrative") if is_obj else None, example)
    return Score(True, valid, flags_match, action, obj == truth, claim_id, cites, keys)


def per_flag_figures(scores: Sequence[Score], examples: Sequence[Example]) -> dict[str, dict]:
    """Precision and recall of each flag type over (code, line) pairs, with its true count."""
    out = {}
    for code in FlagCode:
        tp = fp = fn = 0
        for s, ex in zip(scores, examples, strict=True):
            want = {k for k in ex.findings.flag_keys() if k[0] == code.value}
            got = {k for k in s.predicted_flags if k[0] == code.value}
            tp, fp, fn = tp + len(want & got), fp + len(got - want), fn + len(want - got)
        out[code.value] = {
            "support": tp + fn,
            "predicted": tp + fp,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        }
    return out


@dataclasses.dataclass(frozen=True)
class EvalReport:
    num_claims: int
    parsed_share: float
    schema_valid_share: float
    flags_match_share: float
    action_match_share: float
    exact_match_share: float
    samples: list[dict]  # a few (claim id, answer, truth) for reading
    claim_id_share: float = 0.0
    narrative_cites_share: float | None = None  # over the claims with at least one true flag
    per_flag: dict[str, dict] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def goals(self) -> dict[str, dict]:
        """Each goal of `GOALS`: the measured figure, the goal, whether it holds. The per-flag
        goals use the worst flag type with at least `PER_FLAG_MIN_SUPPORT` true instances."""
        figures: dict[str, float | None] = {
            k: getattr(self, k)
            for k in ("claim_id_share", "flags_match_share", "action_match_share")
        }
        figures["narrative_cites_share"] = self.narrative_cites_share
        for kind in ("precision", "recall"):
            values = [
                (f[kind] or 0.0)
                for f in self.per_flag.values()
                if f["support"] >= PER_FLAG_MIN_SUPPORT
            ]
            figures[f"per_flag_{kind}"] = min(values) if values else None
        return {
            k: {
                "measured": figures[k],
                "goal": goal,
                "met": figures[k] is not None and figures[k] >= goal,
            }
            for k, goal in GOALS.items()
        }


def summarize(
    answers: Sequence[str], examples: Sequence[Example], num_samples: int = 3
) -> EvalReport:
    scores = [score_answer(a, ex) for a, ex in zip(answers, examples, strict=True)]
    n = len(scores)

    def share(field: str) -> float:
        return round(sum(getattr(s, field) for s in scores) / max(n, 1), 4)

    cites = [s.narrative_cites for s in scores if s.narrative_cites is not None]
    samples = [
        {
            "claim_id": ex.claim.claim_id,
            "answer": a,
            "truth": render_findings_json(ex.findings, ex.narrative),
        }
        for a, ex in list(zip(answers, examples, strict=True))[:num_samples]
    ]
    return EvalReport(
        n,
        share("parsed"),
        share("schema_valid"),
        share("flags_match"),
        share("action_match"),
        share("exact_match"),
        samples,
        claim_id_share=share("claim_id_match"),
        narrative_cites_share=round(sum(cites) / len(cites), 4) if cites else None,
        per_flag=per_flag_figures(scores, examples),
    )


def format_report(report: EvalReport) -> str:
    """The reviewer's figures in a few lines (the goals first, then each flag type)."""

    def pct(x):
        return "n/a" if x is None else f"{x:.0%}"

    lines = [
        f"{report.num_claims} claims: schema-valid {pct(report.schema_valid_share)}, claim id "
        f"exact {pct(report.claim_id_share)}, flags match {pct(report.flags_match_share)}, "
        f"action {pct(report.action_match_share)}, exact {pct(report.exact_match_share)}, "
        f"narrative cites flagged lines {pct(report.narrative_cites_share)}"
    ]
    for code, f in report.per_flag.items():
        lines.append(
            f"  {code:<19} true {f['support']:>3} predicted {f['predicted']:>3} precision "
            f"{pct(f['precision'])} recall {pct(f['recall'])}"
        )
    for name, g in report.goals().items():
        state = "met" if g["met"] else "MISSED"
        if g["measured"] is None and name.startswith("per_flag"):
            state = f"not measured: no flag type with {PER_FLAG_MIN_SUPPORT}+ true instances"
        lines.append(f"  goal {name} >= {g['goal']:.0%}: {pct(g['measured'])} ({state})")
    return "\n".join(lines)


def engine_outputs(
    llm,
    prompts: Sequence,
    max_new_tokens: int,
    *,
    constrained: bool = False,
    params: SamplingParams | None = None,
) -> list:
    """Completions (`CompletionOutput`: token ids and text) from a `pijax.LLM`; greedy unless
    `params` says otherwise (it then sets the token budget too). `constrained`: the findings
    schema as structured output."""
    params = params or SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    if constrained:
        params = dataclasses.replace(params, json_schema=json.dumps(findings_schema()))
    return llm.generate(list(prompts), params)


def engine_texts(llm, prompts: Sequence, max_new_tokens: int, **kwargs) -> list[str]:
    return [out.text for out in engine_outputs(llm, prompts, max_new_tokens, **kwargs)]


def evaluate_unconstrained(
    llm, prompts: Sequence[str], examples: Sequence[Example], max_new_tokens: int
) -> EvalReport:
    return summarize(engine_texts(llm, prompts, max_new_tokens), examples)


def evaluate_constrained(
    llm, prompts: Sequence[str], examples: Sequence[Example], max_new_tokens: int
) -> EvalReport:
    """The same evaluation with the findings schema as structured output."""
    return evaluate_constrained_outputs(llm, prompts, examples, max_new_tokens)[0]


def evaluate_constrained_outputs(
    llm, prompts: Sequence[str], examples: Sequence[Example], max_new_tokens: int
) -> tuple[EvalReport, list]:
    """`evaluate_constrained`, with the completions (the agent evaluation continues them)."""
    outs = engine_outputs(llm, prompts, max_new_tokens, constrained=True)
    return summarize([o.text for o in outs], examples), outs


@dataclasses.dataclass(frozen=True)
class AgentReport:
    """The review agent's investigation after the findings (`pijax.claims.agent`), run offline
    on the same claims: turn one's tool calls, the FAKE lookups, turn two's narrative."""

    num_claims: int
    calls_share: float  # turn one made at least one well-formed tool call
    calls_match_share: float  # ... exactly the calls the findings call for (`agent.tool_calls`)
    narrative_cites_share: float | None  # turn two cites each truly flagged line's policy
    narrative_follows_findings_share: float  # turn two repeats the findings' own narrative
    samples: list[dict]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def evaluate_agent(
    llm,
    policy_segment: str,
    claim_segments: Sequence[str],
    findings: Sequence,
    examples: Sequence[Example],
    *,
    call_tokens: int = 64,
    narrative_tokens: int = 160,
    num_samples: int = 2,
) -> AgentReport:
    """Continue each findings completion (`findings`: `CompletionOutput`s) with the agent's two
    session turns, greedy, as `scripts/review_claims.py` does over gRPC, and score them."""
    base = [
        [
            PromptSegment(policy_segment),
            PromptSegment(claim),
            PromptSegment(tuple(f.token_ids)),
            PromptSegment(agent.TOOL_REQUEST),
        ]
        for claim, f in zip(claim_segments, findings, strict=True)
    ]
    turn1 = engine_outputs(llm, base, call_tokens)
    calls = [agent.parse_tool_calls(t.text) for t in turn1]
    turn2 = engine_outputs(
        llm,
        [
            [*b, PromptSegment(tuple(t.token_ids)), PromptSegment(agent.tool_output_segment(c))]
            for b, t, c in zip(base, turn1, calls, strict=True)
        ],
        narrative_tokens,
    )
    narratives = [answer_text(t.text) for t in turn2]
    wanted = []
    follows = []
    for f, ex in zip(findings, examples, strict=True):
        obj = _json_object(answer_text(f.text))
        flags = obj.get("flags") if obj else None
        wanted.append(_wanted_calls(flags, ex))
        follows.append(obj.get("narrative") if obj else None)
    cites = [narrative_cites(n, ex) for n, ex in zip(narratives, examples, strict=True)]
    cites = [c for c in cites if c is not None]
    n = max(len(examples), 1)
    return AgentReport(
        num_claims=len(examples),
        calls_share=round(sum(bool(c) for c in calls) / n, 4),
        calls_match_share=round(
            sum(w is not None and c == w for c, w in zip(calls, wanted, strict=True)) / n, 4
        ),
        narrative_cites_share=round(sum(cites) / len(cites), 4) if cites else None,
        narrative_follows_findings_share=round(
            sum(a == b for a, b in zip(narratives, follows, strict=True)) / n, 4
        ),
        samples=[
            {"claim_id": ex.claim.claim_id, "tool_calls": t.text, "narrative": nar}
            for ex, t, nar in list(zip(examples, turn1, narratives, strict=True))[:num_samples]
        ],
    )


def _json_object(text: str) -> dict | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _wanted_calls(flags: object, example: Example) -> list[tuple[str, str]] | None:
    """The calls `agent.tool_calls` makes for the model's own flags (None if they do not parse)."""
    codes = {line.number: line.code for line in example.claim.lines}
    if not isinstance(flags, list) or not all(
        isinstance(f, dict) and f.get("line") in codes for f in flags
    ):
        return None
    pairs = [(str(f.get("code")), f["line"]) for f in flags]
    return agent.parse_tool_calls(agent.tool_calls(pairs, codes))

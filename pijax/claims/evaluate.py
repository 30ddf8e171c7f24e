"""Evaluate a claim-review model on held-out synthetic claims.

Two measures, both against the rules' ground truth (`rules.review`):
  * schema-valid share: the answer parses as JSON and validates against the findings schema;
  * flag-match share: the set of (flag code, line) pairs equals the true set.
Exact match (the whole findings object, narrative included) is reported beside them.

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

from pijax.claims.corpus import Example
from pijax.claims.prompt import answer_text, render_findings_json
from pijax.claims.schema import findings_schema, is_valid_findings
from pijax.model.llama import LlamaModel
from pijax.request import SamplingParams


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


@dataclasses.dataclass(frozen=True)
class Score:
    parsed: bool
    schema_valid: bool
    flags_match: bool
    action_match: bool
    exact_match: bool


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
        flags_match = False
    action = isinstance(obj, dict) and obj.get("recommended_action") == truth["recommended_action"]
    return Score(True, valid, flags_match, action, obj == truth)


@dataclasses.dataclass(frozen=True)
class EvalReport:
    num_claims: int
    parsed_share: float
    schema_valid_share: float
    flags_match_share: float
    action_match_share: float
    exact_match_share: float
    samples: list[dict]  # a few (claim id, answer, truth) for reading

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def summarize(
    answers: Sequence[str], examples: Sequence[Example], num_samples: int = 3
) -> EvalReport:
    scores = [score_answer(a, ex) for a, ex in zip(answers, examples, strict=True)]
    n = len(scores)

    def share(field: str) -> float:
        return round(sum(getattr(s, field) for s in scores) / max(n, 1), 4)

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
    )


def engine_texts(
    llm,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    constrained: bool = False,
    params: SamplingParams | None = None,
) -> list[str]:
    """Completions from a `pijax.LLM`; greedy unless `params` says otherwise (it then sets the
    token budget too). `constrained`: the findings schema as structured output."""
    params = params or SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    if constrained:
        params = dataclasses.replace(params, json_schema=json.dumps(findings_schema()))
    return [out.text for out in llm.generate(list(prompts), params)]


def evaluate_unconstrained(
    llm, prompts: Sequence[str], examples: Sequence[Example], max_new_tokens: int
) -> EvalReport:
    return summarize(engine_texts(llm, prompts, max_new_tokens), examples)


def evaluate_constrained(
    llm, prompts: Sequence[str], examples: Sequence[Example], max_new_tokens: int
) -> EvalReport:
    """The same evaluation with the findings schema as structured output."""
    return summarize(engine_texts(llm, prompts, max_new_tokens, constrained=True), examples)

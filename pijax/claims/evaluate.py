"""Evaluate a claim-review model on held-out synthetic claims.

Two measures, both against the rules' ground truth (`rules.review`):
  * schema-valid share: the answer parses as JSON and validates against the findings schema;
  * flag-match share: the set of (flag code, line) pairs equals the true set.
Exact match (the whole findings object, narrative included) is reported beside them.

Decoding here is plain greedy, unconstrained, through the model's own paged forward (`LlamaModel
.__call__`) with a KV pool laid out contiguously per sequence: a self-contained loop so the
training script and the tests have a reference independent of the engine's scheduler. The
evaluations themselves run through the engine (`pijax.LLM`), unconstrained and, through the
`evaluate_constrained` hook, with JSON-schema constrained decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pijax.claims.corpus import Example
from pijax.claims.prompt import answer_text, render_findings_json
from pijax.claims.schema import is_valid_findings
from pijax.kv_pool import LayerKV
from pijax.model.llama import LlamaModel
from pijax.model.metadata import AttentionMetadata

_CHUNK = 32  # the reference attention's token chunk: token counts are padded to a multiple


class PagedGreedyDecoder:
    """Greedy decoding of a batch of prompts through the model's paged forward.

    Sequence `s` of a batch owns pages `1 + s*W ... (s+1)*W` (page 0 is the null page every
    padded token writes into). One jitted prefill over all prompts of a batch, then one jitted
    decode step per token; shapes are fixed per decoder, so each compiles once.
    """

    def __init__(
        self,
        model: LlamaModel,
        *,
        batch_size: int,
        max_prompt_len: int,
        max_new_tokens: int,
        page_size: int = 16,
    ):
        cfg = model.config
        self.batch_size, self.page_size = batch_size, page_size
        self.max_prompt_len, self.max_new_tokens = max_prompt_len, max_new_tokens
        self.pages_per_seq = math.ceil((max_prompt_len + max_new_tokens) / page_size)
        num_pages = 1 + batch_size * self.pages_per_seq
        shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        dtype = model.embed_tokens.embedding[...].dtype
        self._pool_spec = (cfg.num_layers, shape, dtype)
        self.block_tables = 1 + np.arange(batch_size * self.pages_per_seq, dtype=np.int32).reshape(
            batch_size, self.pages_per_seq
        )
        graphdef, state = nnx.split(model)
        self._state = state

        @functools.partial(jax.jit, donate_argnums=(1,))
        def run(state, pool, tokens, positions, meta, logits_indices):
            logits, pool = nnx.merge(graphdef, state)(tokens, positions, pool, meta, logits_indices)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), pool

        self._run = run

    def _new_pool(self):
        layers, shape, dtype = self._pool_spec
        return tuple(
            LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(layers)
        )

    def _slots(self, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        pages = self.block_tables[seq, pos // self.page_size]
        return (pages * self.page_size + pos % self.page_size).astype(np.int32)

    def _meta(self, slots, kv_lens, cu_q_lens) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=jnp.asarray(slots),
            kv_lens=jnp.asarray(kv_lens, jnp.int32),
            block_tables=jnp.asarray(self.block_tables),
            cu_q_lens=jnp.asarray(cu_q_lens, jnp.int32),
            num_seqs=jnp.asarray(self.batch_size, jnp.int32),
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int]
    ) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            real = len(chunk)
            chunk += [chunk[0]] * (self.batch_size - real)  # padding rows, discarded
            out += self._generate_batch(chunk, set(stop_ids))[:real]
        return out

    def _generate_batch(self, prompts: list[Sequence[int]], stop_ids: set[int]) -> list[list[int]]:
        lens = np.array([len(p) for p in prompts], np.int32)
        if lens.min() < 1 or lens.max() > self.max_prompt_len:
            raise ValueError(
                f"prompt lengths must be in [1, {self.max_prompt_len}]; "
                f"got {lens.min()}..{lens.max()}"
            )
        total = self.batch_size * _round_up(self.max_prompt_len, _CHUNK)
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        tokens = np.zeros(total, np.int32)
        positions = np.zeros(total, np.int32)
        slots = np.arange(total, dtype=np.int32) % self.page_size  # padding -> the null page
        for s, p in enumerate(prompts):
            pos = np.arange(len(p), dtype=np.int32)
            tokens[cu[s] : cu[s + 1]] = p
            positions[cu[s] : cu[s + 1]] = pos
            slots[cu[s] : cu[s + 1]] = self._slots(np.full_like(pos, s), pos)
        pool = self._new_pool()
        nxt, pool = self._run(
            self._state,
            pool,
            jnp.asarray(tokens),
            jnp.asarray(positions),
            self._meta(slots, lens, cu),
            jnp.asarray(cu[1:] - 1),
        )
        seqs = np.arange(self.batch_size, dtype=np.int32)
        step_cu = np.arange(self.batch_size + 1, dtype=np.int32)
        generated: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(self.batch_size, bool)
        pos = lens.copy()
        for _ in range(self.max_new_tokens):
            sampled = np.asarray(jax.device_get(nxt))
            for s in np.flatnonzero(~done):
                generated[s].append(int(sampled[s]))
                done[s] = sampled[s] in stop_ids
            if done.all() or pos.max() >= self.max_prompt_len + self.max_new_tokens - 1:
                break
            nxt, pool = self._run(
                self._state,
                pool,
                jnp.asarray(sampled),
                jnp.asarray(pos),
                self._meta(self._slots(seqs, pos), pos + 1, step_cu),
                jnp.asarray(seqs),
            )
            pos = pos + 1
        return generated


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


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
    new_constraint: Callable[[], object] | None = None,
    params=None,
) -> list[str]:
    """Completions from a `pijax.LLM`, all prompts queued at once (continuous batching); greedy
    unless `params` (a `SamplingParams`, which then sets the token budget too) says otherwise.

    With `new_constraint`, each request gets its own token constraint (structured output); the
    caller supplies the factory, e.g. a compiled findings schema from `pijax.structured`,
    so this module does not import the serving layer.
    """
    from pijax.request import SamplingParams

    params = params or SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    if new_constraint is None:
        return [out.text for out in llm.generate(list(prompts), params)]
    engine = llm.engine
    ids = [f"eval-constrained-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params, constraint=new_constraint())
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.text
    return [final[rid] for rid in ids]


def evaluate_unconstrained(
    llm, prompts: Sequence[str], examples: Sequence[Example], max_new_tokens: int
) -> EvalReport:
    return summarize(engine_texts(llm, prompts, max_new_tokens), examples)


def evaluate_constrained(
    llm,
    prompts: Sequence[str],
    examples: Sequence[Example],
    max_new_tokens: int,
    new_constraint: Callable[[], object] | None,
) -> EvalReport | None:
    """HOOK: the same evaluation under JSON-schema constrained decoding.

    `new_constraint` builds one `pijax.request.TokenConstraint` per request for the findings
    schema (`schema.findings_schema()`); None (no structured-output support available) skips the
    evaluation and returns None.
    """
    if new_constraint is None:
        return None
    return summarize(engine_texts(llm, prompts, max_new_tokens, new_constraint), examples)

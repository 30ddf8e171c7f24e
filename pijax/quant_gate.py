"""The KV-cache quantization quality gate: a quantized cache is switched on only after it has been
measured against full precision on domain prompts, for this model.

The gate runs the same model over the same prompts twice, with a full-precision pool (`auto`: the
model's dtype) and with the candidate pool (`int8`, `fp8_e4m3`), and measures, per prompt and
overall:

  * greedy agreement: each side decodes up to N tokens greedily on its own; the share of the
    full-precision tokens before the first divergence (1.0 = identical), and where it diverged;
  * teacher forcing along the full-precision trajectory: the prompt plus the full-precision
    continuation is fed through both pools, and at every position that predicts a generated token,
    KL(full || candidate) of the next-token distributions and whether their argmaxes agree. This
    is the decision figure: greedy agreement stops measuring at the first divergence and hides
    how close a divergence was;
  * per-layer attention error: at each layer the same input (the full-precision residual stream)
    attends over a full-precision and over a quantized pool; the relative error
    `||a_q - a|| / ||a||` (Frobenius, over all positions of a prompt) of the attention block's
    output. The input being shared isolates each layer's own quantization error from the error
    carried up from the layers below, so a bad layer (outlier channels) shows as itself.

`Thresholds` (from `configs/quant_gate.json`, or a file of the same form) decide pass or fail;
the result is a JSON `GateReport` naming the model (`model_identity`), the cache dtype, the
settings, the figures and the failed thresholds. `enforce_gate` is what `scripts/serve.py` calls
before building an engine with a quantized cache: no passing report for the same model and dtype,
no start (unless the gate is skipped explicitly, which is logged as a warning).

The harness runs `LlamaModel`'s own paged forward over pools of its own (sequence `s` of a batch
owns a fixed run of pages), through the same `pijax.kernels.dispatch` calls the engine makes, so
the candidate is quantized on write exactly as in serving. It knows nothing of the scheduler: the
engine's tests check that an int8 pool behaves the same under prefix reuse and preemption.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pijax.batch import MIN_SEQS, MIN_TOKENS, MIN_WIDTH, next_pow2
from pijax.config import CacheConfig, DType, KVCacheDType, load_preset, preset_names
from pijax.kv_pool import NULL_PAGE, KVPool, allocate_pool, check_kv_cache_dtype
from pijax.model.llama import rope_inv_freq
from pijax.model.metadata import AttentionMetadata

log = logging.getLogger(__name__)

REPORT_VERSION = 1
THRESHOLDS_RESOURCE = "quant_gate.json"  # in `configs/` (package `pijax.configs`)


class GateError(ValueError):
    """A quantized KV cache may not be switched on: no report, a failing one, or another model's."""


# --- thresholds ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Pass criteria on the overall figures. A threshold set to None is reported, not gated."""

    min_top1_agreement: float | None = 0.99
    max_mean_kl: float | None = 0.01
    min_greedy_agreement: float | None = None
    max_attention_rel_error: float | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise GateError(
                    f"threshold {f.name} must be null or a finite number >= 0; got {v!r}"
                )

    @classmethod
    def from_dict(cls, d: dict, source: str) -> Thresholds:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed) - {"description"})
        if unknown:
            raise GateError(f"{source}: unknown threshold(s) {unknown}; allowed: {allowed}")
        return cls(**{k: d[k] for k in allowed if k in d})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def failures(self, figures: Figures) -> list[str]:
        """One line per failed threshold, naming it, the figure and the limit."""
        out = []
        for name, value, limit, ok in self._checks(figures):
            if limit is not None and not ok:
                out.append(f"{name}: {value:.6g} (limit {limit:.6g})")
        return out

    def _checks(self, fg: Figures):
        yield (
            "min_top1_agreement",
            fg.top1_agreement,
            self.min_top1_agreement,
            self.min_top1_agreement is None or fg.top1_agreement >= self.min_top1_agreement,
        )
        yield (
            "max_mean_kl",
            fg.mean_kl,
            self.max_mean_kl,
            self.max_mean_kl is None or fg.mean_kl <= self.max_mean_kl,
        )
        yield (
            "min_greedy_agreement",
            fg.greedy_agreement,
            self.min_greedy_agreement,
            self.min_greedy_agreement is None or fg.greedy_agreement >= self.min_greedy_agreement,
        )
        yield (
            "max_attention_rel_error",
            fg.max_attention_rel_error,
            self.max_attention_rel_error,
            self.max_attention_rel_error is None
            or fg.max_attention_rel_error <= self.max_attention_rel_error,
        )

    def looser_than(self, floor: Thresholds) -> list[str]:
        """Thresholds of `self` that accept something `floor` would reject."""
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(floor, f.name)
            if theirs is None:
                continue
            looser = mine is None or (mine < theirs if f.name.startswith("min_") else mine > theirs)
            if looser:
                out.append(f"{f.name}={mine} (deployment floor {theirs})")
        return out


def load_thresholds(path: str | Path | None = None) -> Thresholds:
    """Thresholds from a JSON file, or the packaged defaults (`configs/quant_gate.json`)."""
    if path is None:
        res = resources.files("pijax.configs") / THRESHOLDS_RESOURCE
        source, text = f"configs/{THRESHOLDS_RESOURCE}", res.read_text()
    else:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise GateError(f"{source}: cannot read thresholds: {e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise GateError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise GateError(f"{source}: thresholds must be a JSON object")
    return Thresholds.from_dict(d, source)


# --- figures ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptFigures:
    name: str
    num_prompt_tokens: int
    num_generated: int  # full-precision tokens compared (up to and including a stop token)
    greedy_agreement: float  # tokens before the first divergence / num_generated
    first_divergence: int | None  # index into the generated tokens; None = identical
    top1_agreement: float
    mean_kl: float
    max_kl: float
    attention_rel_error: tuple[float, ...]  # per layer

    @property
    def max_attention_rel_error(self) -> float:
        return max(self.attention_rel_error, default=0.0)


@dataclasses.dataclass(frozen=True)
class Figures:
    """Overall figures. Teacher-forced ones are over all compared positions of all prompts;
    greedy agreement is the mean over prompts; the attention error is, per layer, pooled over
    prompts, and `max_attention_rel_error` is the worst layer's."""

    num_prompts: int
    num_positions: int
    top1_agreement: float
    mean_kl: float
    max_kl: float
    greedy_agreement: float
    num_diverged: int
    earliest_divergence: int | None
    attention_rel_error: tuple[float, ...]
    max_attention_rel_error: float
    worst_layer: int


def summarize(prompts: Sequence[PromptFigures], err2: np.ndarray, ref2: np.ndarray) -> Figures:
    """`err2`, `ref2`: squared attention error and reference norms summed per layer."""
    n = np.array([p.num_generated for p in prompts], float)
    layer_err = tuple(float(x) for x in np.sqrt(err2 / np.maximum(ref2, 1e-30)))
    divs = [p.first_divergence for p in prompts if p.first_divergence is not None]
    return Figures(
        num_prompts=len(prompts),
        num_positions=int(n.sum()),
        top1_agreement=float(np.dot(n, [p.top1_agreement for p in prompts]) / n.sum()),
        mean_kl=float(np.dot(n, [p.mean_kl for p in prompts]) / n.sum()),
        max_kl=max(p.max_kl for p in prompts),
        greedy_agreement=float(np.mean([p.greedy_agreement for p in prompts])),
        num_diverged=len(divs),
        earliest_divergence=min(divs) if divs else None,
        attention_rel_error=layer_err,
        max_attention_rel_error=max(layer_err),
        worst_layer=int(np.argmax(layer_err)),
    )


# --- the paged harness --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Rows:
    """One packed ragged batch on the host, and where each of its rows came from."""

    tokens: np.ndarray
    positions: np.ndarray
    meta: AttentionMetadata
    seq: np.ndarray  # harness sequence of each row; -1 for padding
    last_rows: np.ndarray  # [S] row of each metadata sequence's last new token (0 if none)
    order: list[int]  # harness sequence of each metadata sequence


class PagedHarness:
    """Runs a model's paged forward over pools of its own, `batch_size` sequences at a time.

    Sequence `s` owns pages `1 + s*P ... (s+1)*P`; page 0 is the null page padded rows write
    into. Shapes are padded like the engine's batches (powers of two, at least the engine's
    minimum buckets), so the Pallas kernels see shapes they are tuned for; a harness compiles
    one prefill and one decode shape per pool dtype, and one teacher-forced shape.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        model_config,
        model_dtype,
        candidate: KVCacheDType,
        *,
        mesh: Mesh,
        batch_size: int,
        max_len: int,
        page_size: int = 16,
        prefill_chunk: int = 128,
    ):
        if candidate is KVCacheDType.AUTO:
            raise GateError(
                "the candidate kv_cache_dtype must be quantized (int8 or fp8_e4m3); got auto"
            )
        self.graphdef, self.params, self.cfg = graphdef, params, model_config
        self.batch_size, self.page_size, self.chunk = batch_size, page_size, prefill_chunk
        self.pages_per_seq = -(-max_len // page_size)
        self.max_len = max_len
        self.width = next_pow2(self.pages_per_seq, MIN_WIDTH)
        self.seqs_bucket = next_pow2(batch_size, MIN_SEQS)
        self.prefill_rows = next_pow2(batch_size * prefill_chunk, MIN_TOKENS)
        self.decode_rows = next_pow2(batch_size, MIN_TOKENS)
        num_pages = 1 + batch_size * self.pages_per_seq

        def pool(dtype):
            cache = CacheConfig(page_size=page_size, num_pages=num_pages, kv_cache_dtype=dtype)
            return allocate_pool(model_config, cache, num_pages, model_dtype, mesh)

        # ref: full precision; cand: the candidate's own run; probe: the candidate's pages
        # written from the full-precision residual stream (per-layer errors).
        self.pools = {
            "ref": pool(KVCacheDType.AUTO),
            "cand": pool(candidate),
            "probe": pool(candidate),
        }
        self.tables = np.zeros((batch_size, self.width), np.int32)
        self.tables[:, : self.pages_per_seq] = 1 + np.arange(
            batch_size * self.pages_per_seq, dtype=np.int32
        ).reshape(batch_size, -1)

    # -- packing --

    def _pack(self, pieces: dict[int, tuple[Sequence[int], int]], rows: int) -> _Rows:
        """`pieces[s] = (new token ids, position of the first)`: sequences back to back."""
        S, ps = self.seqs_bucket, self.page_size
        tokens = np.zeros(rows, np.int32)
        positions = np.zeros(rows, np.int32)
        slots = np.arange(rows, dtype=np.int32) % ps  # padding rows -> the null page
        seq = np.full(rows, -1, np.int32)
        kv_lens = np.zeros(S, np.int32)
        tables = np.full((S, self.width), NULL_PAGE, np.int32)
        cu = np.zeros(S + 1, np.int32)
        last = np.zeros(S, np.int32)
        order = sorted(pieces)
        t = 0
        for i, s in enumerate(order):
            ids, start = pieces[s]
            n = len(ids)
            pos = np.arange(start, start + n, dtype=np.int32)
            tokens[t : t + n] = ids
            positions[t : t + n] = pos
            slots[t : t + n] = self.tables[s, pos // ps] * ps + pos % ps
            seq[t : t + n] = s
            kv_lens[i], tables[i] = start + n, self.tables[s]
            t += n
            cu[i + 1], last[i] = t, t - 1
        cu[len(order) + 1 :] = t
        meta = AttentionMetadata(
            slot_mapping=slots,
            kv_lens=kv_lens,
            block_tables=tables,
            cu_q_lens=cu,
            num_seqs=np.asarray(len(order), np.int32),
        )
        return _Rows(tokens, positions, meta, seq, last, order)

    def _prefill_steps(self, seqs: Sequence[Sequence[int]]):
        """Lockstep chunked prefill: each step packs the next chunk of every unfinished one."""
        done = [0] * len(seqs)
        while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
            pieces = {}
            for s, toks in enumerate(seqs):
                if done[s] < len(toks):
                    n = min(self.chunk, len(toks) - done[s])
                    pieces[s] = (toks[done[s] : done[s] + n], done[s])
                    done[s] += n
            yield self._pack(pieces, self.prefill_rows), pieces

    # -- runs --

    def _greedy_step(self, pool: KVPool, rows: _Rows):
        return _greedy_fn(
            self.graphdef, self.params, pool, rows.tokens, rows.positions, rows.meta, rows.last_rows
        )

    def greedy(
        self, pool_name: str, prompts: Sequence[Sequence[int]], max_new: int
    ) -> list[list[int]]:
        """Up to `max_new` greedy tokens per prompt (no stopping: callers cut at stop tokens)."""
        self._check(prompts, max_new)
        pool = self.pools[pool_name]
        nxt: dict[int, int] = {}
        for rows, pieces in self._prefill_steps(prompts):
            out, pool = self._greedy_step(pool, rows)
            out = np.asarray(out)
            for i, s in enumerate(rows.order):
                ids, start = pieces[s]
                if start + len(ids) == len(prompts[s]):
                    nxt[s] = int(out[i])
        gen = [[nxt[s]] for s in range(len(prompts))]
        for k in range(1, max_new):
            pieces = {s: ([g[-1]], len(prompts[s]) + k - 1) for s, g in enumerate(gen)}
            rows = self._pack(pieces, self.decode_rows)
            out, pool = self._greedy_step(pool, rows)
            out = np.asarray(out)
            for i, s in enumerate(rows.order):
                gen[s].append(int(out[i]))
        self.pools[pool_name] = pool
        return gen

    def teacher_forced(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ):
        """Feed `prompt + continuation[:-1]` through all three pools.

        Returns, per sequence, KL(ref || cand) and top-1 agreement at the positions predicting
        each continuation token, and per-layer squared attention error and reference norm over
        all of its positions.
        """
        seqs = [list(p) + list(c[:-1]) for p, c in zip(prompts, continuations, strict=True)]
        self._check(prompts, max(len(c) for c in continuations))
        n_layers = self.cfg.num_layers
        kl = [np.zeros(len(c)) for c in continuations]
        agree = [np.zeros(len(c), bool) for c in continuations]
        err2 = np.zeros((len(seqs), n_layers))
        ref2 = np.zeros((len(seqs), n_layers))
        p = self.pools
        for rows, _ in self._prefill_steps(seqs):
            out = _teacher_fn(
                self.graphdef,
                self.params,
                p["ref"],
                p["cand"],
                p["probe"],
                rows.tokens,
                rows.positions,
                rows.meta,
                rows.seq,
            )
            (row_kl, row_agree, e2, r2), (p["ref"], p["cand"], p["probe"]) = out
            row_kl, row_agree = np.asarray(row_kl), np.asarray(row_agree)
            err2 += np.asarray(e2)[: len(seqs)]
            ref2 += np.asarray(r2)[: len(seqs)]
            for r in np.flatnonzero(rows.seq >= 0):
                s = rows.seq[r]
                j = rows.positions[r] - (len(prompts[s]) - 1)  # continuation token predicted
                if 0 <= j < len(continuations[s]):
                    kl[s][j], agree[s][j] = row_kl[r], row_agree[r]
        return kl, agree, err2, ref2

    def _check(self, prompts, max_new):
        if len(prompts) > self.batch_size:
            raise ValueError(f"{len(prompts)} sequences > batch_size={self.batch_size}")
        longest = max(len(p) for p in prompts) + max_new
        if min(len(p) for p in prompts) < 1 or longest > self.max_len:
            raise ValueError(f"prompt + new tokens must be in [2, {self.max_len}]; got {longest}")


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _greedy_fn(graphdef, params, pool: KVPool, tokens, positions, meta, logits_indices):
    logits, pool = nnx.merge(graphdef, params)(tokens, positions, pool, meta, logits_indices)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), pool


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2, 3, 4))
def _teacher_fn(
    graphdef, params, ref: KVPool, cand: KVPool, probe: KVPool, tokens, positions, meta, row_seq
):
    model = nnx.merge(graphdef, params)
    rows = jnp.arange(tokens.shape[0])
    ref_logits, new_ref = model(tokens, positions, ref, meta, rows)
    cand_logits, new_cand = model(tokens, positions, cand, meta, rows)
    lp_ref = jax.nn.log_softmax(ref_logits, axis=-1)
    lp_cand = jax.nn.log_softmax(cand_logits, axis=-1)
    kl = jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp_cand), axis=-1)
    agree = jnp.argmax(ref_logits, axis=-1) == jnp.argmax(cand_logits, axis=-1)

    # Per-layer probe: the full-precision stream's normalized input attends over the reference
    # pool (as written by the model call above, same values) and over the probe pool.
    inv_freq = rope_inv_freq(model.config)
    x = model.embed_tokens(tokens)
    valid = (row_seq >= 0)[:, None]
    segments = jnp.where(row_seq >= 0, row_seq, meta.kv_lens.shape[0])
    err2, ref2, new_probe = [], [], []
    for layer, c_ref, c_probe in zip(model.layers, ref, probe, strict=True):
        h = layer.input_layernorm(x)
        a_ref, _ = layer.self_attn(h, positions, inv_freq, c_ref, meta)
        a_q, c_probe = layer.self_attn(h, positions, inv_freq, c_probe, meta)
        new_probe.append(c_probe)
        d = jnp.where(valid, (a_q - a_ref).astype(jnp.float32), 0.0)
        a = jnp.where(valid, a_ref.astype(jnp.float32), 0.0)
        num = meta.kv_lens.shape[0] + 1
        err2.append(jax.ops.segment_sum(jnp.sum(d * d, -1), segments, num)[:-1])
        ref2.append(jax.ops.segment_sum(jnp.sum(a * a, -1), segments, num)[:-1])
        x, _ = layer(x, positions, inv_freq, c_ref, meta)
    figures = (kl, agree, jnp.stack(err2, -1), jnp.stack(ref2, -1))
    return figures, (new_ref, new_cand, tuple(new_probe))


# --- evaluation ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GatePrompt:
    name: str
    token_ids: tuple[int, ...]


def evaluate(
    harness: PagedHarness,
    prompts: Sequence[GatePrompt],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
) -> tuple[Figures, list[PromptFigures]]:
    """All figures for `prompts`, `harness.batch_size` at a time."""
    per_prompt: list[PromptFigures] = []
    err2 = np.zeros(harness.cfg.num_layers)
    ref2 = np.zeros(harness.cfg.num_layers)
    stops = set(stop_ids)
    for b in range(0, len(prompts), harness.batch_size):
        batch = prompts[b : b + harness.batch_size]
        ids = [list(p.token_ids) for p in batch]
        ref_gen = [_cut_at_stop(g, stops) for g in harness.greedy("ref", ids, max_new_tokens)]
        cand_gen = harness.greedy("cand", ids, max_new_tokens)
        kl, agree, e2, r2 = harness.teacher_forced(ids, ref_gen)
        err2 += e2.sum(0)
        ref2 += r2.sum(0)
        for i, p in enumerate(batch):
            n = len(ref_gen[i])
            div = next((j for j in range(n) if cand_gen[i][j] != ref_gen[i][j]), None)
            per_prompt.append(
                PromptFigures(
                    name=p.name,
                    num_prompt_tokens=len(p.token_ids),
                    num_generated=n,
                    greedy_agreement=(n if div is None else div) / n,
                    first_divergence=div,
                    top1_agreement=float(agree[i].mean()),
                    mean_kl=float(kl[i].mean()),
                    max_kl=float(kl[i].max()),
                    attention_rel_error=tuple(
                        float(x) for x in np.sqrt(e2[i] / np.maximum(r2[i], 1e-30))
                    ),
                )
            )
        log.info("gate: %d/%d prompts evaluated", len(per_prompt), len(prompts))
    return summarize(per_prompt, err2, ref2), per_prompt


def _cut_at_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for j, t in enumerate(tokens):
        if t in stops:
            return tokens[: j + 1]
    return tokens


# --- prompts ------------------------------------------------------------------------------------


def claims_prompts(
    tokenizer, num: int, seed: int, max_prompt_tokens: int | None = None
) -> list[GatePrompt] | None:
    """Claim-review prompts of the payment-integrity generator (`pijax.claims`): the policy
    scaffold plus a held-out synthetic claim, at their natural length. None when the package is
    not installed. Over-long prompts keep their end (the claim and the review marker)."""
    try:
        from pijax.claims.corpus import generate_example
        from pijax.claims.prompt import policy_scaffold, render_prompt
    except ImportError:
        return None
    out = []
    for i in range(num):
        ex = generate_example(seed, i, split="heldout")
        ids = tokenizer.encode(render_prompt(policy_scaffold(), ex.claim))
        out.append(
            GatePrompt(f"claims/heldout/{seed}/{i}", tuple(_keep_end(ids, max_prompt_tokens)))
        )
    return out


def random_prompts(
    vocab_size: int,
    num: int,
    seed: int,
    max_prompt_tokens: int | None = None,
    exclude: Sequence[int] = (),
) -> list[GatePrompt]:
    """SYNTHETIC RANDOM prompts, not domain data: a shared random "scaffold" (standing in for a
    policy prefix) plus a random "claim" of log-normal length. For models without a domain
    generator; a gate on these says nothing about claims."""
    rng = np.random.default_rng(seed)
    limit = max_prompt_tokens or 1024
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(exclude, int))
    scaffold = rng.choice(allowed, size=max(1, limit // 2)).tolist()
    out = []
    for i in range(num):
        n = int(np.clip(rng.lognormal(math.log(max(limit // 4, 1)), 0.5), 1, limit - len(scaffold)))
        claim = rng.choice(allowed, size=max(n, 1)).tolist()
        out.append(GatePrompt(f"synthetic-random/{seed}/{i}", tuple(scaffold + claim)))
    return out


def jsonl_prompts(
    path: str | Path, tokenizer, vocab_size: int, max_prompt_tokens: int | None = None
) -> list[GatePrompt]:
    """One JSON object a line: `{"prompt": "text"}` or `{"prompt_token_ids": [...]}`, with an
    optional `"id"`."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise GateError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(rec, dict) or ("prompt" in rec) == ("prompt_token_ids" in rec):
            raise GateError(f"{where}: need exactly one of 'prompt' (text) or 'prompt_token_ids'")
        if "prompt" in rec:
            ids = tokenizer.encode(str(rec["prompt"]))
        else:
            ids = rec["prompt_token_ids"]
            if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
                raise GateError(f"{where}: prompt_token_ids must be integers in [0, {vocab_size})")
        if not ids:
            raise GateError(f"{where}: empty prompt")
        name = str(rec.get("id", f"{Path(path).name}:{n}"))
        out.append(GatePrompt(name, tuple(_keep_end(ids, max_prompt_tokens))))
    if not out:
        raise GateError(f"{path}: no prompts")
    return out


def _keep_end(ids: Sequence[int], limit: int | None) -> list[int]:
    return list(ids) if limit is None or len(ids) <= limit else list(ids[-limit:])


# --- model identity and reports -----------------------------------------------------------------


def model_identity(source: str | Path) -> tuple[str, str]:
    """(model id, fingerprint) of a model source as `load_model` resolves it (a directory wins
    over a preset of the same name). The fingerprint covers the checkpoint's files (names, sizes,
    contents; the first and last MiB of files over 8 MiB), so a checkpoint replaced in place
    is another model."""
    path = Path(source).expanduser()
    if path.is_dir():
        return f"dir:{path.resolve()}", _dir_fingerprint(path)
    if str(source) in preset_names():
        preset = json.dumps(load_preset(str(source)), sort_keys=True).encode()
        return f"preset:{source}", "sha256:" + hashlib.sha256(preset).hexdigest()
    raise GateError(
        f"{source}: no such checkpoint directory, and not a preset; presets: {preset_names()}"
    )


def _dir_fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    big, edge = 8 << 20, 1 << 20
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= big:
                h.update(fh.read())
            else:
                h.update(fh.read(edge))
                fh.seek(size - edge)
                h.update(fh.read(edge))
    return "sha256:" + h.hexdigest()


@dataclasses.dataclass(frozen=True)
class GateReport:
    model_id: str
    model_fingerprint: str
    kv_cache_dtype: str
    passed: bool
    failures: tuple[str, ...]
    thresholds: Thresholds
    figures: Figures
    prompts: tuple[PromptFigures, ...]
    settings: dict
    version: int = REPORT_VERSION

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "model_id": self.model_id,
            "model_fingerprint": self.model_fingerprint,
            "kv_cache_dtype": self.kv_cache_dtype,
            "passed": self.passed,
            "failures": list(self.failures),
            "thresholds": self.thresholds.to_dict(),
            "figures": dataclasses.asdict(self.figures),
            "settings": self.settings,
            "prompts": [dataclasses.asdict(p) for p in self.prompts],
        }

    @classmethod
    def from_json(cls, d: dict, source: str) -> GateReport:
        if not isinstance(d, dict) or d.get("version") != REPORT_VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise GateError(
                f"{source}: not a version-{REPORT_VERSION} KV quant gate report (version {got!r})"
            )
        try:
            fig = dict(d["figures"])
            fig["attention_rel_error"] = tuple(fig["attention_rel_error"])
            prompts = tuple(
                PromptFigures(**{**p, "attention_rel_error": tuple(p["attention_rel_error"])})
                for p in d["prompts"]
            )
            return cls(
                model_id=d["model_id"],
                model_fingerprint=d["model_fingerprint"],
                kv_cache_dtype=d["kv_cache_dtype"],
                passed=bool(d["passed"]),
                failures=tuple(d["failures"]),
                thresholds=Thresholds.from_dict(d["thresholds"], source),
                figures=Figures(**fig),
                prompts=prompts,
                settings=dict(d["settings"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise GateError(f"{source}: malformed KV quant gate report: {e!r}") from None


def make_report(
    source: str,
    kv_dtype: KVCacheDType,
    thresholds: Thresholds,
    figures: Figures,
    prompts: Sequence[PromptFigures],
    settings: dict,
) -> GateReport:
    model_id, fingerprint = model_identity(source)
    failures = tuple(thresholds.failures(figures))
    settings = {
        **settings,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return GateReport(
        model_id,
        fingerprint,
        kv_dtype.value,
        not failures,
        failures,
        thresholds,
        figures,
        tuple(prompts),
        settings,
    )


def write_report(report: GateReport, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")


def read_report(path: str | Path) -> GateReport:
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise GateError(f"KV quant gate report {path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise GateError(f"KV quant gate report {path}: not valid JSON: {e}") from None
    return GateReport.from_json(d, str(path))


def check_gate_report(path: str | Path, model_id: str, dtype: KVCacheDType | str) -> GateReport:
    """The report at `path` if it is a passing gate for model source `model_id` (a checkpoint
    directory or preset name, as given to `serve.py --model`) and cache `dtype`; else GateError.

    Passing means: the same model (its fingerprint; a moved copy of the same checkpoint counts),
    the same dtype, every threshold met when re-checked from the recorded figures (a hand-edited
    `passed` does not count), and thresholds no looser than the packaged defaults
    (`configs/quant_gate.json`), which are the deployment's floor.
    """
    dtype = KVCacheDType.parse(dtype)
    report = read_report(path)
    where = f"KV quant gate report {path}"
    if report.kv_cache_dtype != dtype.value:
        raise GateError(
            f"{where} is for kv_cache_dtype={report.kv_cache_dtype}, not "
            f"{dtype.value}; run scripts/kv_quant_eval.py --kv_cache_dtype="
            f"{dtype.value}"
        )
    want_id, want_fp = model_identity(model_id)
    if report.model_fingerprint != want_fp:
        raise GateError(
            f"{where} is for model {report.model_id} ({report.model_fingerprint[:19]}"
            f"...), not {want_id} ({want_fp[:19]}...): gate this model"
        )
    if report.model_id != want_id:
        log.info("%s was made for %s; %s has the same fingerprint", where, report.model_id, want_id)
    failures = report.thresholds.failures(report.figures)
    if failures or not report.passed:
        raise GateError(
            f"{where}: the gate FAILED for {want_id} {dtype.value}: "
            + "; ".join(failures or ["report marked as failed"])
        )
    looser = report.thresholds.looser_than(load_thresholds())
    if looser:
        raise GateError(
            f"{where} passed under thresholds looser than the deployment's "
            f"(configs/{THRESHOLDS_RESOURCE}): " + "; ".join(looser)
        )
    return report


def enforce_gate(
    kv_cache_dtype: KVCacheDType | str,
    model_source: str,
    gate_report_path: str | None,
    skip_gate: bool,
) -> None:
    """Refuse to start a quantized KV cache without a passing gate report for this model and
    dtype (`check_gate_report`). `skip_gate` starts anyway, with a warning in the log."""
    dtype = KVCacheDType.parse(kv_cache_dtype)
    if dtype is KVCacheDType.AUTO:
        return
    if skip_gate:
        log.warning(
            "kv_cache_dtype=%s for %s WITHOUT a quality gate (--skip_kv_quant_gate): "
            "output quality against full precision is unmeasured",
            dtype.value,
            model_source,
        )
        return
    if not gate_report_path:
        raise GateError(
            f"kv_cache_dtype={dtype.value} needs a passing quality-gate report for this model: "
            f"run `python scripts/kv_quant_eval.py --model={model_source} "
            f"--kv_cache_dtype={dtype.value} --report=PATH` and pass "
            "--kv_quant_gate_report=PATH (or --skip_kv_quant_gate, logged as a warning)"
        )
    report = check_gate_report(gate_report_path, model_source, dtype)
    fg = report.figures
    log.info(
        "KV quant gate passed for %s %s (%s): top-1 agreement %.4f, mean KL %.2e, greedy "
        "agreement %.3f, worst layer attention error %.2e over %d prompts",
        report.model_id,
        dtype.value,
        gate_report_path,
        fg.top1_agreement,
        fg.mean_kl,
        fg.greedy_agreement,
        fg.max_attention_rel_error,
        fg.num_prompts,
    )


# --- one gate run -------------------------------------------------------------------------------


class PromptSource:
    AUTO = "auto"  # the claims generator when installed, else synthetic random (with a warning)
    CLAIMS = "claims"
    RANDOM = "random"
    JSONL = "jsonl"
    ALL = (AUTO, CLAIMS, RANDOM, JSONL)


@dataclasses.dataclass(frozen=True)
class GateSettings:
    model: str  # checkpoint directory or preset name
    kv_cache_dtype: KVCacheDType
    prompt_source: str = PromptSource.AUTO
    prompts_jsonl: str | None = None
    num_prompts: int = 16
    max_new_tokens: int = 64
    max_prompt_tokens: int | None = None
    prompt_seed: int = 0
    dtype: str = "float32"  # weights and activations; the reference pool has this dtype
    attention_impl: str = "auto"
    page_size: int = 16
    prefill_chunk: int = 128
    batch_size: int = 8
    model_seed: int = 0  # random presets only

    def __post_init__(self):
        object.__setattr__(self, "kv_cache_dtype", KVCacheDType.parse(self.kv_cache_dtype))
        if self.prompt_source not in PromptSource.ALL:
            raise GateError(
                f"prompt_source must be one of {list(PromptSource.ALL)}; got {self.prompt_source!r}"
            )
        if (self.prompt_source == PromptSource.JSONL) != (self.prompts_jsonl is not None):
            raise GateError("prompts_jsonl is required with prompt_source=jsonl, and only then")
        for name in ("num_prompts", "max_new_tokens", "page_size", "prefill_chunk", "batch_size"):
            if getattr(self, name) < 1:
                raise GateError(f"{name} must be >= 1; got {getattr(self, name)}")


def gate_prompts(
    s: GateSettings, tokenizer, vocab_size: int, stop_ids: Sequence[int]
) -> tuple[str, list[GatePrompt]]:
    """(the source actually used, the prompts)."""
    if s.prompt_source == PromptSource.JSONL:
        return PromptSource.JSONL, jsonl_prompts(
            s.prompts_jsonl, tokenizer, vocab_size, s.max_prompt_tokens
        )
    if s.prompt_source in (PromptSource.AUTO, PromptSource.CLAIMS):
        got = claims_prompts(tokenizer, s.num_prompts, s.prompt_seed, s.max_prompt_tokens)
        if got is not None:
            return PromptSource.CLAIMS, got
        if s.prompt_source == PromptSource.CLAIMS:
            raise GateError("prompt_source=claims needs the pijax.claims package")
        log.warning(
            "pijax.claims is not installed: gating on SYNTHETIC RANDOM prompts, which "
            "say nothing about claim review; pass --prompts_jsonl for domain prompts"
        )
    vocab = min(vocab_size, getattr(tokenizer, "vocab_size", vocab_size))
    return PromptSource.RANDOM, random_prompts(
        vocab, s.num_prompts, s.prompt_seed, s.max_prompt_tokens, exclude=stop_ids
    )


def run_gate(
    s: GateSettings, thresholds: Thresholds | None = None, mesh_shape: tuple[int, int] = (1, 1)
) -> GateReport:
    """Load the model, build the prompts, measure, and judge. Never raises on a failing gate:
    the report says so (`passed`, `failures`)."""
    from pijax.model.loader import load_model
    from pijax.sharding import make_mesh

    thresholds = thresholds or load_thresholds()
    check_kv_cache_dtype(s.kv_cache_dtype)  # before loading weights
    mesh = make_mesh(mesh_shape)
    model = load_model(
        s.model, dtype=s.dtype, mesh=mesh, attention_impl=s.attention_impl, seed=s.model_seed
    )
    stop_ids = tuple(model.eos_token_ids)
    source, prompts = gate_prompts(s, model.tokenizer, model.config.vocab_size, stop_ids)
    prompts = prompts[: s.num_prompts]
    max_len = max(len(p.token_ids) for p in prompts) + s.max_new_tokens
    harness = PagedHarness(
        model.graphdef,
        model.params,
        model.config,
        DType.parse(s.dtype).jnp,
        s.kv_cache_dtype,
        mesh=mesh,
        batch_size=min(s.batch_size, len(prompts)),
        max_len=max_len,
        page_size=s.page_size,
        prefill_chunk=s.prefill_chunk,
    )
    log.info(
        "gate: %s vs auto on %d %s prompts (%d-%d tokens), %d new tokens each",
        s.kv_cache_dtype.value,
        len(prompts),
        source,
        min(len(p.token_ids) for p in prompts),
        max(len(p.token_ids) for p in prompts),
        s.max_new_tokens,
    )
    figures, per_prompt = evaluate(harness, prompts, s.max_new_tokens, stop_ids)
    settings = {
        k: (v.value if isinstance(v, KVCacheDType) else v) for k, v in dataclasses.asdict(s).items()
    }
    settings["prompt_source_used"] = source
    return make_report(s.model, s.kv_cache_dtype, thresholds, figures, per_prompt, settings)

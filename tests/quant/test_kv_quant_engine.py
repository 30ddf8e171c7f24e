"""An int8 KV pool through the real engine (tiny random model, CPU reference path).

Model: the `tiny-random` preset (seed 0) as initialized (embeddings N(0, 1), projections
N(0, 1/fan_in)), with the LM head scaled by LM_HEAD_SCALE = 4 so next-token distributions are
peaked rather than flat: logit std ~4 over 320 tokens instead of ~1, mean top-1 probability ~0.5
instead of ~0.04 (uniform: 0.003). Top-1 agreement itself does not depend on that scale (it
scales logits and their perturbation alike); KL does, and a peaked distribution is the realistic
case for it.

Every engine here has the same small bucket limits (at most 4 sequences, 64 tokens of context,
64 tokens a step: 3 step shapes), so engines of one pool dtype share their few compilations.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from pijax.config import engine_config_from_overrides
from pijax.engine import Engine
from pijax.model.loader import load_model
from pijax.quant_gate import GatePrompt, PoolComparisonProbe, evaluate
from pijax.request import PromptSegment, SamplingParams, Scope
from pijax.sharding import make_mesh

LM_HEAD_SCALE = 4.0
OPTS = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, page_size=16)
N = 16  # generated tokens per prompt: 8 x 16 = 128 teacher-forced positions
rng = np.random.default_rng(7)
PROMPTS = [rng.integers(1, 256, n).tolist() for n in (17, 20, 24, 27, 31, 36, 40, 44)]


@pytest.fixture(scope="module")
def sharp():
    mesh = make_mesh((1, 1))
    m = load_model("tiny-random", dtype="float32", mesh=mesh, seed=0)

    def scale(path, x):
        return x * LM_HEAD_SCALE if "lm_head" in jax.tree_util.keystr(path) else x

    return dataclasses.replace(m, params=jax.tree_util.tree_map_with_path(scale, m.params)), mesh


def engine(sharp, **kw) -> Engine:
    model, mesh = sharp
    return Engine(model, engine_config_from_overrides(**{**OPTS, "num_pages": 48, **kw}), mesh)


def greedy(eng: Engine, prompts, max_tokens=N, **kw) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def runs(sharp):
    fp, q = engine(sharp), engine(sharp, kv_cache_dtype="int8")
    ref = greedy(fp, PROMPTS, logprobs=True)
    free = greedy(q, PROMPTS)
    # Teacher forcing through the engine: the int8 engine's next token after every prefix of
    # the full-precision trajectory (one single-token request per position).
    forced = greedy(
        q,
        [p + r.token_ids[:k] for p, r in zip(PROMPTS, ref, strict=True) for k in range(N)],
        max_tokens=1,
        logprobs=True,
    )
    return dict(fp=fp, q=q, ref=ref, free=free, forced=forced)


def test_int8_pool_is_int8_with_written_scales(runs):
    layer = runs["q"].kv_pool[0]
    assert layer.k.dtype == np.int8 and layer.v.dtype == np.int8
    scales = np.asarray(layer.k_scale)
    assert (scales != 1.0).sum() > 0  # written scales replace the pool's initial ones


def test_int8_teacher_forced_top1_agreement_with_full_precision(runs):
    ref_tokens = [t for r in runs["ref"] for t in r.token_ids]
    got = [o.token_ids[0] for o in runs["forced"]]
    agreement = np.mean(np.equal(got, ref_tokens))
    assert agreement >= 0.95, agreement
    # Where they agree, the int8 log-probability of the token is close to full precision's.
    ref_lp = np.array([lp for r in runs["ref"] for lp in r.logprobs])
    q_lp = np.array([o.logprobs[0] for o in runs["forced"]])
    same = np.equal(got, ref_tokens)
    assert np.abs(ref_lp[same] - q_lp[same]).max() < 0.05
    assert np.mean(np.exp(ref_lp)) > 0.1  # the peaked distributions the docstring promises


@pytest.mark.slow
def test_pool_comparison_of_a_pool_with_itself_is_exact(sharp):
    """The step's probe variant against a reference pool of the engine's own dtype: the same
    computation, so KL 0, every argmax agrees, attention error exactly 0; and the tokens are
    those of the plain step."""
    eng = engine(sharp)
    probe = PoolComparisonProbe(eng, eng.kv_pool[0].k.dtype)
    forced = [p + [7, 8, 9] for p in PROMPTS[:3]]
    plain = greedy(engine(sharp), forced, max_tokens=4)
    ids = [f"r{i}" for i in range(len(forced))]
    for rid, p in zip(ids, forced, strict=True):
        eng.add_request(rid, p, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step(probe):
            if out.finished:
                done[out.request_id] = out.token_ids
    assert [done[r] for r in ids] == [o.token_ids for o in plain]
    for rid, p in zip(ids, forced, strict=True):
        seen = probe.tokens[rid]
        assert sorted(seen) == list(range(len(p) + 3))  # every computed position, once
        kl, agree, err2, ref2 = (np.array([seen[q][k] for q in sorted(seen)]) for k in range(4))
        assert np.abs(kl).max() < 1e-6 and agree.all()
        assert (err2 == 0).all() and (ref2 > 0).all()


@pytest.mark.slow
def test_gate_figures_through_the_engine(sharp, runs):
    """`quant_gate.evaluate` over a full-precision and an int8 engine: its greedy tokens are the
    engines' own, and its teacher-forced top-1 agreement is the one measured above with
    single-token requests (same model, same trajectories)."""
    fp, q = (
        engine(sharp, enable_prefix_reuse=False),
        engine(sharp, kv_cache_dtype="int8", enable_prefix_reuse=False),
    )
    prompts = [GatePrompt(f"p{i}", tuple(p)) for i, p in enumerate(PROMPTS)]
    figures, per_prompt = evaluate(fp, q, prompts, N)
    eos = set(sharp[0].eos_token_ids)
    ref = [r.token_ids for r in runs["ref"]]
    free = [r.token_ids for r in runs["free"]]
    forced = np.reshape([o.token_ids[0] for o in runs["forced"]], (len(PROMPTS), N))
    agree = []
    for i, (pf, r, f) in enumerate(zip(per_prompt, ref, free, strict=True)):
        n = next((j + 1 for j, t in enumerate(r) if t in eos), N)  # the gate stops at EOS
        assert pf.num_generated == n
        assert pf.first_divergence == next((j for j in range(n) if f[j] != r[j]), None)
        agree += list(np.equal(forced[i, :n], r[:n]))
    assert figures.top1_agreement == pytest.approx(np.mean(agree))
    assert 0 < figures.mean_kl < 0.05
    assert len(figures.attention_rel_error) == 4 and 0 < figures.max_attention_rel_error < 0.05


POLICY = rng.integers(1, 256, 2 * 16).tolist()  # a 32-token "policy scaffold", 2 pages
CLAIMS = [rng.integers(1, 256, n).tolist() for n in (13, 22)]


def test_int8_prefix_reuse_gives_identical_greedy_tokens(sharp, runs):
    def claim(c):
        return [
            PromptSegment(tuple(POLICY), Scope.parse("shared:policy")),
            PromptSegment(tuple(c), Scope()),
        ]

    results, cached = [], []
    for eng in (runs["q"], engine(sharp, kv_cache_dtype="int8", enable_prefix_reuse=False)):
        eng.register_trusted_prefix("policy", POLICY)
        toks = []
        for i, c in enumerate(CLAIMS * 2):  # the second round can reuse the first's pages
            eng.add_request(
                f"c{i}",
                claim(c),
                SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                permitted_zones=frozenset({"policy"}),
            )
            while eng.has_unfinished_requests():
                for out in eng.step():
                    if out.finished:
                        toks.append(out.token_ids)
                        cached.append(out.num_cached_tokens)
        results.append(toks)
    assert max(cached[:4]) == len(POLICY)  # the int8 pages of the scaffold were reused
    assert results[0] == results[1]


@pytest.mark.slow
def test_int8_greedy_identical_under_forced_preemption(sharp, runs, monkeypatch):
    # Admission that projects no growth, so the pool runs out and preemption happens.
    monkeypatch.setattr("pijax.scheduler.GROWTH_RATIO_INIT", 0.0)
    monkeypatch.setattr("pijax.scheduler.GROWTH_RATIO_MIN", 0.0)
    # Four one-page prompts all start; grown to three pages each they need 12 of the 7 pages.
    prompts = [rng.integers(1, 256, n).tolist() for n in (15, 14, 13, 12)]
    roomy = greedy(runs["q"], prompts, max_tokens=33)
    tight = engine(sharp, kv_cache_dtype="int8", num_pages=8)
    got = greedy(tight, prompts, max_tokens=33)
    assert tight.stats().num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in roomy]


@pytest.mark.slow
def test_fp8_pool_on_the_cpu_reference_path(sharp, runs):
    """fp8 e4m3 pages (3 mantissa bits: coarser than int8) through the engine: the pool holds
    float8 with written scales and greedy decoding mostly follows full precision."""
    eng = engine(sharp, kv_cache_dtype="fp8_e4m3")
    free = greedy(eng, PROMPTS[:4])
    layer = eng.kv_pool[0]
    assert layer.k.dtype == jax.numpy.float8_e4m3fn and layer.v.dtype == jax.numpy.float8_e4m3fn
    assert (np.asarray(layer.k_scale) != 1.0).sum() > 0
    first = [o.token_ids[0] for o in free]
    assert first == [r.token_ids[0] for r in runs["ref"][:4]]
    agree = np.mean(
        [
            np.mean(np.equal(o.token_ids, r.token_ids))
            for o, r in zip(free, runs["ref"][:4], strict=True)
        ]
    )
    assert agree >= 0.5, agree

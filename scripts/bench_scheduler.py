"""Scheduler figures, each against the design without it, measured side by side in one run.

    python scripts/bench_scheduler.py                      # tiny-random, CPU-sized defaults
    python scripts/bench_scheduler.py --model DIR --out benchmarks/results/scheduler-gpu

1. Prefix reuse. `--num_requests` (30) requests arrive together, each a registered
   `shared:policy` prefix of `--policy_tokens` (1,024) followed by a private claim of
   `--claim_tokens` (256). TTFT with prefix reuse vs the same engine with reuse off; the policy is
   prefilled once beforehand in both (a warm server), so the difference is the reuse itself.
2. Chunked prefill. `--decoders` (8) requests are decoding when a `--long_prompt` (4,096)-token
   prompt arrives. The inter-token latency of those running decodes from the long prompt's
   arrival until its first token: with chunking (budget `--budget` tokens a step) vs without (the
   prefill runs whole in one step).

Each scenario runs once unmeasured (compilation, with different random tokens) and then
`--repeats` times measured, alternating the two configurations so drift hits both alike. Tokens
are random ids (no tokenizer needed). Writes `OUT.json` and `OUT.md`. On CPU the absolute times
are not performance figures; the ratios are the point.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from pijax.config import DEFAULT_PRESET, engine_config_from_overrides
from pijax.engine import Engine
from pijax.request import PromptSegment, SamplingParams, Scope, ScopeKind

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_PRESET, "HF checkpoint dir, orbax dir or preset name.")
flags.DEFINE_string("out", "benchmarks/results/scheduler-cpu", "Output path without suffix.")
flags.DEFINE_integer("repeats", 2, "Measured repetitions per configuration.")
flags.DEFINE_integer("seed", 0, "Token seed.")
flags.DEFINE_integer("page_size", 16, "KV page size.")
flags.DEFINE_integer("num_requests", 30, "Reuse scenario: concurrent requests.")
flags.DEFINE_integer("policy_tokens", 1024, "Reuse scenario: shared policy prefix length.")
flags.DEFINE_integer("claim_tokens", 256, "Reuse scenario: private claim length.")
flags.DEFINE_integer("output_tokens", 8, "Reuse scenario: tokens generated per request.")
flags.DEFINE_integer("reuse_budget", 512, "Reuse scenario: tokens per step.")
flags.DEFINE_integer("decoders", 8, "Chunking scenario: running decodes.")
flags.DEFINE_integer("long_prompt", 4096, "Chunking scenario: the long prompt's length.")
flags.DEFINE_integer("budget", 256, "Chunking scenario: tokens per step with chunking.")

ZONE = "policy"


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, np.float64), q)) if len(xs) else float("nan")


def summary(xs) -> dict:
    return {
        "n": len(xs),
        "mean": float(np.mean(xs)),
        "p50": pct(xs, 50),
        "p90": pct(xs, 90),
        "p99": pct(xs, 99),
        "max": float(np.max(xs)),
    }


def run_until_done(engine: Engine, on_output=None) -> None:
    while engine.has_unfinished_requests():
        for out in engine.step():
            if on_output is not None:
                on_output(out)


# --- scenario 1: prefix reuse ---------------------------------------------------------------------


@dataclasses.dataclass
class ReuseResult:
    ttft: list[float]
    cached_tokens: int
    prompt_tokens: int
    compilations: int
    seconds: float


def reuse_engine(model, mesh, enable: bool) -> Engine:
    n = FLAGS.num_requests
    per_request = FLAGS.policy_tokens + FLAGS.claim_tokens + FLAGS.output_tokens
    pages = n * (-(-per_request // FLAGS.page_size)) + 2 * FLAGS.policy_tokens // FLAGS.page_size
    cfg = engine_config_from_overrides(
        page_size=FLAGS.page_size,
        num_pages=pages + 8,
        max_num_seqs=n,
        max_num_batched_tokens=FLAGS.reuse_budget,
        max_model_len=per_request + FLAGS.page_size,
        enable_prefix_reuse=enable,
    )
    return Engine(model, cfg, mesh)


def reuse_round(engine: Engine, policy: list[int], rng, tag: str) -> ReuseResult:
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=FLAGS.output_tokens, ignore_eos=True)
    zones = frozenset({ZONE})
    # A warm server: the policy has been prefilled by an earlier request.
    engine.add_request(
        f"{tag}-warm",
        [
            PromptSegment(tuple(policy), Scope(ScopeKind.SHARED, ZONE)),
            PromptSegment(tuple(rng.integers(3, vocab, 16).tolist())),
        ],
        params,
        permitted_zones=zones,
    )
    run_until_done(engine)
    compiles = engine.compile_count
    done = {}
    start = time.perf_counter()
    for i in range(FLAGS.num_requests):
        claim = tuple(rng.integers(3, vocab, FLAGS.claim_tokens).tolist())
        engine.add_request(
            f"{tag}-{i}",
            [PromptSegment(tuple(policy), Scope(ScopeKind.SHARED, ZONE)), PromptSegment(claim)],
            params,
            permitted_zones=zones,
        )
    run_until_done(engine, lambda o: done.__setitem__(o.request_id, o) if o.finished else None)
    seconds = time.perf_counter() - start
    outs = list(done.values())
    return ReuseResult(
        [o.timings.ttft for o in outs],
        sum(o.num_cached_tokens for o in outs),
        sum(o.num_prompt_tokens for o in outs),
        engine.compile_count - compiles,
        seconds,
    )


def scenario_reuse(model, mesh) -> dict:
    rng = np.random.default_rng(FLAGS.seed)
    vocab = model.config.vocab_size
    policy = rng.integers(3, vocab, FLAGS.policy_tokens).tolist()
    engines = {
        "reuse": reuse_engine(model, mesh, True),
        "no-reuse": reuse_engine(model, mesh, False),
    }
    for e in engines.values():
        e.register_trusted_prefix(ZONE, policy)
    results: dict[str, list[ReuseResult]] = {k: [] for k in engines}
    for rep in range(FLAGS.repeats + 1):  # round 0 compiles
        for name, e in engines.items():
            r = reuse_round(e, policy, rng, f"{name}-{rep}")
            logging.info(
                "reuse scenario %s round %d: TTFT p50 %.3fs, %d/%d prompt tokens cached",
                name,
                rep,
                pct(r.ttft, 50),
                r.cached_tokens,
                r.prompt_tokens,
            )
            if rep:
                results[name].append(r)
    out = {}
    for name, rs in results.items():
        ttft = [t for r in rs for t in r.ttft]
        out[name] = {
            "ttft_s": summary(ttft),
            "cached_prompt_share": sum(r.cached_tokens for r in rs)
            / sum(r.prompt_tokens for r in rs),
            "seconds_per_round": float(np.mean([r.seconds for r in rs])),
            "compilations_after_warmup": sum(r.compilations for r in rs),
        }
    out["ratio_no_reuse_over_reuse"] = {
        k: out["no-reuse"]["ttft_s"][k] / out["reuse"]["ttft_s"][k] for k in ("mean", "p50", "p99")
    }
    return out


# --- scenario 2: chunked prefill -----------------------------------------------------------------


def chunk_engine(model, mesh, chunked: bool) -> Engine:
    max_len = FLAGS.long_prompt + 2 * FLAGS.page_size
    pages = (FLAGS.decoders + 1) * (max_len // FLAGS.page_size + 1) + 2
    cfg = engine_config_from_overrides(
        page_size=FLAGS.page_size,
        num_pages=pages,
        max_num_seqs=FLAGS.decoders + 1,
        max_num_batched_tokens=FLAGS.budget if chunked else max_len + FLAGS.decoders,
        max_model_len=max_len,
        enable_chunked_prefill=chunked,
    )
    return Engine(model, cfg, mesh)


def chunk_round(engine: Engine, rng, tag: str) -> dict:
    vocab = engine.model_config.vocab_size
    decode = SamplingParams(temperature=0.0, max_tokens=engine.max_model_len - 64, ignore_eos=True)
    ids = [f"{tag}-d{i}" for i in range(FLAGS.decoders)]
    for rid in ids:
        engine.add_request(rid, rng.integers(3, vocab, 64).tolist(), decode)
    times: dict[str, list[float]] = {rid: [] for rid in ids}
    long_id = f"{tag}-long"
    long_first: list[float] = []

    def record(out):
        now = time.perf_counter()
        if out.request_id in times:
            times[out.request_id].append(now)
        elif out.request_id == long_id and not long_first:
            long_first.append(now)

    while min(len(t) for t in times.values()) < 4:  # all decoding, steady
        for out in engine.step():
            record(out)
    steady = [b - a for t in times.values() for a, b in zip(t[-3:-1], t[-2:], strict=True)]
    compiles = engine.compile_count
    t0 = time.perf_counter()
    engine.add_request(
        long_id,
        rng.integers(3, vocab, FLAGS.long_prompt).tolist(),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
    )
    steps = 0
    while not long_first:
        steps += 1
        for out in engine.step():
            record(out)
    t1 = long_first[0]
    itl = []
    for t in times.values():
        before = [x for x in t if x < t0]
        during = [x for x in t if t0 <= x <= t1]
        marks = before[-1:] + during
        itl += [b - a for a, b in zip(marks, marks[1:], strict=False)]
    for rid in ids:
        engine.abort(rid)
    return {
        "itl": itl,
        "steady": steady,
        "window_s": t1 - t0,
        "steps": steps,
        "long_ttft_s": t1 - t0,
        "compilations": engine.compile_count - compiles,
    }


def scenario_chunking(model, mesh) -> dict:
    rng = np.random.default_rng(FLAGS.seed + 1)
    engines = {
        "chunked": chunk_engine(model, mesh, True),
        "unchunked": chunk_engine(model, mesh, False),
    }
    results: dict[str, list[dict]] = {k: [] for k in engines}
    for rep in range(FLAGS.repeats + 1):
        for name, e in engines.items():
            r = chunk_round(e, rng, f"{name}-{rep}")
            logging.info(
                "chunking scenario %s round %d: %d steps, ITL p99 %.3fs, long TTFT %.3fs",
                name,
                rep,
                r["steps"],
                pct(r["itl"], 99),
                r["long_ttft_s"],
            )
            if rep:
                results[name].append(r)
    out = {}
    for name, rs in results.items():
        out[name] = {
            "itl_during_long_prefill_s": summary([x for r in rs for x in r["itl"]]),
            "itl_steady_decode_s": summary([x for r in rs for x in r["steady"]]),
            "long_prompt_ttft_s": float(np.mean([r["long_ttft_s"] for r in rs])),
            "steps_to_prefill": float(np.mean([r["steps"] for r in rs])),
            "compilations_after_warmup": sum(r["compilations"] for r in rs),
        }
    d = {k: out[k]["itl_during_long_prefill_s"] for k in engines}
    out["ratio_unchunked_over_chunked"] = {
        k: d["unchunked"][k] / d["chunked"][k] for k in ("p50", "p99", "max")
    }
    out["ratio_unchunked_over_chunked"]["long_prompt_ttft"] = (
        out["unchunked"]["long_prompt_ttft_s"] / out["chunked"]["long_prompt_ttft_s"]
    )
    return out


# --- report ---------------------------------------------------------------------------------------


def markdown(res: dict) -> str:
    r, c = res["prefix_reuse"], res["chunked_prefill"]
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    lines = [
        f"# Scheduler figures ({res['device']})",
        "",
        res["note"],
        "",
        f"## Prefix reuse: {FLAGS.num_requests} requests, {FLAGS.policy_tokens}-token shared "
        f"policy + {FLAGS.claim_tokens}-token private claim, arriving together",
        "",
        "| engine | TTFT mean ms | p50 ms | p99 ms | prompt tokens cached | round s | "
        "compilations after warm-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in ("reuse", "no-reuse"):
        t = r[k]["ttft_s"]
        lines.append(
            f"| {k} | {ms(t['mean'])} | {ms(t['p50'])} | {ms(t['p99'])} | "
            f"{100 * r[k]['cached_prompt_share']:.1f}% | {r[k]['seconds_per_round']:.2f} "
            f"| {r[k]['compilations_after_warmup']} |"
        )
    q = r["ratio_no_reuse_over_reuse"]
    lines += [
        "",
        f"TTFT without reuse / with reuse: mean {q['mean']:.2f}x, p50 {q['p50']:.2f}x, "
        f"p99 {q['p99']:.2f}x.",
        "",
        f"## Chunked prefill: {FLAGS.decoders} running decodes while a "
        f"{FLAGS.long_prompt}-token prompt is prefilled (budget {FLAGS.budget} tokens/step "
        "with chunking)",
        "",
        "| engine | ITL during prefill p50 ms | p99 ms | max ms | steady ITL p50 ms | "
        "steps to prefill | long prompt TTFT ms | compilations after warm-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in ("chunked", "unchunked"):
        d, s = c[k]["itl_during_long_prefill_s"], c[k]["itl_steady_decode_s"]
        lines.append(
            f"| {k} | {ms(d['p50'])} | {ms(d['p99'])} | {ms(d['max'])} | "
            f"{ms(s['p50'])} | {c[k]['steps_to_prefill']:.0f} | "
            f"{ms(c[k]['long_prompt_ttft_s'])} | {c[k]['compilations_after_warmup']} |"
        )
    q = c["ratio_unchunked_over_chunked"]
    lines += [
        "",
        f"Decode ITL without chunking / with: p99 {q['p99']:.2f}x, max {q['max']:.2f}x; "
        f"the long prompt's own TTFT without / with: {q['long_prompt_ttft']:.2f}x.",
        "",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    from pijax.model.loader import load_model
    from pijax.sharding import make_mesh

    mesh = make_mesh((1, 1))
    model = load_model(FLAGS.model, dtype="float32", mesh=mesh)
    dev = jax.devices()[0]
    device = f"{dev.platform}: {getattr(dev, 'device_kind', dev.platform)}"
    if dev.platform == "cpu":
        device += f", {platform.machine()}, {len(jax.devices())} device, host CPU"
    res = {
        "device": device,
        "model": FLAGS.model,
        "note": "Same process, same weights, configurations alternated per round. "
        + (
            "CPU run: absolute times are not performance figures; compare the ratios."
            if dev.platform == "cpu"
            else ""
        ),
        "flags": {
            k: FLAGS[k].value
            for k in (
                "repeats",
                "seed",
                "page_size",
                "num_requests",
                "policy_tokens",
                "claim_tokens",
                "output_tokens",
                "reuse_budget",
                "decoders",
                "long_prompt",
                "budget",
            )
        },
    }
    res["prefix_reuse"] = scenario_reuse(model, mesh)
    res["chunked_prefill"] = scenario_chunking(model, mesh)
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    app.run(main)

"""Scheduler figures, each against the design without it, measured side by side in one run.

    python scripts/bench_scheduler.py                      # tiny-random, CPU-sized defaults
    python scripts/bench_scheduler.py --model DIR --out benchmarks/results/scheduler-gpu

1. Prefix reuse. `--num_requests` (30) requests arrive together, each a registered
   `shared:policy` prefix of `--policy_tokens` (1,024) followed by a private claim of
   `--claim_tokens` (256). TTFT with prefix reuse vs the same engine with reuse off; the policy is
   prefilled once beforehand in both (a warm server), so the difference is the reuse itself.
2. Chunked prefill. `--decoders` (8) requests are decoding when a `--long_prompt` (4,096)-token
   prompt arrives. The inter-token latency of those running decodes from the long prompt's
   arrival until its first token (p99 per round): with chunking (budget `--budget` tokens a step)
   vs without (the prefill runs whole in one step).

Both scenarios are the shared probes of `pijax.bench.probes` (`prefix_burst`,
`long_arrival_probe`), which `scripts/bench.py` runs too. Each scenario runs once unmeasured (compilation, with different random tokens) and then
`--repeats` times measured, alternating the two configurations so drift hits both alike. Tokens
are random ids (no tokenizer needed). Writes `OUT.json` and `OUT.md`. On CPU the absolute times
are not performance figures; the ratios are the point.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from pijax import flags as engine_flags
from pijax.bench import probes
from pijax.config import DEFAULT_PRESET, engine_config_from_overrides
from pijax.engine import Engine

FLAGS = flags.FLAGS
# The scenarios size the pool and the step budgets themselves; the rest are engine flags.
engine_flags.define_engine_flags(
    exclude=[
        "num_pages",
        "memory_fraction",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
        "enable_prefix_reuse",
        "enable_chunked_prefill",
    ],
    defaults={"model": DEFAULT_PRESET, "page_size": 16},
)
flags.DEFINE_string("out", "benchmarks/results/scheduler-cpu", "Output path without suffix.")
flags.DEFINE_integer("repeats", 2, "Measured repetitions per configuration.")
flags.DEFINE_integer("token_seed", 0, "Seed of the random token ids.")
flags.DEFINE_integer("num_requests", 30, "Reuse scenario: concurrent requests.")
flags.DEFINE_integer("policy_tokens", 1024, "Reuse scenario: shared policy prefix length.")
flags.DEFINE_integer("claim_tokens", 256, "Reuse scenario: private claim length.")
flags.DEFINE_integer("output_tokens", 8, "Reuse scenario: tokens generated per request.")
flags.DEFINE_integer("reuse_budget", 512, "Reuse scenario: tokens per step.")
flags.DEFINE_integer("decoders", 8, "Chunking scenario: running decodes.")
flags.DEFINE_integer("decode_context", 64, "Chunking scenario: the decodes' prompt length.")
flags.DEFINE_integer("long_prompt", 4096, "Chunking scenario: the long prompt's length.")
flags.DEFINE_integer("budget", 256, "Chunking scenario: tokens per step with chunking.")

SCENARIO_FLAGS = (
    "repeats",
    "token_seed",
    "num_requests",
    "policy_tokens",
    "claim_tokens",
    "output_tokens",
    "reuse_budget",
    "decoders",
    "decode_context",
    "long_prompt",
    "budget",
)


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


def make_engine(model, mesh, **scenario) -> Engine:
    return Engine(
        model, engine_config_from_overrides(**engine_flags.engine_overrides(), **scenario), mesh
    )


def alternate(engines: dict[str, Engine], round_fn) -> dict[str, list[dict]]:
    """Round 0 compiles (unmeasured); then `repeats` rounds, the configurations alternating so
    drift hits both alike."""
    results: dict[str, list[dict]] = {k: [] for k in engines}
    for rep in range(FLAGS.repeats + 1):
        for name, engine in engines.items():
            r = round_fn(engine, f"{name}-{rep}")
            logging.info(
                "%s round %d: %s", name, rep, {k: r[k] for k in sorted(r) if k != "ttft_s"}
            )
            if rep:
                results[name].append(r)
    return results


# --- scenario 1: prefix reuse ---------------------------------------------------------------------


def scenario_reuse(model, mesh) -> dict:
    rng = np.random.default_rng(FLAGS.token_seed)
    vocab = model.config.vocab_size
    page = engine_flags.engine_config().cache.page_size
    policy = rng.integers(3, vocab, FLAGS.policy_tokens).tolist()
    per_request = FLAGS.policy_tokens + FLAGS.claim_tokens + FLAGS.output_tokens
    pages = FLAGS.num_requests * (-(-per_request // page)) + 2 * FLAGS.policy_tokens // page
    sizing = dict(
        num_pages=pages + 8,
        max_num_seqs=FLAGS.num_requests,
        max_num_batched_tokens=FLAGS.reuse_budget,
        max_model_len=per_request + page,
    )
    engines = {
        "reuse": make_engine(model, mesh, enable_prefix_reuse=True, **sizing),
        "no-reuse": make_engine(model, mesh, enable_prefix_reuse=False, **sizing),
    }
    for e in engines.values():
        e.register_trusted_prefix(probes.POLICY_ZONE, policy)

    def round_fn(engine, tag):
        claims = [
            rng.integers(3, vocab, FLAGS.claim_tokens).tolist() for _ in range(FLAGS.num_requests)
        ]
        warm = rng.integers(3, vocab, 16).tolist()
        return probes.prefix_burst(
            engine, policy, claims, warm, output_tokens=FLAGS.output_tokens, tag=tag
        )

    out = {}
    for name, rs in alternate(engines, round_fn).items():
        out[name] = {
            "ttft_s": summary([t for r in rs for t in r["ttft_s"]]),
            "cached_prompt_share": sum(r["cached_tokens"] for r in rs)
            / sum(r["prompt_tokens"] for r in rs),
            "seconds_per_round": float(np.mean([r["seconds"] for r in rs])),
            "compilations_after_warmup": sum(r["compilations"] for r in rs),
        }
    out["ratio_no_reuse_over_reuse"] = {
        k: out["no-reuse"]["ttft_s"][k] / out["reuse"]["ttft_s"][k] for k in ("mean", "p50", "p99")
    }
    return out


# --- scenario 2: chunked prefill -----------------------------------------------------------------


def scenario_chunking(model, mesh) -> dict:
    page = engine_flags.engine_config().cache.page_size
    max_len = FLAGS.long_prompt + 2 * page
    sizing = dict(
        num_pages=(FLAGS.decoders + 1) * (max_len // page + 1) + 2,
        max_num_seqs=FLAGS.decoders + 1,
        max_model_len=max_len,
    )
    engines = {
        "chunked": make_engine(
            model, mesh, enable_chunked_prefill=True, max_num_batched_tokens=FLAGS.budget, **sizing
        ),
        "unchunked": make_engine(
            model,
            mesh,
            enable_chunked_prefill=False,
            max_num_batched_tokens=max_len + FLAGS.decoders,
            **sizing,
        ),
    }
    seeds = iter(range(FLAGS.token_seed + 1, FLAGS.token_seed + 1 + 2 * (FLAGS.repeats + 1)))

    def round_fn(engine, tag):
        del tag
        compiles = engine.compile_count
        r = probes.long_arrival_probe(
            engine,
            decodes=FLAGS.decoders,
            context=FLAGS.decode_context,
            steady_steps=4,
            long_prompt=FLAGS.long_prompt,
            seed=next(seeds),
        )
        return {**r, "compilations": engine.compile_count - compiles}

    out = {}
    for name, rs in alternate(engines, round_fn).items():
        mean = lambda key, rs=rs: float(np.mean([r[key] for r in rs]))  # noqa: E731
        out[name] = {
            "itl_p99_during_long_prefill_s": mean("itl_p99_during_s"),
            "itl_max_during_long_prefill_s": mean("itl_max_during_s"),
            "itl_p99_steady_decode_s": mean("itl_p99_before_s"),
            "long_prompt_ttft_s": mean("long_prompt_ttft_s"),
            "steps_to_prefill": mean("steps_while_prefilling"),
            "compilations_after_warmup": sum(r["compilations"] for r in rs),
        }
    u, c = out["unchunked"], out["chunked"]
    out["ratio_unchunked_over_chunked"] = {
        "itl_p99": u["itl_p99_during_long_prefill_s"] / c["itl_p99_during_long_prefill_s"],
        "itl_max": u["itl_max_during_long_prefill_s"] / c["itl_max_during_long_prefill_s"],
        "long_prompt_ttft": u["long_prompt_ttft_s"] / c["long_prompt_ttft_s"],
    }
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
        "| engine | ITL p99 during prefill ms | max ms | steady ITL p99 ms | "
        "steps to prefill | long prompt TTFT ms | compilations after warm-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in ("chunked", "unchunked"):
        e = c[k]
        lines.append(
            f"| {k} | {ms(e['itl_p99_during_long_prefill_s'])} | "
            f"{ms(e['itl_max_during_long_prefill_s'])} | {ms(e['itl_p99_steady_decode_s'])} | "
            f"{e['steps_to_prefill']:.0f} | {ms(e['long_prompt_ttft_s'])} | "
            f"{e['compilations_after_warmup']} |"
        )
    q = c["ratio_unchunked_over_chunked"]
    lines += [
        "",
        f"Decode ITL without chunking / with: p99 {q['itl_p99']:.2f}x, max {q['itl_max']:.2f}x; "
        f"the long prompt's own TTFT without / with: {q['long_prompt_ttft']:.2f}x.",
        "",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    from pijax.model.loader import load_model
    from pijax.sharding import make_mesh

    base = engine_flags.engine_config()
    mesh = make_mesh(base.mesh_shape)
    model = load_model(engine_flags.model_source(), dtype=base.dtype.value, mesh=mesh)
    dev = jax.devices()[0]
    device = f"{dev.platform}: {getattr(dev, 'device_kind', dev.platform)}"
    if dev.platform == "cpu":
        device += f", {platform.machine()}, {len(jax.devices())} device, host CPU"
    res = {
        "device": device,
        "model": engine_flags.model_source(),
        "note": "Same process, same weights, configurations alternated per round. "
        + (
            "CPU run: absolute times are not performance figures; compare the ratios."
            if dev.platform == "cpu"
            else ""
        ),
        "flags": {k: FLAGS[k].value for k in SCENARIO_FLAGS},
        "engine_overrides": {k: str(v) for k, v in engine_flags.engine_overrides().items()},
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

"""From a `RunResult` to the figures the issue asks for.

Definitions (also written into the JSON, so a reader of the numbers has them):
  * TTFT: first token time - scheduled arrival of the turn.
  * TPOT: (e2e latency - TTFT) / (n - 1), the mean gap between output tokens after the first;
    turns with one output token have none.
  * inter-token latency (ITL): every gap between consecutive output tokens, pooled over turns.
  * queue time: first scheduled - arrival; e2e: finish - arrival.
  * throughput over the makespan (start of the run -> last finish): output tokens/s, requests/s,
    and reviewed claims/hour, where a claim review is one conversation (all its turns).
  * pool utilization: used pages / usable pages (cached-but-unreferenced pages count as free),
    sampled after every step; waste: allocated but unwritten KV slots / allocated slots over the
    running requests, averaged over steps with at least one running request.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pijax.bench.runner import RunResult, TurnKind

DEFINITIONS = {
    "ttft": "first token time - scheduled arrival",
    "tpot": "(e2e - ttft) / (output tokens - 1)",
    "itl": "gaps between consecutive output tokens, pooled over all turns",
    "queue": "first scheduled - arrival",
    "e2e": "finish - arrival",
    "claims_per_hour": "finished conversations (claim reviews, all turns) per hour of makespan",
    "pool_utilization": "pages with refcount > 0 / usable pages, sampled after each step",
    "waste": "allocated but unwritten slots / allocated slots of running requests, mean over busy "
    "steps",
}


def percentiles(xs: Sequence[float]) -> dict:
    if len(xs) == 0:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(xs, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "n": int(a.size),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(a.mean()),
    }


def summarize(run: RunResult) -> dict:
    turns = run.turns
    end = max((t.finish for t in turns), default=run.end)
    makespan = max(end - run.start, 1e-9)
    out_tokens = sum(t.output_tokens for t in turns)
    latency = {
        "ttft": percentiles([t.ttft for t in turns]),
        "tpot": percentiles([x for t in turns if (x := t.tpot) is not None]),
        "itl": percentiles([g for t in turns for g in t.itls]),
        "queue": percentiles([x for t in turns if (x := t.queue) is not None]),
        "e2e": percentiles([t.e2e for t in turns]),
    }
    by_kind = {k.value: percentiles([t.ttft for t in turns if t.kind is k]) for k in TurnKind}
    prompt = sum(t.prompt_tokens for t in turns)
    cached = sum(t.cached_tokens for t in turns)
    summary = {
        "requests": len(turns),
        "conversations": run.conversations_done,
        "dropped_conversations": run.conversations_dropped,
        "makespan_s": makespan,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "latency_s": latency,
        "ttft_by_turn_kind_s": by_kind,
        "throughput": {
            "output_tokens_per_s": out_tokens / makespan,
            "requests_per_s": len(turns) / makespan,
            "claims_per_hour": run.conversations_done / makespan * 3600.0,
        },
        "steps": len(run.steps),
        "compilations_after_warmup": run.compiles_during_run,
    }
    busy = [s for s in run.steps if s.running > 0]
    if run.steps:
        summary["concurrency"] = {
            "peak": max(s.running for s in run.steps),
            "mean": float(np.mean([s.running for s in busy])) if busy else 0.0,
        }
    else:  # no engine samples (over gRPC): requests between first scheduled and finish
        summary["concurrency"] = in_flight(turns)
    if run.usable_pages is not None:
        usage = [s.pool_usage for s in run.steps]
        waste = [s.waste for s in busy]
        prefix = run.prefix or {}
        queries, hits = prefix.get("queries_by_zone", {}), prefix.get("hits_by_zone", {})
        summary["memory"] = {
            "usable_pages": run.usable_pages,
            "page_size": run.page_size,
            "pool_utilization_peak": max(usage, default=0.0),
            "pool_utilization_mean": float(np.mean(usage)) if usage else 0.0,
            "waste_mean": float(np.mean(waste)) if waste else 0.0,
            "waste_peak": max(waste, default=0.0),
            "preemptions": run.preemptions,
        }
        summary["prefix"] = {
            "queries_by_zone": queries,
            "hits_by_zone": hits,
            "hit_rate_by_zone": {z: hits.get(z, 0) / q for z, q in queries.items() if q},
            "tokens_saved": prefix.get("tokens_saved", 0),
            "cached_prompt_share": cached / prompt if prompt else 0.0,
        }
    return summary


def in_flight(turns) -> dict:
    """Peak and time-weighted mean of turns running at once (first scheduled -> finish), over
    the time at least one ran."""
    events = sorted(
        [(t.first_scheduled if t.first_scheduled is not None else t.arrival, 1) for t in turns]
        + [(t.finish, -1) for t in turns]
    )
    peak = level = 0
    busy = area = 0.0
    last = None
    for time_, delta in events:
        if last is not None and level > 0:
            busy += time_ - last
            area += level * (time_ - last)
        level += delta
        peak = max(peak, level)
        last = time_
    return {"peak": peak, "mean": area / busy if busy > 0 else 0.0}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b

"""Bench metrics against values worked out by hand, and the suite's ratios and goals."""

from __future__ import annotations

import pytest

from pijax.bench.metrics import percentiles, ratio, summarize
from pijax.bench.runner import RunResult, StepSample, TurnKind, TurnRecord
from pijax.bench.suite import CONTIGUOUS, HF, NO_REUSE, PAGED, goals, ratios
from pijax.workload import ClaimKind


def turn(rid, arrival, scheduled, times, finish=None, kind=TurnKind.SINGLE, prompt=100, cached=0):
    return TurnRecord(
        request_id=rid,
        conversation=0,
        turn=0,
        kind=kind,
        claim_kind=ClaimKind.PROFESSIONAL,
        arrival=arrival,
        first_scheduled=scheduled,
        token_times=list(times),
        finish=times[-1] if finish is None else finish,
        prompt_tokens=prompt,
        cached_tokens=cached,
    )


def test_percentiles_by_hand():
    p = percentiles([4.0, 1.0, 3.0, 2.0])
    # numpy's linear interpolation on the sorted [1, 2, 3, 4]: rank q * (n - 1).
    assert p == pytest.approx({"n": 4, "p50": 2.5, "p90": 3.7, "p99": 3.97, "mean": 2.5})
    assert percentiles([]) == {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None}
    assert percentiles([7.0])["p99"] == 7.0


def test_turn_latencies_by_hand():
    t = turn("a", arrival=10.0, scheduled=10.5, times=[11.0, 11.2, 11.6, 12.0])
    assert t.ttft == pytest.approx(1.0)
    assert t.queue == pytest.approx(0.5)
    assert t.e2e == pytest.approx(2.0)
    # TPOT = (e2e - ttft) / (n - 1) = (2.0 - 1.0) / 3
    assert t.tpot == pytest.approx(1 / 3)
    assert t.itls == pytest.approx([0.2, 0.4, 0.4])
    one = turn("b", arrival=0.0, scheduled=None, times=[0.3])
    assert one.tpot is None and one.itls == [] and one.queue is None


def make_run():
    turns = [
        turn("a", 0.0, 0.0, [1.0, 2.0, 3.0], prompt=1000, cached=960),
        turn("b", 1.0, 2.0, [3.0, 3.5], kind=TurnKind.SESSION_FIRST, prompt=500),
        turn(
            "c",
            4.0,
            4.0,
            [5.0, 6.0, 8.0],
            finish=8.0,
            kind=TurnKind.SESSION_FOLLOW_UP,
            prompt=700,
            cached=512,
        ),
    ]
    steps = [
        StepSample(t=1.0, step_s=0.5, running=2, waiting=1, pool_usage=0.5, waste=0.10),
        StepSample(t=2.0, step_s=0.5, running=1, waiting=0, pool_usage=0.25, waste=0.30),
        StepSample(t=3.0, step_s=0.5, running=0, waiting=0, pool_usage=0.0, waste=0.0),
        StepSample(t=4.0, step_s=0.5, running=3, waiting=2, pool_usage=0.75, waste=0.20),
    ]
    return RunResult(
        name="paged",
        start=0.0,
        end=9.0,
        turns=turns,
        steps=steps,
        conversations_done=2,
        conversations_dropped=0,
        compiles_during_run=0,
        preemptions=1,
        prefix={
            "queries_by_zone": {"policy": 3, "session": 2},
            "hits_by_zone": {"policy": 2, "session": 1},
            "tokens_saved": 1472,
        },
        page_size=64,
        usable_pages=100,
    )


def test_summary_by_hand():
    s = summarize(make_run())
    assert s["requests"] == 3 and s["conversations"] == 2
    assert s["makespan_s"] == pytest.approx(8.0)  # start -> last finish, not the run's end
    assert s["output_tokens"] == 8
    th = s["throughput"]
    assert th["output_tokens_per_s"] == pytest.approx(8 / 8.0)
    assert th["requests_per_s"] == pytest.approx(3 / 8.0)
    assert th["claims_per_hour"] == pytest.approx(2 / 8.0 * 3600)
    lat = s["latency_s"]
    assert lat["ttft"]["p50"] == pytest.approx(1.0)  # TTFTs 1.0, 2.0, 1.0
    assert lat["ttft"]["mean"] == pytest.approx(4 / 3)
    # TPOTs: (3 - 1) / 2 = 1.0, (3.5 - 3) / 1 = 0.5, (8 - 5) / 2 = 1.5
    assert lat["tpot"]["p50"] == pytest.approx(1.0) and lat["tpot"]["n"] == 3
    # ITLs pooled: 1, 1, 0.5, 1, 2
    assert lat["itl"]["n"] == 5 and lat["itl"]["p50"] == pytest.approx(1.0)
    assert lat["itl"]["mean"] == pytest.approx(5.5 / 5)
    assert lat["queue"]["p50"] == pytest.approx(0.0)
    assert lat["queue"]["mean"] == pytest.approx(1 / 3)
    assert lat["e2e"]["p50"] == pytest.approx(3.0)  # 3.0, 2.5, 4.0
    assert s["ttft_by_turn_kind_s"]["session_first"]["p50"] == pytest.approx(2.0)
    assert s["concurrency"] == {"peak": 3, "mean": pytest.approx(2.0)}  # busy steps: 2, 1, 3
    mem = s["memory"]
    assert mem["pool_utilization_peak"] == 0.75
    assert mem["pool_utilization_mean"] == pytest.approx(1.5 / 4)
    assert mem["waste_mean"] == pytest.approx(0.2)  # over busy steps only: 0.1, 0.3, 0.2
    assert mem["preemptions"] == 1
    pre = s["prefix"]
    assert pre["hit_rate_by_zone"] == pytest.approx({"policy": 2 / 3, "session": 0.5})
    assert pre["cached_prompt_share"] == pytest.approx(1472 / 2200)
    assert s["compilations_after_warmup"] == 0


def test_summary_without_a_pool_has_no_memory_section():
    run = make_run()
    run.usable_pages = None
    run.prefix = None
    s = summarize(run)
    assert "memory" not in s and "prefix" not in s


def test_concurrency_from_turns_when_there_are_no_engine_samples():
    run = make_run()
    run.steps = []
    # running intervals: a [0, 3], b [2, 3.5], c [4, 8] -> 2 at once over [2, 3]
    c = summarize(run)["concurrency"]
    assert c["peak"] == 2
    # busy time: [0, 3.5] and [4, 8] = 7.5 s; area: 3 + 1.5 + 4 = 8.5 turn-seconds
    assert c["mean"] == pytest.approx(8.5 / 7.5)


def test_ratio():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, 0.0) is None


def _entry(tok_s, peak, ttft_p50, waste=0.02, compiles=0):
    return {
        "summary": {
            "throughput": {"output_tokens_per_s": tok_s, "claims_per_hour": tok_s},
            "concurrency": {"peak": peak},
            "latency_s": {
                k: {"p50": ttft_p50, "p99": 2 * ttft_p50} for k in ("ttft", "itl", "tpot", "e2e")
            },
            "memory": {"waste_mean": waste},
            "compilations_after_warmup": compiles,
        }
    }


def test_ratios_and_goals():
    configs = {
        PAGED: _entry(100.0, 8, 0.1),
        CONTIGUOUS: _entry(40.0, 2, 0.5),
        NO_REUSE: _entry(80.0, 8, 0.5),
        HF: {"skipped": "needs the reference extra"},
    }
    r = ratios(configs)
    assert set(r) == {CONTIGUOUS, NO_REUSE}  # the skipped baseline has no ratios
    assert r[CONTIGUOUS]["output_tokens_per_s"] == pytest.approx(0.4)
    assert r[CONTIGUOUS]["peak_concurrency"] == pytest.approx(0.25)
    assert r[NO_REUSE]["ttft_p50"] == pytest.approx(5.0)
    g = {row["goal"]: row for row in goals({"configs": configs, "probes": {}})}
    tput = g["paged vs contiguous: output tokens/s"]
    assert tput["measured"] == pytest.approx(2.5) and tput["met"] is True
    assert g["paged vs contiguous: peak concurrency"]["measured"] == pytest.approx(4.0)
    assert g["prefix reuse: median TTFT, no-reuse / reuse (workload run)"][
        "measured"
    ] == pytest.approx(5.0)
    assert g["waste (allocated but unwritten slots)"]["met"] is True
    hf = g["paged vs hf-transformers: output tokens/s (warm: after warm-up)"]
    assert hf["measured"] is None and hf["met"] is None  # skipped: not measured, not failed
    assert g["compilations after warm-up (all engine runs)"]["measured"] == 0

"""`scripts/bench.py` end to end on the smoke preset: every configuration, the probes, a rate
sweep and an int8 configuration, written as complete JSON, a Markdown table and plots, with no
compilation after warm-up. The run hides torch and transformers, as on a fresh install without
the `reference` extra: the transformers baseline must be reported as skipped, with the reason.
No timing is asserted: only that every figure is there."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from pijax.bench.report import REQUIRED_KEYS, SUMMARY_KEYS
from pijax.bench.suite import (
    CONTIGUOUS,
    FIRST_CALL,
    HF,
    NO_CHUNK,
    NO_REUSE,
    PAGED,
    kv_config_name,
)

SCRIPT = pathlib.Path(__file__).parents[2] / "scripts" / "bench.py"
INT8 = kv_config_name("int8")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    shim = tmp / "no_reference_extra"
    for name in ("torch", "transformers"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(
            f"raise ImportError('{name} hidden by the test: no reference extra')\n"
        )
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        CI="1",
        PYTHONPATH=os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]),
    )
    out = tmp / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--preset=smoke",
            "--compare",
            "--sweep",
            "--kv_cache_dtype=auto,int8",
            f"--out_dir={out}",
            "--compilation_cache_dir=",
            "--note=test run",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout


@pytest.mark.slow
def test_json_is_complete(smoke_run):
    out, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    for key in REQUIRED_KEYS:
        assert key in results, key
    configs = results["configs"]
    assert list(configs) == [FIRST_CALL, PAGED, CONTIGUOUS, NO_REUSE, NO_CHUNK, INT8, HF]
    requests = results["workload"]["requests"]
    first = configs[FIRST_CALL]["summary"]
    assert first["requests"] == requests
    assert first["compilations_after_warmup"] > 0, "the first call compiles inside the run"
    for name in (PAGED, CONTIGUOUS, NO_REUSE, NO_CHUNK, INT8):
        s = configs[name]["summary"]
        for key in SUMMARY_KEYS:
            assert key in s, (name, key)
        assert s["requests"] == requests, name  # the identical request list, all served
        assert s["compilations_after_warmup"] == 0, name
        for lat in ("ttft", "tpot", "itl", "queue", "e2e"):
            assert set(s["latency_s"][lat]) >= {"p50", "p90", "p99"}
            assert s["latency_s"][lat]["p50"] is not None, (name, lat)
        assert 0 < s["memory"]["pool_utilization_peak"] <= 1
        assert "policy" in s["prefix"]["hit_rate_by_zone"] or name == NO_REUSE
    assert configs[HF] == {"skipped": "needs the reference extra (pip install -e .[reference])"}
    # int8 at the same byte budget holds more tokens than the unquantized pool.
    auto, int8 = configs[PAGED]["pool"], configs[INT8]["pool"]
    assert int8["budget_bytes"] == auto["budget_bytes"] and int8["tokens"] > 1.9 * auto["tokens"]
    assert set(results["ratios"]) == {FIRST_CALL, CONTIGUOUS, NO_REUSE, NO_CHUNK, INT8}
    assert results["definitions"]["tpot"] == "(e2e - ttft) / (output tokens - 1)"
    r = results["probes"]["roofline"]
    assert r["floor_s"] > 0 and r["measured_step_s"] > 0
    assert results["ceilings"]["copy_bandwidth_gbs"] > 0
    assert {p["rate_per_capacity"] for p in results["sweep"]["points"]} == {0.5, 2.0}
    assert results["caveat"].startswith("CPU figures, not performance figures")
    assert results["caveat"].endswith("test run")
    goals = {g["goal"]: g for g in results["goals"]}
    assert goals["compilations after warm-up (all engine runs)"]["met"] is True
    prefill = results["probes"]["prefill"][PAGED]
    assert prefill["flops"] > 0 and 0 < prefill["achieved_over_matmul_rate"]
    row = goals["prefill-only steps: achieved FLOP/s / matmul rate (same run)"]
    assert row["measured"] == prefill["achieved_over_matmul_rate"]
    idle = goals["overlap: device idle share of wall time between steps, steady decode"]
    assert idle["met"] is None or idle["measured"] is not None


@pytest.mark.slow
def test_table_and_plots(smoke_run):
    out, stdout = smoke_run
    md = (out / "results.md").read_text()
    assert md in stdout  # the table is printed too
    for text in (
        "| configuration | output tok/s",
        "TPOT = (e2e − TTFT) / (n − 1)",
        "## Ratios to the full engine",
        "| contiguous |",
        "skipped: needs the reference",
        "## KV cache dtype at one memory budget",
        f"| {INT8} | int8 |",
        "## Probes",
        "## Goals, measured",
        "## Rate sweep",
        "CPU figures, not performance",
    ):
        assert text in md, text
    for png in ("latency_cdf.png", "pool_timeline.png", "sweep.png"):
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in md

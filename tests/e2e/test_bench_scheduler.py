"""`scripts/bench_scheduler.py` end to end at toy sizes: it runs, writes JSON and Markdown, and its
structural figures (not its timings) are what the configurations promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_scheduler_smoke(tmp_path):
    out = tmp_path / "sched"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_scheduler.py"),
            f"--out={out}",
            "--repeats=1",
            "--num_requests=3",
            "--policy_tokens=64",
            "--claim_tokens=16",
            "--output_tokens=2",
            "--reuse_budget=64",
            "--decoders=2",
            "--long_prompt=192",
            "--budget=32",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    reuse, chunk = res["prefix_reuse"], res["chunked_prefill"]
    # 4 of the 5 pages of each prompt are the registered policy: reused only with reuse on.
    assert reuse["reuse"]["cached_prompt_share"] == 64 / 80
    assert reuse["no-reuse"]["cached_prompt_share"] == 0
    assert chunk["unchunked"]["steps_to_prefill"] == 1
    assert chunk["chunked"]["steps_to_prefill"] >= 192 // 32
    for cfg in ("reuse", "no-reuse"):
        assert reuse[cfg]["compilations_after_warmup"] == 0
        assert reuse[cfg]["ttft_s"]["n"] == 3
    for cfg in ("chunked", "unchunked"):
        assert chunk[cfg]["compilations_after_warmup"] == 0
    md = out.with_suffix(".md").read_text()
    assert "TTFT without reuse / with reuse" in md and "| chunked |" in md

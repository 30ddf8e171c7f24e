"""scripts/bench_kernels.py runs end to end on one toy shape and writes its JSON + Markdown, with
every candidate (kernels in interpret mode, the bundled GPU op, the reference) agreeing."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parents[2] / "scripts" / "bench_kernels.py"


@pytest.mark.slow
def test_bench_small_shape_writes_checked_report(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--only=decode-b4-c40-int8",
            "--iters=1",
            f"--out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "kernels-cpu-small.json").read_text())
    impls = {r["impl"] for r in report["rows"]}
    assert {
        "reference",
        "ragged (interpret)",
        "decode split-K (interpret)",
        "jax bundled gpu op (k_splits=1) (interpret)",
        "write_kv (xla scatter)",
    } <= impls
    for row in report["rows"]:
        assert row["bytes"] > 0 and row["seconds"] > 0
        if row["rel_err"] is not None:
            assert row["rel_err"] < 1e-2, row  # bf16 queries over int8 pages
    assert "NOT a performance figure" in (tmp_path / "kernels-cpu-small.md").read_text()

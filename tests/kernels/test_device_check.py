"""scripts/device_check.py --dry_run runs its whole plan on CPU (interpret/reference paths, toy
sizes): every step reports ok, the results folder holds the summary and the rows, and the
summary table is printed last."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parents[2] / "scripts" / "device_check.py"


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry_run", f"--out_root={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (folder,) = tmp_path.iterdir()
    assert folder.name.endswith("-device-check-cpu-dry-run")
    report = json.loads((folder / "device_check.json").read_text())
    results = report["results"]
    assert list(results) == ["correctness", "kernels", "generate", "engine"]
    for name, res in results.items():
        assert res["ok"], (name, res.get("summary"), res.get("tail"), res.get("traceback"))
    rows = results["correctness"]["rows"]
    assert {r["kernel"] for r in rows} >= {"triton_ragged", "triton_decode"}
    assert all(r["ok"] and r["rel_err"] < 2e-2 for r in rows)  # f32, or bf16 (Mosaic GPU)
    assert any(r["impl"].startswith("jax bundled") for r in results["kernels"]["rows"])
    assert (folder / "engine-smoke" / "results.json").exists()
    summary = (folder / "summary.md").read_text()
    assert "DRY RUN" in summary and "| engine | ok |" in summary
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # printed last

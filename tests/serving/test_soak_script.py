"""`scripts/soak.py` end to end, briefly: its report shows no request ending with a status it did
not deserve, no leaked KV pages, and streams of the other tenants still flowing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


@pytest.mark.slow
def test_short_soak_report(tmp_path):
    out = tmp_path / "soak.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--duration_s=20", "--clients_per_tenant=2", f"--out={out}"],
        check=True,
        timeout=600,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["unexpected"] == []
    assert report["leaked_pages"] == 0
    assert report["requests_by_status"]["beta"].get("OK", 0) > 0
    evil = report["requests_by_status"]["evil"]
    assert evil.get("INVALID_ARGUMENT", 0) > 0 and evil.get("UNAUTHENTICATED", 0) > 0
    assert report["rss_mib_end"] > 0 and report["max_stream_gap_s"]["beta"] > 0

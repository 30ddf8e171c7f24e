"""Audit log: append-only JSON lines, filters, read-back across restarts, no token ids."""

from __future__ import annotations

import json
import math

import pytest

from pijax.audit import AUDIT_KINDS, AuditLog
from pijax.request import Scope


def test_append_adds_time_kind_and_seq_and_normalizes_values():
    log = AuditLog()
    record = log.append(
        "reuse",
        request_id="r1",
        tenant="a",
        block_hashes=[b"\x01\xff"],
        scope=Scope.parse("shared:policy"),
        zones={"policy"},
    )
    assert record["kind"] == "reuse" and record["seq"] == 0
    assert isinstance(record["time"], float)
    assert record["block_hashes"] == ["01ff"]
    assert record["scope"] == "shared:policy"
    assert record["zones"] == ["policy"]
    assert len(log) == 1
    json.dumps(log.read())  # JSON-safe


def test_refuses_unknown_kind_reserved_fields_and_token_lists():
    log = AuditLog()
    with pytest.raises(ValueError, match="kind"):
        log.append("oops")
    with pytest.raises(ValueError, match="time"):
        log.append("reuse", time=1.0)
    with pytest.raises(ValueError, match="token ids"):
        log.append("reuse", token_ids=[17, 4, 99])
    with pytest.raises(ValueError, match="token ids"):
        log.append("reuse", nested={"x": (1, 2)})
    assert len(log) == 0 and log.read() == []


def test_filters_and_limit():
    log = AuditLog()
    log.append("register", zone="policy", num_tokens=32)
    log.append("reuse", request_id="r1", tenant="a", zone="tenant", zones=["policy", "tenant"])
    log.append("reuse", request_id="r2", tenant="b", zone="policy", zones=["policy"])
    log.append("session_end", tenant="a", session_id="s")
    assert [r["seq"] for r in log.read(kind="reuse")] == [1, 2]
    assert [r["seq"] for r in log.read(tenant="a")] == [1, 3]
    assert [r["seq"] for r in log.read(zone="policy")] == [0, 1, 2]
    assert [r["seq"] for r in log.read(request_id="r2")] == [2]
    assert [r["seq"] for r in log.read(limit=2)] == [0, 1]
    assert [r["seq"] for r in log.read(after_seq=1)] == [2, 3]
    assert log.read(since=log.read()[-1]["time"] + 1.0) == []
    assert len(log.read(since=0.0)) == 4


def test_read_returns_copies():
    log = AuditLog()
    log.append("reuse", block_hashes=[b"\x00"])
    log.read()[0]["block_hashes"].append("tampered")
    assert log.read()[0]["block_hashes"] == ["00"]


def test_file_is_json_lines_and_reopening_continues(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append("register", zone="policy", num_tokens=8)
        log.append("reuse", tenant="a", num_blocks=2)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["register", "reuse"]
    with AuditLog(path) as log:
        assert len(log) == 2 and log.read(kind="reuse")[0]["tenant"] == "a"
        assert log.append("session_end", tenant="a", session_id="s")["seq"] == 2
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_reopening_skips_a_line_cut_short_by_a_crash(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append("register", zone="policy", num_tokens=8)
    with open(path, "a") as f:
        f.write('{"seq": 1, "ki')
    with AuditLog(path) as log:
        assert len(log) == 1
        log.append("reuse", tenant="a")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["seq"], r["kind"]) for r in records] == [(0, "register"), (1, "reuse")]
    assert len(AuditLog(path)) == 2


def test_closed_log_refuses_appends(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl")
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.append("reuse")


def test_in_memory_window():
    log = AuditLog(max_in_memory=2)
    for _ in range(5):
        log.append("reuse")
    assert len(log) == 5
    assert [r["seq"] for r in log.read()] == [3, 4]


def test_kinds():
    assert AUDIT_KINDS == {"reuse", "register", "session_evict", "session_reuse", "session_end"}


def test_window_is_bounded_by_bytes_and_the_file_keeps_everything(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_in_memory=None, max_in_memory_bytes=2000) as log:
        for i in range(3000):
            log.append("reuse", tenant=f"t{i % 3}", block_hashes=[f"{i:064x}"])
        window = log.read()
        assert 0 < len(window) < 30 and window[-1]["seq"] == 2999
        assert sum(len(json.dumps(r, separators=(",", ":"))) for r in window) <= 2000
        # Paging from the start reads the file, in order, without gaps or duplicates.
        seqs, after = [], -1
        while True:
            page = log.read(after_seq=after, limit=700)
            if not page:
                break
            seqs += [r["seq"] for r in page]
            after = page[-1]["seq"]
        assert seqs == list(range(3000))
        assert [r["seq"] for r in log.read(tenant="t1", after_seq=1500, limit=3)] == [
            1501,
            1504,
            1507,
        ]
        first_time = log.read(after_seq=-1, limit=1)[0]["time"]
        assert log.read(since=first_time, limit=1)[0]["seq"] == 0
    with AuditLog(path, max_in_memory=10) as reopened:  # reopening keeps only the window
        assert len(reopened) == 3000 and len(reopened._records) == 10
        assert reopened.read(after_seq=1023, limit=2)[0]["seq"] == 1024


@pytest.mark.parametrize("since", [math.nan, math.inf, -math.inf, "0"])
def test_since_must_be_finite(since):
    with pytest.raises(ValueError, match="since must be a finite number"):
        AuditLog().read(since=since)


def test_default_window_is_bounded():
    log = AuditLog()
    for _ in range(5000):
        log.append("reuse", block_hashes=["ab" * 32] * 8)
    assert len(log) == 5000 and len(log.read()) <= 4096

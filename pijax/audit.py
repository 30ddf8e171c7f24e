"""The audit log of cache reuse: an append-only JSON-lines file plus an in-memory reader.

Every prefix reuse, trusted-prefix registration and session eviction/reuse/end appends one
record. A record is a flat JSON object: `seq` (0-based position in the log), `time` (unix
seconds, wall clock), `kind` (one of `AUDIT_KINDS`) and the caller's fields.

Invariants:

- Append-only: records are never changed or removed; `seq` increases by one per record, also
  across restarts (a log opened on an existing file continues after its last record).
- No private content: records hold ids, counts and hashes (hex), never token ids or text. The
  log enforces what it can: bytes become hex, and a list of integers (which is what token ids
  look like) is refused.
- The file and the in-memory reader hold the same records in the same order. Memory is
  bounded: the reader keeps only the newest records, at most `max_in_memory` of them and at most
  `max_in_memory_bytes` of their JSON text (records are kept as their JSON line, parsed when
  read). The file keeps the whole history; `read(after_seq=...)` and `read(since=...)` reach
  records older than the window by reading the file from a sparse index (the byte offset of
  every `INDEX_EVERY`-th record, with its time), so a page costs what it returns plus at most
  `INDEX_EVERY` skipped lines. Without a file, only the window exists.

What it knows nothing about: who may read it (the server authorizes the RPC that reads it).
"""

from __future__ import annotations

import bisect
import collections
import enum
import json
import math
import os
import threading
import time
from collections.abc import Mapping

AUDIT_KINDS = frozenset({"reuse", "register", "session_evict", "session_reuse", "session_end"})
DEFAULT_MAX_IN_MEMORY = 4096
DEFAULT_MAX_IN_MEMORY_BYTES = 4 << 20
INDEX_EVERY = 1024


def _normalize(name: str, value):
    """A JSON-safe value holding no token ids: bytes -> hex, enums -> value, sets -> sorted."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, enum.Enum):
        return _normalize(name, value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _normalize(f"{name}.{k}", v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=str)
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(
                f"audit field {name!r} must hold counts, ids or hashes, not a list of integers "
                "(token ids never enter the audit log)"
            )
        return [_normalize(name, v) for v in value]
    # Scope and other small value types print as their canonical text.
    return str(value)


class AuditLog:
    """Append-only JSON-lines file (optional `path`) + in-memory reader.

    Never contains tokens of private content: records hold counts and hashes (hex) only.
    Thread-safe: the engine appends while a server thread reads.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        max_in_memory: int | None = DEFAULT_MAX_IN_MEMORY,
        max_in_memory_bytes: int | None = DEFAULT_MAX_IN_MEMORY_BYTES,
    ):
        for name, value in (
            ("max_in_memory", max_in_memory),
            ("max_in_memory_bytes", max_in_memory_bytes),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1; got {value}")
        self.path = None if path is None else os.fspath(path)
        self._lock = threading.Lock()
        self._max_records = max_in_memory
        self._max_bytes = max_in_memory_bytes
        self._records: collections.deque[tuple[int, str]] = collections.deque()  # (seq, line)
        self._bytes = 0
        self._index_offsets: list[int] = []  # byte offset of record k * INDEX_EVERY
        self._index_times: list[float] = []  # and its time
        self._file_size = 0
        self._count = 0
        self._file = None
        self._closed = False
        if self.path is not None:
            if os.path.exists(self.path):
                self._load(self.path)
            self._file = open(self.path, "ab")  # noqa: SIM115 (lives with self)
            self._file_size = self._file.tell()

    def _load(self, path: str) -> None:
        """Read back an existing log so `read` and `seq` continue where it ended: one pass that
        keeps the window and the sparse index, never the whole file.

        A last line without its newline is a record a crash cut short: it was never committed
        (never returned by `append`), so it is cut off the file.
        """
        committed = 0
        with open(path, "rb") as f:
            for number, raw in enumerate(iter(f.readline, b""), start=1):
                if not raw.endswith(b"\n"):
                    break
                offset, committed = committed, committed + len(raw)
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"audit log {path!r} line {number} is not JSON: {e}") from None
                self._remember(self._count, line, record["time"], offset)
                self._count += 1
        if committed < os.path.getsize(path):
            with open(path, "r+b") as f:
                f.truncate(committed)

    def _remember(self, seq: int, line: str, t: float, offset: int | None) -> None:
        if offset is not None and seq % INDEX_EVERY == 0:
            self._index_offsets.append(offset)
            self._index_times.append(t)
        self._records.append((seq, line))
        self._bytes += len(line)
        while self._records and (
            (self._max_records is not None and len(self._records) > self._max_records)
            or (self._max_bytes is not None and self._bytes > self._max_bytes)
        ):
            self._bytes -= len(self._records.popleft()[1])

    def append(self, kind: str, **fields) -> dict:
        """Append one record and return it (a copy). `kind` must be one of `AUDIT_KINDS`."""
        if kind not in AUDIT_KINDS:
            raise ValueError(f"kind must be one of {sorted(AUDIT_KINDS)}; got {kind!r}")
        for reserved in ("seq", "time"):
            if reserved in fields:
                raise ValueError(f"audit field {reserved!r} is set by the log")
        body = {name: _normalize(name, value) for name, value in fields.items()}
        with self._lock:
            if self._closed:
                raise ValueError("audit log is closed")
            record = {"seq": self._count, "time": time.time(), "kind": kind, **body}
            line = json.dumps(record, separators=(",", ":"))
            offset = None
            if self._file is not None:
                data = (line + "\n").encode("utf-8")
                self._file.write(data)
                self._file.flush()
                offset, self._file_size = self._file_size, self._file_size + len(data)
            self._remember(self._count, line, record["time"], offset)
            self._count += 1
        return json.loads(line)

    def read(
        self,
        *,
        kind: str | None = None,
        tenant: str | None = None,
        zone: str | None = None,
        request_id: str | None = None,
        since: float | None = None,
        after_seq: int | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """Records matching every given filter, oldest first (copies).

        `zone` matches a record's `zone` or any entry of its `zones`; `since` keeps records with
        `time >= since` (a finite number); `after_seq` keeps records with `seq > after_seq` (to
        page forward without duplicates); `limit` keeps the first `limit` matches. Records
        older than the in-memory window are read from the file when `after_seq` or `since`
        reaches back to them; otherwise the window is what is read.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be None or >= 0; got {limit}")
        if since is not None and not (isinstance(since, (int, float)) and math.isfinite(since)):
            raise ValueError(f"since must be a finite number of unix seconds; got {since!r}")
        if after_seq is not None and (not isinstance(after_seq, int) or after_seq < -1):
            raise ValueError(f"after_seq must be None or an integer >= -1; got {after_seq!r}")

        def match(r: dict) -> bool:
            return (
                (kind is None or r.get("kind") == kind)
                and (tenant is None or r.get("tenant") == tenant)
                and (request_id is None or r.get("request_id") == request_id)
                and (since is None or r["time"] >= since)
                and (after_seq is None or r["seq"] > after_seq)
                and (zone is None or r.get("zone") == zone or zone in r.get("zones", ()))
            )

        with self._lock:
            window = list(self._records)
            first_in_memory = window[0][0] if window else self._count
            from_file = self.path is not None and first_in_memory > 0 and self._count > 0
            if from_file and after_seq is not None:
                from_file = after_seq + 1 < first_in_memory
            elif from_file and since is not None:
                from_file = not window or json.loads(window[0][1])["time"] >= since
            else:
                from_file = False
            if from_file:
                start = self._start_offset(after_seq, since)
                end = self._file_size
        if from_file:
            return self._read_file(start, end, match, limit)
        out = []
        for seq, line in window:
            if limit is not None and len(out) >= limit:
                break
            if after_seq is not None and seq <= after_seq:
                continue
            r = json.loads(line)
            if match(r):
                out.append(r)
        return out

    def _start_offset(self, after_seq: int | None, since: float | None) -> int:
        """A byte offset at or before the first record `after_seq`/`since` can keep."""
        k = len(self._index_offsets) - 1
        if after_seq is not None:
            k = min(k, (after_seq + 1) // INDEX_EVERY)
        if since is not None:  # times increase (wall clock): the last index entry before since
            k = min(k, max(0, bisect.bisect_left(self._index_times, since) - 1))
        return self._index_offsets[k] if k >= 0 else 0

    def _read_file(self, start: int, end: int, match, limit: int | None) -> list[dict]:
        out = []
        with open(self.path, "rb") as f:
            f.seek(start)
            while f.tell() < end and (limit is None or len(out) < limit):
                raw = f.readline()
                if not raw.endswith(b"\n"):
                    break
                r = json.loads(raw)
                if match(r):
                    out.append(r)
        return out

    def __len__(self) -> int:
        """Records appended over the log's whole life (including those read back from file)."""
        return self._count

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._closed = True

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

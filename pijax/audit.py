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
- The file and the in-memory reader hold the same records in the same order (the reader may
  hold only the newest `max_in_memory` of them).

What it knows nothing about: who may read it (the server authorizes the RPC that reads it).
"""

from __future__ import annotations

import collections
import copy
import enum
import json
import os
import threading
import time
from collections.abc import Mapping

AUDIT_KINDS = frozenset({"reuse", "register", "session_evict", "session_reuse", "session_end"})


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

    def __init__(self, path: str | os.PathLike | None = None, *, max_in_memory: int | None = None):
        if max_in_memory is not None and max_in_memory < 1:
            raise ValueError(f"max_in_memory must be None or >= 1; got {max_in_memory}")
        self.path = None if path is None else os.fspath(path)
        self._lock = threading.Lock()
        self._records: collections.deque[dict] = collections.deque(maxlen=max_in_memory)
        self._count = 0
        self._file = None
        self._closed = False
        if self.path is not None:
            if os.path.exists(self.path):
                self._load(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (lives with self)

    def _load(self, path: str) -> None:
        """Read back an existing log so `read` and `seq` continue where it ended.

        A last line without its newline is a record a crash cut short: it was never committed
        (never returned by `append`), so it is cut off the file.
        """
        with open(path, "rb") as f:
            data = f.read()
        committed = data.rfind(b"\n") + 1
        if committed < len(data):
            with open(path, "r+b") as f:
                f.truncate(committed)
        for number, line in enumerate(data[:committed].decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"audit log {path!r} line {number} is not JSON: {e}") from None
            self._records.append(record)
            self._count += 1

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
            if self._file is not None:
                line = json.dumps(record, separators=(",", ":"))
                self._file.write(line + "\n")
                self._file.flush()
            self._records.append(record)
            self._count += 1
        return copy.deepcopy(record)

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
        `time >= since`; `after_seq` keeps records with `seq > after_seq` (to page forward
        without duplicates); `limit` keeps the first `limit` matches.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be None or >= 0; got {limit}")
        with self._lock:
            records = list(self._records)
        out = []
        for r in records:
            if limit is not None and len(out) >= limit:
                break
            if kind is not None and r.get("kind") != kind:
                continue
            if tenant is not None and r.get("tenant") != tenant:
                continue
            if request_id is not None and r.get("request_id") != request_id:
                continue
            if since is not None and r["time"] < since:
                continue
            if after_seq is not None and r["seq"] <= after_seq:
                continue
            if zone is not None and r.get("zone") != zone and zone not in r.get("zones", ()):
                continue
            out.append(copy.deepcopy(r))
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

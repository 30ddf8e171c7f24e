"""Which sessions are open, per tenant: the server's side of multi-turn sessions.

A session is opened by a `Generate` with `start_session` (the server makes up an unguessable id
when the client gives none) and continued by later turns naming its id; `EndSession` closes it,
and so does `idle_timeout_s` without a turn. The engine keeps the session's KV (and evicts it on
its own terms); this registry only decides whether an id is valid for a tenant.

Session ids live in a per-tenant namespace (the engine keys its sessions by tenant and id too),
so two tenants choosing the same id never meet, and a tenant naming another's session gets
exactly the NOT_FOUND a missing one gets.

Used from the server's event-loop thread only; not thread-safe.
"""

from __future__ import annotations

import dataclasses
import secrets
import time


class SessionNotFound(KeyError):
    pass


class SessionExists(KeyError):
    pass


class TooManySessions(RuntimeError):
    pass


@dataclasses.dataclass
class _Session:
    last_used: float
    turns: int = 0


class SessionRegistry:
    def __init__(
        self, idle_timeout_s: float = 3600.0, max_per_tenant: int = 1024, clock=time.monotonic
    ):
        self.idle_timeout_s = idle_timeout_s
        self.max_per_tenant = max_per_tenant
        self._clock = clock
        self._open: dict[str, dict[str, _Session]] = {}

    def open(self, tenant: str, session_id: str = "") -> str:
        """Open a session; returns its id. Raises SessionExists / TooManySessions."""
        sessions = self._live(tenant)
        if session_id in sessions:
            raise SessionExists(session_id)
        if len(sessions) >= self.max_per_tenant:
            raise TooManySessions(f"at most {self.max_per_tenant} open sessions per tenant")
        session_id = session_id or "s-" + secrets.token_hex(12)
        sessions[session_id] = _Session(last_used=self._clock())
        return session_id

    def touch(self, tenant: str, session_id: str) -> None:
        """Mark a turn; raises SessionNotFound for a missing, expired or foreign id."""
        session = self._live(tenant).get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        session.last_used = self._clock()
        session.turns += 1

    def close(self, tenant: str, session_id: str) -> None:
        if self._live(tenant).pop(session_id, None) is None:
            raise SessionNotFound(session_id)

    def is_open(self, tenant: str, session_id: str) -> bool:
        return session_id in self._live(tenant)

    def _live(self, tenant: str) -> dict[str, _Session]:
        sessions = self._open.setdefault(tenant, {})
        cutoff = self._clock() - self.idle_timeout_s
        for sid in [s for s, v in sessions.items() if v.last_used < cutoff]:
            del sessions[sid]
        return sessions

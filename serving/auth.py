"""API-key authentication: call metadata `authorization: Bearer <key>` -> `Principal`.

The key file is JSON, one entry per key:

    {
      "sk-acme-reviewer": {"tenant": "acme", "zones": ["policy"], "admin": false},
      "sk-acme-urgent": {"tenant": "acme", "zones": ["policy"], "min_priority": -50},
      "sha256:9f86d0...": {"tenant": "ops", "zones": ["*"], "admin": true}
    }

A key is written either as itself or as `sha256:<hex digest of the key>`, so a key file need not
hold usable secrets. `zones` lists the trust zones (`shared:<zone>`) the tenant may read from;
`"*"` means every zone the server knows. `min_priority` is the most urgent request priority
the key may ask for (lower is more urgent; default 0, so a key must be granted urgency before one
tenant's urgent stream can preempt another's running requests). Only digests are kept in memory, and no key, digest or
`authorization` value is ever logged or put in an error message.

`--insecure_dev_mode` replaces the key file with one principal for every caller (tenant `dev`,
every zone, admin); the server says so loudly at start-up.

This module knows nothing of gRPC: the servicer hands it the metadata value and maps
`AuthError` to UNAUTHENTICATED.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
from pathlib import Path

ALL_ZONES = "*"
DEFAULT_MIN_PRIORITY = 0
PRIORITY_RANGE = (-100, 100)
DEV_TENANT = "dev"
TENANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ZONE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_BEARER_RE = re.compile(r"\A[Bb][Ee][Aa][Rr][Ee][Rr] ([\x21-\x7e]{1,4096})\Z")


class AuthError(Exception):
    """Missing or unknown credentials (gRPC: UNAUTHENTICATED). The message holds no secret."""


class KeyFileError(ValueError):
    """The API-key file is unreadable or malformed; the message names the entry, not the key."""


@dataclasses.dataclass(frozen=True)
class Principal:
    tenant: str
    zones: frozenset[str]  # may contain ALL_ZONES
    admin: bool = False
    min_priority: int = DEFAULT_MIN_PRIORITY  # the most urgent priority this key may request

    def may_use_zone(self, zone: str) -> bool:
        return ALL_ZONES in self.zones or zone in self.zones

    def permitted_zones(self, known_zones: frozenset[str]) -> frozenset[str]:
        return known_zones if ALL_ZONES in self.zones else self.zones


DEV_PRINCIPAL = Principal(
    tenant=DEV_TENANT, zones=frozenset({ALL_ZONES}), admin=True, min_priority=PRIORITY_RANGE[0]
)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """Digest of key -> Principal, loaded once from the key file."""

    def __init__(self, principals_by_digest: dict[str, Principal]):
        self._by_digest = dict(principals_by_digest)

    @classmethod
    def from_file(cls, path: str | Path) -> KeyStore:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise KeyFileError(
                f"{path}: cannot read API-key file: {e.__class__.__name__}"
            ) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "api keys") -> KeyStore:
        if not isinstance(data, dict) or not data:
            raise KeyFileError(f"{source}: must be a non-empty JSON object of key -> entry")
        out = {}
        for i, (key, entry) in enumerate(data.items()):
            where = f"{source}: entry #{i + 1}"
            if not isinstance(key, str) or not key.strip():
                raise KeyFileError(f"{where}: key must be a non-empty string")
            digest = key[len("sha256:") :] if _DIGEST_RE.match(key) else _digest(key)
            out[digest] = _principal(entry, where)
        return cls(out)

    @property
    def known_zones(self) -> frozenset[str]:
        return frozenset(z for p in self._by_digest.values() for z in p.zones if z != ALL_ZONES)

    def authenticate(self, authorization: str | None) -> Principal:
        key = bearer_token(authorization)
        digest = _digest(key)
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise AuthError("unknown API key")


def _principal(entry, where: str) -> Principal:
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where}: must be an object with tenant, zones, admin")
    unknown = set(entry) - {"tenant", "zones", "admin", "min_priority"}
    if unknown:
        raise KeyFileError(
            f"{where}: unknown field(s) {sorted(unknown)}; allowed: tenant, zones, admin, "
            "min_priority"
        )
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
        raise KeyFileError(f"{where}: tenant must be 1-64 of [A-Za-z0-9_-]; got {tenant!r}")
    zones = entry.get("zones", [])
    if not isinstance(zones, list) or not all(
        isinstance(z, str) and (z == ALL_ZONES or ZONE_RE.match(z)) for z in zones
    ):
        raise KeyFileError(
            f"{where}: zones must be a list of zone names ([A-Za-z0-9_.-]) or '*'; got {zones!r}"
        )
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise KeyFileError(f"{where}: admin must be true or false; got {admin!r}")
    min_priority = entry.get("min_priority", DEFAULT_MIN_PRIORITY)
    lo, hi = PRIORITY_RANGE
    if (
        not isinstance(min_priority, int)
        or isinstance(min_priority, bool)
        or not lo <= min_priority <= hi
    ):
        raise KeyFileError(
            f"{where}: min_priority must be an integer in [{lo}, {hi}]; got {min_priority!r}"
        )
    return Principal(tenant=tenant, zones=frozenset(zones), admin=admin, min_priority=min_priority)


def bearer_token(authorization: str | bytes | None) -> str:
    """The key of `Bearer <key>`: one space, then printable ASCII with no whitespace. Anything
    else (tabs, several spaces, control characters, non-ASCII) is malformed, never trimmed into
    something that authenticates."""
    if not authorization:
        raise AuthError("missing credentials: send metadata 'authorization: Bearer <api key>'")
    match = _BEARER_RE.match(authorization) if isinstance(authorization, str) else None
    if match is None:
        raise AuthError(
            "malformed authorization metadata: expected 'Bearer <api key>' "
            "(printable ASCII, no whitespace in the key)"
        )
    return match.group(1)


class Authenticator:
    """Either a key store, or the insecure dev principal for everyone."""

    def __init__(self, keys: KeyStore | None):
        self._keys = keys

    @classmethod
    def insecure_dev_mode(cls) -> Authenticator:
        return cls(None)

    @property
    def is_insecure(self) -> bool:
        return self._keys is None

    @property
    def known_zones(self) -> frozenset[str]:
        return frozenset() if self._keys is None else self._keys.known_zones

    def authenticate(self, authorization: str | None) -> Principal:
        if self._keys is None:
            return DEV_PRINCIPAL
        return self._keys.authenticate(authorization)

"""API-key file parsing and authentication (no server)."""

from __future__ import annotations

import hashlib
import json

import pytest

from pijax.serving.auth import (
    ALL_ZONES,
    DEV_PRINCIPAL,
    Authenticator,
    AuthError,
    KeyFileError,
    KeyStore,
)


def test_keys_map_to_principals_and_digests_work():
    digest = hashlib.sha256(b"sk-ops").hexdigest()
    store = KeyStore.from_dict(
        {
            "sk-acme": {"tenant": "acme", "zones": ["policy"]},
            f"sha256:{digest}": {"tenant": "ops", "zones": ["*"], "admin": True},
        }
    )
    acme = store.authenticate("Bearer sk-acme")
    assert (acme.tenant, acme.zones, acme.admin) == ("acme", frozenset({"policy"}), False)
    assert acme.may_use_zone("policy") and not acme.may_use_zone("coding")
    ops = store.authenticate("bearer sk-ops")
    for padded in ("bearer   sk-ops ", "Bearer sk-ops\t", " Bearer sk-ops"):
        with pytest.raises(AuthError):  # malformed: refused, never trimmed into a match
            store.authenticate(padded)
    assert ops.admin and ops.may_use_zone("anything")
    assert ops.permitted_zones(frozenset({"a", "b"})) == {"a", "b"}
    assert store.known_zones == {"policy"}


@pytest.mark.parametrize(
    "header", [None, "", "sk-acme", "Basic sk-acme", "Bearer ", "Bearer sk-unknown"]
)
def test_bad_credentials_are_refused_without_echoing_them(header):
    store = KeyStore.from_dict({"sk-acme": {"tenant": "acme"}})
    with pytest.raises(AuthError) as e:
        store.authenticate(header)
    assert "sk-" not in str(e.value)


@pytest.mark.parametrize(
    "data, needle",
    [
        ({}, "non-empty"),
        ([], "non-empty"),
        ({"k": "acme"}, "entry #1"),
        ({"k": {"tenant": "a.b"}}, "tenant"),
        ({"k": {"tenant": "acme", "zones": "policy"}}, "zones"),
        ({"k": {"tenant": "acme", "zones": ["bad zone"]}}, "zones"),
        ({"k": {"tenant": "acme", "admin": "yes"}}, "admin"),
        ({"k": {"tenant": "acme", "role": "x"}}, "unknown field"),
    ],
)
def test_malformed_key_files_name_the_entry_not_the_key(data, needle, tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KeyFileError) as e:
        KeyStore.from_file(path)
    assert needle in str(e.value)
    assert "'k'" not in str(e.value)


def test_unreadable_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyStore.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyStore.from_file(tmp_path / "bad.json")


def test_insecure_dev_mode_admits_everyone_as_dev():
    auth = Authenticator.insecure_dev_mode()
    assert auth.is_insecure
    assert auth.authenticate(None) is DEV_PRINCIPAL
    assert DEV_PRINCIPAL.admin and ALL_ZONES in DEV_PRINCIPAL.zones

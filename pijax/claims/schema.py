"""The payment-integrity findings schema (`configs/schemas/findings.schema.json`) and its checks."""

from __future__ import annotations

import functools
import json
from importlib import resources

import jsonschema

FINDINGS_SCHEMA_FILE = "findings.schema.json"


@functools.cache
def _schema_text() -> str:
    return (resources.files("pijax.configs") / "schemas" / FINDINGS_SCHEMA_FILE).read_text()


def findings_schema() -> dict:
    """A fresh copy of the findings schema (callers may mutate it)."""
    return json.loads(_schema_text())


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = findings_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def findings_errors(obj: object) -> list[str]:
    """Why `obj` is not valid findings (an empty list when it is)."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in _validator().iter_errors(obj)
    ]


def is_valid_findings(obj: object) -> bool:
    return _validator().is_valid(obj)

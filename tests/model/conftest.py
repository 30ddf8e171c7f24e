"""Fixtures for the checkpoint-loading tests."""

from __future__ import annotations

import pytest

from pijax.sharding import make_mesh


@pytest.fixture(scope="session")
def mesh1():
    return make_mesh((1, 1))

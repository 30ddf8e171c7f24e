"""Shared fixtures. Engines are built once per module where possible: compilation dominates."""

from __future__ import annotations

import os

import pytest

# Tests never depend on what earlier runs compiled: the persistent compilation cache (on by
# default for users) is off unless the developer points PIJAX_COMPILATION_CACHE at a directory.
os.environ.setdefault("PIJAX_COMPILATION_CACHE", "off")


@pytest.fixture(scope="session")
def tiny_llm():
    from pijax import LLM

    return LLM(
        "tiny-random", num_pages=192, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=512
    )

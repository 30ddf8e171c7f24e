"""gRPC tests over a real loopback channel.

One small engine is built for the whole `tests/serving` session (building and compiling it is
most of the cost on CPU); each test module starts its own server around it on a free 127.0.0.1
port and drains it at the end, so one server runs at a time and only its loop thread touches the
engine. The engine's shape grid is tiny (budget 16 tokens, 4 sequences, 1024-token context in
64-token pages: three step shapes), and the offline API (`LLM`) wraps the same engine, so
"streamed == offline" compares one model with itself.
"""

from __future__ import annotations

import json

import pytest
from serving_harness import ENGINE_OVERRIDES, KEYS, start_server


@pytest.fixture(scope="session")
def llm():
    from pijax import LLM

    return LLM("tiny-random", **ENGINE_OVERRIDES)


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api_keys.json"
    path.write_text(json.dumps(KEYS))
    return str(path)


@pytest.fixture(scope="module")
def server(llm, keys_file):
    s = start_server(llm.engine, keys_file, metrics_port=0, trusted_zones=("policy",))
    yield s
    s.stop()

"""The launch scripts: the review agent against an in-process server, and `serve.py` as a real
process that becomes SERVING and drains on SIGTERM."""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pijax.serving.proto.pijax.v1 import inference_pb2 as pb
from pijax.serving.proto.pijax.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).parent / "findings_test.schema.json"


@functools.cache
def load_script(name: str):
    """Import a script as a module (once: its absl flags may be defined only once)."""
    spec = importlib.util.spec_from_file_location(
        f"pijax_script_{name}", ROOT / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_review_agent_end_to_end(server, tmp_path):
    agent = load_script("review_claims")
    claims = [
        {"claim_id": "C1001", "text": "C1001 | 99213 x2 | E11.9 | $184.00"},
        {"claim_id": "C1002", "text": "C1002 | 97110 x6 | M54.5 | $210.00"},
    ]
    (tmp_path / "claims.json").write_text(json.dumps(claims))
    policy = (
        "Policy PI-001 (synthetic): a duplicate line is paid once. Units above the daily "
        "maximum are not paid. Diagnoses must support the procedure.\n"
    )
    (tmp_path / "policy.txt").write_text(policy)
    # The operator registers the scaffold; without it a shared segment counts as private, and so
    # does everything after it (no session reuse either).
    server.stub.RegisterTrustedPrefix(
        pb.RegisterTrustedPrefixRequest(zone="policy", text=policy),
        metadata=(("authorization", "Bearer key-admin"),),
        timeout=120,
    )
    out = io.StringIO()
    results = agent.run(
        agent.Options(
            target=f"127.0.0.1:{server.port}",
            api_key="key-acme",
            claims_file=str(tmp_path / "claims.json"),
            policy_file=str(tmp_path / "policy.txt"),
            num_claims=2,
            schema_file=str(SCHEMA),
            max_tokens=440,
            tool_call_tokens=8,
            narrative_tokens=16,
            temperature=1.0,
            concurrency=2,
            timeout_s=120,
        ),
        out=out,
    )
    text = out.getvalue()
    assert [r.error for r in results] == ["", ""], text
    for r in results:
        assert r.schema_valid, r.findings_text
        assert r.session_id
        assert [c.kind for c in r.calls] == ["review", "tool_call", "narrative"]
        # Turn two reuses turn one's KV from the session (at least the full pages of its prompt).
        assert r.calls[2].cached_tokens > 0
    assert "tenant acme, zones ['policy']" in text  # so the scaffold went as shared:policy
    assert text.count("[FAKE TOOL OUTPUT") == 2
    assert "--- latency: 2 claims, 6 calls" in text
    assert "reviewed claims/hour" in text


@pytest.mark.slow
def test_serve_script_becomes_ready_and_drains_on_sigterm(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"key-ops": {"tenant": "ops", "zones": ["*"], "admin": True}}))
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "serve.py"),
        "--model",
        "tiny-random",
        "--port",
        "0",
        "--metrics_port",
        "-1",
        "--http_port",
        "0",
        "--api_keys",
        str(keys),
        "--warmup=off",
        "--num_pages",
        "16",
        "--page_size",
        "64",
        "--max_num_seqs",
        "2",
        "--max_num_batched_tokens",
        "16",
        "--max_model_len",
        "512",
        "--drain_grace_s",
        "5",
    ]
    if os.environ.get("PIJAX_COMPILATION_CACHE"):
        cmd += ["--compilation_cache_dir", os.environ["PIJAX_COMPILATION_CACHE"]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    lines: list[str] = []
    ready = threading.Event()
    port: list[int] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"pijax server ready on [\d.]+:(\d+)", line)
            if m:
                port.append(int(m.group(1)))
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(600) and port, "".join(lines[-30:])
        with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as channel:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service="pijax.v1.Inference"), timeout=60)
                .status
            )
            assert status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.InferenceStub(channel)
            info = stub.ModelInfo(
                pb.ModelInfoRequest(), metadata=(("authorization", "Bearer key-ops"),), timeout=60
            )
            assert info.tenant == "ops" and info.context_length == 512
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, "".join(lines[-30:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    reader.join(30)
    log = "".join(lines)
    assert "received SIGTERM: draining" in log and "server stopped" in log
    assert "key-ops" not in log

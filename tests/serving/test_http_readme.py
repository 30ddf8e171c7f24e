"""The README's `openai` client example against `scripts/serve.py --insecure_dev_mode` on the
embedded default model, as a real process serving gRPC and HTTP at once; then SIGTERM drains."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### OpenAI-compatible HTTP API") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_example_block_names_the_documented_url():
    code = readme_example()
    assert 'base_url="http://127.0.0.1:8000/v1"' in code
    compile(code, "README example", "exec")


def test_readme_example_claim_is_the_sample_claim_as_rendered():
    """The claim the example sends is the default model's prompt format, as `render_claim`
    writes it today (the model was trained on that column order)."""
    from pijax.claims.prompt import render_claim
    from pijax.claims.samples import sample_example

    claim = re.search(r'claim = """(.*?)"""', readme_example(), re.DOTALL).group(1)
    assert claim == render_claim(sample_example().claim)


@pytest.mark.slow
def test_readme_openai_example_on_the_default_model(tmp_path):
    http_port = free_port()
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "serve.py"),
        "--insecure_dev_mode",
        "--port",
        "0",
        "--http_port",
        str(http_port),
        "--metrics_port",
        "-1",
        "--warmup=off",
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
    grpc_port: list[int] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"pijax server ready on [\d.]+:(\d+)", line)
            if m:
                grpc_port.append(int(m.group(1)))
            if "OpenAI-compatible API ready" in line:
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(600) and grpc_port, "".join(lines[-30:])
        # Both protocols from one process.
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port[0]}") as channel:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=""), timeout=60)
                .status
            )
        assert status == health_pb2.HealthCheckResponse.SERVING
        base = f"http://127.0.0.1:{http_port}"
        assert httpx.get(f"{base}/health", timeout=60).status_code == 200
        code = readme_example().replace("127.0.0.1:8000", f"127.0.0.1:{http_port}")
        script = tmp_path / "readme_example.py"
        script.write_text(code)
        run = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=ROOT
        )
        assert run.returncode == 0, run.stderr[-3000:]
        out = run.stdout.splitlines()
        assert out[0] == "['default_model']"
        assert out[1].startswith("stop ")  # the findings JSON completed under the schema
        findings = ast.literal_eval(out[2])  # the printed dict of the parsed JSON
        schema = json.loads((ROOT / "configs" / "schemas" / "findings.schema.json").read_text())
        import jsonschema

        jsonschema.validate(findings, schema)
        assert out[3].startswith('{"claim_id"')  # the streamed review
        metrics = httpx.get(f"{base}/metrics", timeout=60).text
        assert 'pijax:request_success_total{finished_reason="stop",model_name="default_model"}' in (
            metrics
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, "".join(lines[-30:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    reader.join(30)
    assert "server stopped" in "".join(lines)

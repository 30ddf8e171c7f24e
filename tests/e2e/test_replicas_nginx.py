"""Two `serve.py` replicas behind nginx with `configs/deploy/nginx/pijax.conf`: a session's turns
land on one replica and reuse its KV; killing a replica sends new sessions to the other.

The shipped config is used as is, with only its ports rewritten to free ones; nginx runs as a
foreground process in a temporary prefix. `.ci/run` installs nginx (Debian package) when absent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pijax.serving.proto.pijax.v1 import inference_pb2 as pb
from pijax.serving.proto.pijax.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "configs" / "deploy" / "nginx" / "pijax.conf"
AUTH = ("authorization", "Bearer key-ops")
# The shipped config's ports: nginx gRPC, nginx HTTP, replica gRPC x2, replica HTTP x2.
SHIPPED_PORTS = ("8080", "8081", "50051", "50052", "8000", "8001")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _nginx_conf(tmp: Path, ports: list[int]) -> Path:
    """The shipped file with its ports replaced, inside a minimal nginx.conf."""
    text = CONF.read_text()
    for old, new in zip(SHIPPED_PORTS, ports, strict=True):
        text = text.replace(f"127.0.0.1:{old} ", f"127.0.0.1:{new} ").replace(
            f"listen {old}", f"listen 127.0.0.1:{new}"
        )
    assert all(f":{p} " not in text and f"listen {p}" not in text for p in SHIPPED_PORTS)
    (tmp / "pijax.conf").write_text(text)
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (tmp / d).mkdir(exist_ok=True)
    main = f"""
        worker_processes 1;
        pid {tmp}/nginx.pid;
        error_log {tmp}/logs/error.log info;
        events {{ worker_connections 256; }}
        http {{
            access_log {tmp}/logs/access.log;
            client_body_temp_path {tmp}/body;
            proxy_temp_path {tmp}/proxy;
            fastcgi_temp_path {tmp}/fastcgi;
            uwsgi_temp_path {tmp}/uwsgi;
            scgi_temp_path {tmp}/scgi;
            include {tmp}/pijax.conf;
        }}
    """
    path = tmp / "nginx.conf"
    path.write_text(main)
    return path


def _start_replica(grpc_port: int, http_port: int, keys: Path):
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "serve.py"),
        "--model=tiny-random",
        f"--port={grpc_port}",
        f"--http_port={http_port}",
        "--metrics_port=-1",
        f"--api_keys={keys}",
        "--warmup=off",
        "--num_pages=64",
        "--max_num_seqs=4",
        "--max_num_batched_tokens=64",
        "--max_model_len=256",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "pijax server ready on" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    return proc, ready, lines


def _turn(stub, session: str, prompt: list[int], start: bool) -> tuple[list[int], int]:
    """One session turn through nginx: (generated ids, cached prompt tokens)."""
    req = pb.GenerateRequest(
        prompt=[pb.PromptSegment(token_ids=pb.TokenIds(ids=prompt), scope="session")],
        sampling=pb.SamplingParams(temperature=0.0),
        max_tokens=4,
        ignore_eos=True,
        session_id=session,
        start_session=start,
    )
    ids, cached = [], 0
    for r in stub.Generate(req, metadata=(AUTH, ("x-session-id", session)), timeout=300):
        ids += list(r.token_ids)
        if r.HasField("usage"):
            cached = r.usage.cached_prompt_tokens
    return ids, cached


def _end_on_holder(direct: list, session: str) -> list[int]:
    """End the session on whichever replica holds it (asked directly, not through nginx);
    returns the indices of the replicas that knew it."""
    holders = []
    for i, stub in enumerate(direct):
        if stub is None:
            continue
        try:
            stub.EndSession(pb.EndSessionRequest(session_id=session), metadata=(AUTH,), timeout=60)
            holders.append(i)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
    return holders


@pytest.mark.slow
def test_sessions_stick_to_a_replica_and_survive_losing_one(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx not installed: .ci/run installs it (apt-get install nginx)"
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"key-ops": {"tenant": "ops", "zones": ["*"], "admin": True}}))
    ports = _free_ports(6)
    ngx_grpc, ngx_http, r_grpc, r_http = ports[0], ports[1], ports[2:4], ports[4:6]
    replicas = [_start_replica(r_grpc[i], r_http[i], keys) for i in (0, 1)]
    conf = _nginx_conf(tmp_path, ports)
    chans = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in r_grpc]
    ngx = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for proc, ready, lines in replicas:
            assert ready.wait(600) and proc.poll() is None, "".join(lines[-30:])
        assert ngx.poll() is None, ngx.stdout.read()
        direct = [pb_grpc.InferenceStub(c) for c in chans]
        with grpc.insecure_channel(f"127.0.0.1:{ngx_grpc}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=30).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.InferenceStub(ch)

            # Sessions: two turns each; the second extends the first's prompt and output.
            # 12 sessions: all on one replica by chance has probability ~2 x 2^-12.
            sessions = [f"conv-{i}" for i in range(12)]
            holders = {}
            for i, s in enumerate(sessions):
                p1 = list(range(10 + i, 50 + i))  # 40 tokens: 2 full pages of 16
                out1, cached1 = _turn(stub, s, p1, start=True)
                out2, cached2 = _turn(stub, s, p1 + out1 + [7, 8, 9], start=False)
                assert cached1 == 0
                assert cached2 >= 32, (s, cached2)  # the first turn's full pages were reused
                holders[s] = _end_on_holder(direct, s)
                assert len(holders[s]) == 1, (s, holders[s])  # both turns on one replica
            used = {h[0] for h in holders.values()}
            assert used == {0, 1}, holders  # the hash spreads sessions over both replicas

            # HTTP goes through proxy_pass to a replica's /health.
            with urllib.request.urlopen(f"http://127.0.0.1:{ngx_http}/health", timeout=30) as r:
                assert r.status == 200

            # Lose replica 0: every new session goes to replica 1 and works.
            replicas[0][0].send_signal(signal.SIGKILL)
            replicas[0][0].wait(timeout=30)
            direct[0] = None
            for i in range(6):
                s = f"after-{i}"
                p1 = list(range(60 + i, 100 + i))
                out1, _ = _turn(stub, s, p1, start=True)
                _, cached2 = _turn(stub, s, p1 + out1 + [7], start=False)
                assert cached2 >= 32, (s, cached2)
                assert _end_on_holder(direct, s) == [1], s
    finally:
        for c in chans:
            c.close()
        for proc, _, _ in replicas:
            if proc.poll() is None:
                proc.kill()
        ngx.send_signal(signal.SIGQUIT)
        try:
            ngx.wait(timeout=10)
        except subprocess.TimeoutExpired:
            ngx.kill()
        time.sleep(0.1)

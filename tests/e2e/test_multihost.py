"""Multi-host: 2 processes x 2 CPU devices on loopback (jax.distributed, gloo collectives) give
the same greedy tokens as 1 process x 4 devices and as 1 device, offline and served; a dead
worker makes process 0 report NOT_SERVING and exit non-zero within seconds.

Each process fixes its device count at start-up, so everything runs in subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pijax.serving.proto.pijax.v1 import inference_pb2 as pb
from pijax.serving.proto.pijax.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 6, 7], list(range(40)), list(range(100, 121))]
ENGINE = dict(num_pages=64, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)

OFFLINE = textwrap.dedent("""
    import json, sys
    from pijax import LLM, SamplingParams, distributed
    model, mesh, prompts, engine = sys.argv[1], *map(json.loads, sys.argv[2:5])
    c = None
    if len(sys.argv) > 5:
        addr, n, pid, channel = sys.argv[5], *map(int, sys.argv[6:9])
        c = distributed.initialize(addr, n, pid, channel)
    import jax
    llm = LLM(model or None, mesh_shape=tuple(mesh), **engine)
    if c is not None and not c.is_leader:
        print("WORKER_STEPS", distributed.run_worker(llm.engine))
    else:
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        outs = llm.generate(prompts, params)
        k = llm.engine.kv_pool[0].k
        result = {
            "tokens": [o.token_ids for o in outs],
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "processes": jax.process_count(),
            "pool_devices": len(k.sharding.device_set),
        }
        if c is not None:
            c.stop_workers()
            result["channel"] = c.stats.summary()
        print("RESULT" + json.dumps(result))
""")


def _env(devices: int) -> dict:
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
    )


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _result(stdout: str) -> dict:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _offline(model: str, mesh, devices: int) -> dict:
    args = [model, json.dumps(mesh), json.dumps(PROMPTS), json.dumps(ENGINE)]
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE, *args],
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _result(proc.stdout)


@pytest.mark.slow
def test_two_processes_match_one_process_and_one_device():
    coord, channel = _free_ports(2)
    # The embedded default model: an HF safetensors checkpoint each process reads only its own
    # slices of; 2 kv heads on a model axis of 4 (each replicated on 2 devices, across processes).
    args = ["", json.dumps([1, 4]), json.dumps(PROMPTS), json.dumps(ENGINE)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                OFFLINE,
                *args,
                f"127.0.0.1:{coord}",
                "2",
                str(pid),
                str(channel),
            ],
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    multi = _result(outs[0][0])
    assert "WORKER_STEPS" in outs[1][0]
    worker_steps = int(outs[1][0].split("WORKER_STEPS")[1].split()[0])

    four, one = _offline("", [1, 4], 4), _offline("", [1, 1], 1)
    assert multi["processes"] == 2 and multi["devices"] == 4 and multi["local_devices"] == 2
    assert multi["pool_devices"] == 4  # the pool spans both processes' devices
    assert four["processes"] == 1 and four["pool_devices"] == 4
    assert multi["tokens"] == four["tokens"] == one["tokens"]
    # One host message per step, every step run on the worker too.
    ch = multi["channel"]
    assert ch["messages"] == worker_steps > 0
    assert 0 < ch["mean_bytes"] < 64 << 10, ch
    print("step channel:", ch)


def _serve_cmd(pid: int, coord: int, channel: int, keys: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "scripts" / "serve.py"),
        "--model=tiny-random",
        "--mesh=2,2",  # one data shard per process, kv heads split over each process's two
        "--port=0",
        "--metrics_port=-1",
        "--http_port=0",
        f"--api_keys={keys}",
        "--warmup=off",
        "--num_pages=64",
        "--max_num_seqs=4",
        "--max_num_batched_tokens=64",
        "--max_model_len=256",
        f"--coordinator_address=127.0.0.1:{coord}",
        "--num_processes=2",
        f"--process_id={pid}",
        f"--step_channel_port={channel}",
    ]


@pytest.mark.slow
def test_served_request_matches_and_a_dead_worker_stops_the_leader(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"key-ops": {"tenant": "ops", "zones": ["*"], "admin": True}}))
    coord, channel = _free_ports(2)
    procs = [
        subprocess.Popen(
            _serve_cmd(pid, coord, channel, keys),
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    lines: list[list[str]] = [[], []]
    port: list[int] = []
    ready = threading.Event()

    def read(i):
        for line in procs[i].stdout:
            lines[i].append(line)
            if i == 0 and "pijax server ready on" in line:
                port.append(int(line.rsplit(":", 1)[1].split()[0]))
                ready.set()
        ready.set()

    for i in (0, 1):
        threading.Thread(target=read, args=(i,), daemon=True).start()
    try:
        assert ready.wait(600) and port, "".join(lines[0][-30:] + lines[1][-30:])
        auth = (("authorization", "Bearer key-ops"),)
        with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            check = health_pb2.HealthCheckRequest(service="pijax.v1.Inference")
            assert health.Check(check, timeout=60).status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.InferenceStub(ch)
            info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=auth, timeout=60)
            assert list(info.mesh_shape) == [2, 2]
            assert info.num_pages == 2 * 63  # 64 pages per data shard, each with a null page
            served = []
            for prompt in PROMPTS:
                req = pb.GenerateRequest(
                    prompt=[pb.PromptSegment(token_ids=pb.TokenIds(ids=prompt))],
                    sampling=pb.SamplingParams(temperature=0.0),
                    max_tokens=8,
                    ignore_eos=True,
                )
                served.append(
                    [t for r in stub.Generate(req, metadata=auth, timeout=300) for t in r.token_ids]
                )
            assert served == _offline("tiny-random", [1, 1], 1)["tokens"]

            # Kill the worker: the leader stops admitting, says NOT_SERVING, exits non-zero.
            procs[1].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            seen_not_serving = False
            while procs[0].poll() is None and time.monotonic() - killed < 30:
                try:
                    status = health.Check(check, timeout=1).status
                    seen_not_serving |= status == health_pb2.HealthCheckResponse.NOT_SERVING
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
            rc = procs[0].wait(timeout=30)  # a hang guard (no hang), not a timing assertion
        log = "".join(lines[0][-30:])
        assert rc == 3, log
        assert seen_not_serving, log
        assert "worker process 1 disconnected" in log
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

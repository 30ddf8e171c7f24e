"""The multi-host step channel and its failure handling, on loopback without jax.distributed
(the two-process runs are in tests/e2e/test_multihost.py)."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from pijax import distributed
from pijax.distributed import FAILURE_EXIT_CODE, Cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair(exits: list[int], hooks: list[str]) -> tuple[Cluster, Cluster]:
    port = _free_port()
    leader = Cluster(0, 2, failure_exit_s=0.05, exit_fn=exits.append)
    leader.on_failure(hooks.append)
    worker = Cluster(1, 2, exit_fn=exits.append)
    t = threading.Thread(target=leader.listen, args=("127.0.0.1", port, 30))
    t.start()
    worker.connect("127.0.0.1", port, 30)
    t.join(30)
    return leader, worker


def test_steps_arrive_in_order_then_stop():
    exits, hooks = [], []
    leader, worker = _pair(exits, hooks)
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 1000, size=n), "n": n} for n in (16, 64, 32)]
    for i, b in enumerate(batches):
        leader.send_step(b, chained=i > 0)
    leader.stop_workers()
    got, chained = [], []
    while (msg := worker.receive()) is not None:
        got.append(msg[0])
        chained.append(msg[1])
    assert [g["n"] for g in got] == [16, 64, 32]
    assert chained == [False, True, True]
    for g, b in zip(got, batches, strict=True):
        np.testing.assert_array_equal(g["tokens"], b["tokens"])
    s = leader.stats.summary()
    assert s["messages"] == 3 and s["max_bytes"] >= 64 * 8
    worker._leader.close()
    time.sleep(0.2)
    assert hooks == [] and exits == []  # a worker leaving after a stop is no failure


def test_a_dead_worker_runs_the_hooks_and_exits_non_zero():
    exits, hooks = [], []
    leader, worker = _pair(exits, hooks)
    worker._leader.close()  # the worker process dies
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.02)
    assert exits == [FAILURE_EXIT_CODE]
    assert hooks and "worker process 1 disconnected" in hooks[0]
    assert leader.failed
    with pytest.raises(RuntimeError, match="multi-host run failed"):
        leader.send_step({"n": 1})


def test_a_vanished_leader_ends_the_worker():
    exits, hooks = [], []
    leader, worker = _pair(exits, hooks)
    for conn in leader._workers.values():
        leader._stopping = True  # not a worker failure: the leader itself goes away
        # shutdown, not just close: the leader's own monitor thread is blocked in recv on this
        # socket, and a bare close() from another thread sends no FIN while it is.
        conn.shutdown(socket.SHUT_RDWR)
        conn.close()
    assert worker.receive() is None
    assert exits == [FAILURE_EXIT_CODE]


def test_single_process_without_flags_or_env(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is None
    step = object()
    assert distributed.wrap_step(step) is step
    assert distributed.agree_min(7) == 7


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("127.0.0.1:1234", 2, None), r"missing: \['process_id'\]"),
        ((None, 2, 0), r"missing: \['coordinator_address'\]"),
        (("127.0.0.1:1234", 2, 2), r"process_id must be in \[0, num_processes=2\); got 2"),
        (("localhost", 2, 0), "coordinator_address must be HOST:PORT"),
    ],
)
def test_bad_multi_host_arguments_name_the_field(monkeypatch, args, match):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=match):
        distributed.initialize(*args)


def test_env_values_must_be_integers(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer; got 'two'"):
        distributed.initialize()

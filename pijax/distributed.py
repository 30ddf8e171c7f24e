"""Many hosts, one engine: multi-controller JAX with process 0 leading.

Every process runs the same program up to the engine. `initialize` joins the JAX cluster
(`jax.distributed.initialize`; on CPU the cross-process collectives go through gloo) and opens
the step channel; then every process builds the same `Engine` (same config, same model), so the
mesh, the parameters and the KV pool are global arrays over all processes' devices, each process
holding (and loading) only its own devices' shards. Then the roles split:

  * process 0, the leader, runs the scheduler, the tokenizer and the servers. The engine's step
    function is wrapped (`wrap_step`): before each jitted step (warm-up included) the step's
    input, a few KB of numpy arrays, goes to every worker as one message on the step channel;
  * every other process, a worker, runs `run_worker`: receive a step input, call the same jitted
    step on the same global arrays, until the leader says stop.

So the device work is that of a single-process run on the same mesh; only the host message is
added (`ChannelStats`: bytes and send time per step, and the workers' receive latency).

The step channel is plain TCP from the leader (coordinator host, coordinator port + 1 unless
`--step_channel_port`) to each worker, length-prefixed pickles between processes of one
deployment (trusted peers; bind it to a private network). Failure: the leader watches each
worker's connection; when one closes without a stop, the leader runs its failure hooks (the
server stops admitting and reports NOT_SERVING) and exits with `FAILURE_EXIT_CODE` after
`failure_exit_s`, never waiting on collectives that can no longer complete. A worker whose
leader disappears exits with the same code.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable

import jax
from absl import flags

log = logging.getLogger(__name__)

FAILURE_EXIT_CODE = 3
_STEP, _STOP, _HELLO = 1, 2, 3
_HEADER = struct.Struct("!IQd")  # kind, payload length, send time (time.time())


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """--coordinator_address, --num_processes, --process_id, --step_channel_port. Left unset, JAX's
    environment variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) apply;
    with none of them the run is single-process."""
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0 for a multi-host run (env JAX_COORDINATOR_ADDRESS).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        "Processes in the run (env JAX_NUM_PROCESSES).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "process_id",
        None,
        "This process's index; 0 leads (env JAX_PROCESS_ID).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "step_channel_port",
        None,
        "Port of the leader's step channel (default: the coordinator port + 1).",
        flag_values=flag_values,
    )


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Cluster | None:
    return initialize(
        flag_values["coordinator_address"].value,
        flag_values["num_processes"].value,
        flag_values["process_id"].value,
        flag_values["step_channel_port"].value,
    )


@dataclasses.dataclass
class ChannelStats:
    """Step messages: count, bytes, the leader's send time and the workers' receive latency."""

    messages: int = 0
    bytes: int = 0
    max_bytes: int = 0
    send_s: float = 0.0
    latency_s: float = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        self.messages += 1
        self.bytes += nbytes
        self.max_bytes = max(self.max_bytes, nbytes)
        self.send_s += seconds

    def summary(self) -> dict:
        n = max(self.messages, 1)
        return {
            "messages": self.messages,
            "mean_bytes": self.bytes / n,
            "max_bytes": self.max_bytes,
            "mean_send_ms": 1e3 * self.send_s / n,
            "mean_latency_ms": 1e3 * self.latency_s / n,
        }


class Cluster:
    """This process's place in a multi-process run, and the step channel."""

    def __init__(
        self,
        process_id: int,
        num_processes: int,
        failure_exit_s: float = 2.0,
        exit_fn: Callable[[int], None] = os._exit,
    ):
        self.process_id = process_id
        self.num_processes = num_processes
        self.failure_exit_s = failure_exit_s
        self._exit = exit_fn  # os._exit: no atexit handlers, no waiting on dead collectives
        self.stats = ChannelStats()
        self._workers: dict[int, socket.socket] = {}
        self._leader: socket.socket | None = None
        self._stopping = False
        self._failed: str | None = None
        self._hooks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @property
    def failed(self) -> str | None:
        return self._failed

    # --- setup ------------------------------------------------------------------------------

    def listen(self, host: str, port: int, timeout_s: float) -> None:
        srv = socket.create_server((host, port), reuse_port=False)
        srv.settimeout(timeout_s)
        try:
            while len(self._workers) < self.num_processes - 1:
                conn, _ = srv.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(None)
                kind, payload, _ = _recv(conn)
                if kind != _HELLO:
                    raise ConnectionError(f"step channel: expected a hello, got kind {kind}")
                self._workers[int(payload.decode())] = conn
        finally:
            srv.close()
        for pid, conn in self._workers.items():
            threading.Thread(
                target=self._watch, args=(pid, conn), name=f"watch-worker-{pid}", daemon=True
            ).start()
        atexit.register(self.stop_workers)

    def connect(self, host: str, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn = socket.create_connection((host, port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(None)
        _send(conn, _HELLO, str(self.process_id).encode())
        self._leader = conn

    # --- leader -----------------------------------------------------------------------------

    def on_failure(self, hook: Callable[[str], None]) -> None:
        """Run `hook(reason)` (from a watchdog thread) if a worker dies."""
        self._hooks.append(hook)

    def send_step(self, batch, chained: bool = False) -> None:
        """Send one step's input; `chained`: the step reads the previous step's device result
        (overlapped scheduling), which each worker holds as its own last output."""
        if self._failed:
            raise RuntimeError(f"multi-host run failed: {self._failed}")
        payload = pickle.dumps((batch, chained), protocol=pickle.HIGHEST_PROTOCOL)
        start = time.perf_counter()
        with self._lock:
            for pid, conn in self._workers.items():
                try:
                    _send(conn, _STEP, payload)
                except OSError as e:
                    self._fail(f"worker process {pid}: step channel send failed: {e}")
                    raise RuntimeError(f"multi-host run failed: {self._failed}") from e
        self.stats.add(len(payload), time.perf_counter() - start)

    def stop_workers(self) -> None:
        """Tell every worker to leave its loop (idempotent; also run at exit)."""
        with self._lock:
            if self._stopping or not self._workers:
                return
            self._stopping = True
            for conn in self._workers.values():
                try:
                    _send(conn, _STOP, b"")
                except OSError:
                    pass
        log.info("multi-host step channel: %s", self.stats.summary())

    def _watch(self, pid: int, conn: socket.socket) -> None:
        try:
            data = conn.recv(1)  # workers send nothing after their hello: this returns on close
        except OSError:
            data = b""
        if not data and not self._stopping:
            self._fail(f"worker process {pid} disconnected from the step channel")

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._failed:
                return
            self._failed = reason
        log.error("%s: stopping (exit code %d)", reason, FAILURE_EXIT_CODE)
        for hook in self._hooks:
            try:
                hook(reason)
            except Exception:  # a failing hook must not stop the exit
                log.exception("failure hook")
        timer = threading.Timer(self.failure_exit_s, self._exit, args=(FAILURE_EXIT_CODE,))
        timer.daemon = True
        timer.start()

    # --- worker -----------------------------------------------------------------------------

    def receive(self):
        """The next (step input, chained), or None when the leader says stop. A vanished leader
        ends the process with `FAILURE_EXIT_CODE`."""
        try:
            kind, payload, sent = _recv(self._leader)
        except (OSError, ConnectionError) as e:
            log.error("leader disconnected from the step channel (%s): exiting", e)
            self._exit(FAILURE_EXIT_CODE)
            return None
        if kind == _STOP:
            return None
        self.stats.latency_s += max(0.0, time.time() - sent)
        self.stats.add(len(payload), 0.0)
        return pickle.loads(payload)


_CLUSTER: Cluster | None = None


def cluster() -> Cluster | None:
    """The multi-process run this process belongs to, or None (single process)."""
    return _CLUSTER


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    step_channel_port: int | None = None,
    *,
    timeout_s: float = 300.0,
) -> Cluster | None:
    """Join a multi-process run (flags first, then JAX's environment variables); None when this
    is a single-process run. Must run before anything touches a JAX device."""
    global _CLUSTER
    if _CLUSTER is not None:
        return _CLUSTER
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = _int_env("JAX_NUM_PROCESSES")
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = _int_env("JAX_PROCESS_ID")
    if coordinator_address is None and num_processes in (None, 1):
        return None
    missing = [
        name
        for name, v in (
            ("coordinator_address", coordinator_address),
            ("num_processes", num_processes),
            ("process_id", process_id),
        )
        if v is None
    ]
    if missing:
        raise ValueError(
            f"a multi-host run needs --coordinator_address, --num_processes and --process_id "
            f"(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing: {missing}"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id must be in [0, num_processes={num_processes}); got {process_id}"
        )
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator_address must be HOST:PORT; got {coordinator_address!r}")
    channel_port = step_channel_port or int(port) + 1
    # CPU collectives across processes (a no-op for accelerator backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    c = Cluster(process_id, num_processes)
    if c.is_leader:
        c.listen(host.strip("[]"), channel_port, timeout_s)
    else:
        c.connect(host.strip("[]"), channel_port, timeout_s)
    log.info(
        "process %d of %d joined (%d local devices, %d in all); step channel on port %d",
        process_id,
        num_processes,
        jax.local_device_count(),
        jax.device_count(),
        channel_port,
    )
    _CLUSTER = c
    return c


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer; got {value!r}") from None


class _LeaderStep:
    """The engine's step function on the leader: each call first sends its step input."""

    def __init__(self, inner, c: Cluster):
        self._inner, self._cluster = inner, c
        self._last = None  # the last step's device result

    def __call__(self, params, kv_pool, batch, prev=None):
        if prev is not None and prev is not self._last:
            raise ValueError("multi-host: a step may only chain on the step dispatched before it")
        self._cluster.send_step(batch, chained=prev is not None)
        packed, kv_pool = self._inner(params, kv_pool, batch, prev)
        self._last = packed
        return packed, kv_pool

    def __getattr__(self, name):
        return getattr(self._inner, name)


def wrap_step(step):
    """The engine's step function as this process must call it (the leader broadcasts)."""
    c = _CLUSTER
    return _LeaderStep(step, c) if c is not None and c.is_leader else step


def is_worker() -> bool:
    return _CLUSTER is not None and not _CLUSTER.is_leader


def run_worker(engine) -> int:
    """A worker's life: run the leader's steps on this process's devices until it says stop.
    Returns the number of steps run."""
    c = _CLUSTER
    if c is None or c.is_leader:
        raise RuntimeError("run_worker is for processes other than 0 of a multi-host run")
    step = engine._step
    steps, packed = 0, None
    while (msg := c.receive()) is not None:
        batch, chained = msg
        prev = packed if chained else None
        packed, engine.kv_pool = step(engine.model.params, engine.kv_pool, batch, prev)
        steps += 1
    if packed is not None:
        jax.block_until_ready(packed)
    log.info("worker %d: %d steps; step channel %s", c.process_id, steps, c.stats.summary())
    return steps


def agree_min(value: int) -> int:
    """The smallest of every process's `value` (so all processes size arrays alike); `value`
    itself in a single-process run."""
    if _CLUSTER is None:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int64(value))))


def _send(conn: socket.socket, kind: int, payload: bytes) -> None:
    conn.sendall(_HEADER.pack(kind, len(payload), time.time()) + payload)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("step channel closed")
        buf += chunk
    return bytes(buf)


def _recv(conn: socket.socket) -> tuple[int, bytes, float]:
    kind, length, sent = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
    return kind, _recv_exact(conn, length), sent

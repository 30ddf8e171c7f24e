"""Adversarial soak over loopback: three tenants, one of them hostile, for a bounded time.

    python scripts/soak.py --duration_s 600 --out benchmarks/results/soak.json
    python scripts/soak.py --duration_s 60 --tracemalloc          # where memory grows

An in-process server (127.0.0.1, a free port; `tiny-random` unless `--model`) takes load at about
twice its capacity (`--clients_per_tenant` x 2 well-behaved tenants against `max_num_seqs`):
tenants `acme` and `beta` stream completions (some with a JSON schema, some cancelled mid-stream,
some with short deadlines) while tenant `evil` sends what issue 14 found: 4 MiB prompts, prompts
just over the byte bound, regex-bomb and self-referential schemas, 1,000-level nesting, garbage
bytes, duplicate `authorization` headers, priority -100, NaN audit reads.

The report (stdout and `--out`): requests by tenant and final status, unexpected statuses
(anything a request did not deserve: a well-behaved request ends OK, CANCELLED when its client
cancelled, DEADLINE_EXCEEDED when it set a deadline, RESOURCE_EXHAUSTED under overload; a hostile
one ends with the refusal it was built to get), leaked KV pages once idle, process RSS after
warm-up and at the end, and the largest gap between two stream messages of tenant `beta` (the
"other tenant" whose stream must not stall while `evil` attacks). With `--tracemalloc`, the top
allocation growths between warm-up and the end. Numbers are this machine's; the script asserts
nothing. Loopback only: it never listens on or connects to anything else.
"""

from __future__ import annotations

import collections
import json
import os
import random
import tempfile
import threading
import time
import tracemalloc

import grpc
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_float("duration_s", 120.0, "How long to send load (the drain after it is bounded).")
flags.DEFINE_string("model", "tiny-random", "Model the server loads.")
flags.DEFINE_integer("clients_per_tenant", 4, "Concurrent streams of each well-behaved tenant.")
flags.DEFINE_integer("max_num_seqs", 4, "Engine sequences per step (capacity).")
flags.DEFINE_integer("seed", 0, "Random seed of the load.")
flags.DEFINE_bool("tracemalloc", False, "Trace Python allocations (slower) and report growth.")
flags.DEFINE_string("out", None, "Write the JSON report here too.")

KEYS = {
    "soak-acme": {"tenant": "acme", "zones": []},
    "soak-beta": {"tenant": "beta", "zones": []},
    "soak-evil": {"tenant": "evil", "zones": []},
}
SCHEMA = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
OK, CANCELLED, DEADLINE = "OK", "CANCELLED", "DEADLINE_EXCEEDED"
EXHAUSTED, INVALID = "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_status: dict[str, collections.Counter] = collections.defaultdict(
            collections.Counter
        )
        self.unexpected: list[str] = []
        self.max_gap_s: dict[str, float] = collections.defaultdict(float)

    def record(self, tenant: str, kind: str, status: str, allowed: tuple[str, ...]):
        with self.lock:
            self.by_status[tenant][status] += 1
            if status not in allowed and len(self.unexpected) < 50:
                self.unexpected.append(f"{tenant} {kind}: {status} (allowed {allowed})")

    def gap(self, tenant: str, seconds: float):
        with self.lock:
            self.max_gap_s[tenant] = max(self.max_gap_s[tenant], seconds)


def md(key: str):
    return (("authorization", f"Bearer {key}"),)


def well_behaved(stub, tenant: str, tally: Tally, stop: threading.Event, rng: random.Random):
    from pijax.serving.proto.pijax.v1 import inference_pb2 as pb

    while not stop.is_set():
        max_tokens = rng.randint(8, 48)
        roll = rng.random()
        request = pb.GenerateRequest(
            prompt=[pb.PromptSegment(text=f"claim {rng.randint(0, 10**6)} " * rng.randint(1, 8))],
            max_tokens=max_tokens,
            ignore_eos=True,
            sampling=pb.SamplingParams(temperature=0.0),
            json_schema=SCHEMA if roll < 0.15 else "",
        )
        cancel_after = rng.randint(1, 3) if 0.15 <= roll < 0.25 else None
        timeout = rng.uniform(0.05, 0.5) if 0.25 <= roll < 0.35 else 120.0
        allowed = (OK, EXHAUSTED)
        if cancel_after is not None:
            allowed += (CANCELLED,)
        if timeout < 120.0:
            allowed += (DEADLINE,)
        call = stub.Generate(request, metadata=md(f"soak-{tenant}"), timeout=timeout)
        status, last, n = OK, None, 0
        try:
            for _ in call:
                now = time.monotonic()
                if last is not None:
                    tally.gap(tenant, now - last)
                last, n = now, n + 1
                if cancel_after is not None and n >= cancel_after:
                    call.cancel()
        except grpc.RpcError as e:
            status = e.code().name
        tally.record(tenant, "generate", status, allowed)
        if status == EXHAUSTED:
            time.sleep(0.05)


def hostile(server, tally: Tally, stop: threading.Event, rng: random.Random):
    from pijax.serving.proto.pijax.v1 import inference_pb2 as pb

    stub, channel = server.stub, server.channel
    bound = server.server.info.limits.max_text_bytes
    counter = 0

    def text(t, **kw):
        return pb.GenerateRequest(prompt=[pb.PromptSegment(text=t)], max_tokens=4, **kw)

    def bomb():
        tag = f"z{counter}"
        return json.dumps(
            {"type": "string", "allOf": [{"pattern": f"{tag}{{{i}}}"} for i in range(50)]}
        )

    deep = '{"type": "string"}'
    for _ in range(1000):
        deep = '{"type": "object", "properties": {"a": ' + deep + "}}"
    attacks = [
        ("4 MiB prompt", lambda: text("x" * (4 << 20)), md("soak-evil"), 10.0, (EXHAUSTED,)),
        ("over the byte bound", lambda: text("y" * (bound + 1)), md("soak-evil"), 10.0, (INVALID,)),
        # a fresh bomb each time (a repeated one is refused from the cache); the client gives up
        # after 2 s, which must kill the compilation
        (
            "regex bomb",
            lambda: text("q", json_schema=bomb()),
            md("soak-evil"),
            2.0,
            (INVALID, DEADLINE),
        ),
        (
            "self ref",
            lambda: text("q", json_schema='{"$ref": "#"}'),
            md("soak-evil"),
            10.0,
            (INVALID,),
        ),
        ("deep schema", lambda: text("q", json_schema=deep), md("soak-evil"), 10.0, (INVALID,)),
        ("priority -100", lambda: text("p", priority=-100), md("soak-evil"), 10.0, (INVALID,)),
        (
            "two auth headers",
            lambda: text("a"),
            (("authorization", "Bearer nope"), ("authorization", "Bearer soak-evil")),
            10.0,
            ("UNAUTHENTICATED",),
        ),
    ]
    raw = channel.unary_unary(
        "/pijax.v1.Inference/Tokenize", request_serializer=None, response_deserializer=None
    )
    while not stop.is_set():
        counter += 1
        name, make, metadata, timeout, allowed = attacks[counter % len(attacks)]
        status = OK
        try:
            list(stub.Generate(make(), metadata=metadata, timeout=timeout))
        except grpc.RpcError as e:
            status = e.code().name
        tally.record("evil", name, status, allowed)
        for payload, metadata, allowed in (
            (bytes(rng.getrandbits(8) for _ in range(64)), (), ("UNAUTHENTICATED",)),
            (b"\x0a\x04\xff\xfe\xfd\xfc", md("soak-evil"), (INVALID,)),
        ):
            try:
                raw(payload, metadata=metadata, timeout=10.0)
                status = OK
            except grpc.RpcError as e:
                status = e.code().name
            tally.record("evil", "garbage", status, allowed)
        try:
            stub.ReadAuditLog(
                pb.ReadAuditLogRequest(since_unix_seconds=float("nan")),
                metadata=md("soak-evil"),
                timeout=10.0,
            )
            status = OK
        except grpc.RpcError as e:
            status = e.code().name
        tally.record("evil", "audit read", status, ("PERMISSION_DENIED",))


def main(argv):
    del argv
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "serving"))
    from serving_harness import start_server  # the tests' in-process server on a thread

    from pijax import LLM

    rng = random.Random(FLAGS.seed)
    keys = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)  # noqa: SIM115
    json.dump(KEYS, keys)
    keys.close()
    llm = LLM(
        FLAGS.model,
        num_pages=64,
        page_size=16,
        max_num_seqs=FLAGS.max_num_seqs,
        max_num_batched_tokens=64,
        max_model_len=1024,
        max_waiting=2 * FLAGS.clients_per_tenant,
    )
    server = start_server(llm.engine, keys.name)  # host 127.0.0.1, a free port
    tally = Tally()
    # Warm-up: compile the step shapes and the schema before measuring memory.
    warm_stop = threading.Event()
    warm = threading.Thread(
        target=well_behaved, args=(server.stub, "acme", Tally(), warm_stop, random.Random(1))
    )
    warm.start()
    time.sleep(min(30.0, FLAGS.duration_s / 4))
    warm_stop.set()
    warm.join()
    if FLAGS.tracemalloc:
        tracemalloc.start(10)
        snap0 = tracemalloc.take_snapshot()
    rss_start = rss_mib()
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=well_behaved,
            args=(server.stub, tenant, tally, stop, random.Random(rng.random())),
            name=f"soak-{tenant}-{i}",
        )
        for tenant in ("acme", "beta")
        for i in range(FLAGS.clients_per_tenant)
    ]
    threads.append(
        threading.Thread(target=hostile, args=(server, tally, stop, random.Random(rng.random())))
    )
    t0 = time.monotonic()
    for t in threads:
        t.start()
    rss_samples = []
    while time.monotonic() - t0 < FLAGS.duration_s:
        time.sleep(min(10.0, FLAGS.duration_s / 10))
        rss_samples.append(round(rss_mib(), 1))
    stop.set()
    for t in threads:
        t.join(180)
    for _ in range(600):  # bounded: aborts land within a step
        if not server.server.servicer.num_inflight and not server.on_engine(
            lambda e: e.has_unfinished_requests()
        ):
            break
        time.sleep(0.05)

    def pages(engine):
        blocks = engine.blocks
        pinned = engine.kv.sessions.num_pages_held()
        return blocks.num_used_pages() - pinned, blocks.num_usable_pages

    leaked, usable = server.on_engine(pages)
    rss_end = rss_mib()
    growth = []
    if FLAGS.tracemalloc:
        snap1 = tracemalloc.take_snapshot()
        growth = [str(s) for s in snap1.compare_to(snap0, "lineno")[:10]]
        for stat in snap1.compare_to(snap0, "traceback")[:3]:  # where the largest come from
            growth.append(
                f"{stat.size_diff / 1024:.1f} KiB from: "
                + " <- ".join(
                    line.strip()
                    for line in stat.traceback.format(limit=6, most_recent_first=True)
                    if not line.startswith("  File")
                )
            )
        tracemalloc.stop()
    sandbox = getattr(server.server.servicer.compiler, "sandbox", None)
    report = {
        "duration_s": FLAGS.duration_s,
        "model": FLAGS.model,
        "clients": {"acme": FLAGS.clients_per_tenant, "beta": FLAGS.clients_per_tenant, "evil": 1},
        "max_num_seqs": FLAGS.max_num_seqs,
        "requests_by_status": {t: dict(c) for t, c in sorted(tally.by_status.items())},
        "unexpected": tally.unexpected,
        "leaked_pages": leaked,
        "usable_pages": usable,
        "rss_mib_start": round(rss_start, 1),
        "rss_mib_end": round(rss_end, 1),
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 1),
        "rss_mib_samples": rss_samples,
        "max_stream_gap_s": {t: round(g, 3) for t, g in sorted(tally.max_gap_s.items())},
        "compile_workers_killed": None if sandbox is None else sandbox.num_killed,
        "cpu_load_1min_end": round(os.getloadavg()[0], 2),
        "tracemalloc_top_growth": growth,
    }
    server.stop()
    os.unlink(keys.name)
    print(json.dumps(report, indent=2))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    app.run(main)

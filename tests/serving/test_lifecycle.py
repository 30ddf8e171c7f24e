"""Server lifecycle: NOT_SERVING during warm-up, graceful drain (SIGTERM's path), and the grace
period running out. Each test starts its own server around the shared engine."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_harness import RPC_TIMEOUT_S, auth, start_server, text_request

from pijax.serving.proto.pijax.v1 import inference_pb2 as pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(server, service: str = "pijax.v1.Inference"):
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S).status


def poll(predicate, what: str, attempts: int = 3000):
    import time

    for _ in range(attempts):
        if predicate():
            return
        time.sleep(0.01)
    pytest.fail(f"gave up waiting for {what}")


def test_not_serving_until_warm(llm, keys_file, monkeypatch):
    release = threading.Event()
    real_warmup = llm.engine.warmup

    def slow_warmup(*args, **kwargs):
        assert release.wait(RPC_TIMEOUT_S)
        return real_warmup(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "warmup", slow_warmup)
    s = start_server(llm.engine, keys_file, warmup=True, wait=False)
    try:
        assert health(s) == NOT_SERVING and health(s, "") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            list(s.stub.Generate(text_request("early"), metadata=auth(), timeout=RPC_TIMEOUT_S))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "warming up" in e.value.details()
        release.set()
        s.started.result(RPC_TIMEOUT_S)
        assert health(s) == SERVING
        out = list(
            s.stub.Generate(
                text_request("warm", max_tokens=2), metadata=auth(), timeout=RPC_TIMEOUT_S
            )
        )
        assert out[-1].usage.completion_tokens >= 1
    finally:
        release.set()
        s.stop()


def test_drain_finishes_in_flight_and_refuses_new(llm, keys_file):
    s = start_server(llm.engine, keys_file, drain_grace_s=RPC_TIMEOUT_S)
    try:
        call = s.stub.Generate(
            text_request("in flight", max_tokens=60, ignore_eos=True),
            metadata=auth(),
            timeout=RPC_TIMEOUT_S,
        )
        first = next(call)
        drained = s.drain_in_background()
        poll(lambda: health(s) == NOT_SERVING, "NOT_SERVING while draining")
        with pytest.raises(grpc.RpcError) as e:
            list(s.stub.Generate(text_request("late"), metadata=auth(), timeout=RPC_TIMEOUT_S))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
        rest = list(call)  # the in-flight request runs to completion
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 60
        drained.result(RPC_TIMEOUT_S)
        assert not s.server.loop.running
    finally:
        s.stop()


def test_drain_past_grace_cancels_with_unavailable_and_frees_pages(llm, keys_file):
    s = start_server(llm.engine, keys_file, drain_grace_s=0.0)
    try:
        poll(lambda: s.on_engine(lambda e: not e.has_unfinished_requests()), "an idle engine")
        baseline = s.free_pages()
        call = s.stub.Generate(
            text_request("long", max_tokens=480, ignore_eos=True),
            metadata=auth(),
            timeout=RPC_TIMEOUT_S,
        )
        next(call)
        s.drain_in_background().result(RPC_TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # The loop thread has stopped, so reading the engine from here is safe.
        assert not llm.engine.has_unfinished_requests()
        assert llm.engine.blocks.num_free_pages() == baseline
    finally:
        s.stop()


class EngineWithoutZones:
    """The engine as it was before trusted prefixes and the audit log existed."""

    MISSING = {"register_trusted_prefix", "read_audit_log", "end_session"}

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        if name in self.MISSING:
            raise AttributeError(name)
        return getattr(self._engine, name)


def test_missing_engine_features_answer_unimplemented(llm, keys_file):
    s = start_server(EngineWithoutZones(llm.engine), keys_file)
    try:
        admin = auth("key-admin")
        for call, request in [
            (s.stub.RegisterTrustedPrefix, pb.RegisterTrustedPrefixRequest(zone="z", text="x")),
            (s.stub.ReadAuditLog, pb.ReadAuditLogRequest()),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                call(request, metadata=admin, timeout=RPC_TIMEOUT_S)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "this engine build has no" in e.value.details()
        # Sessions still work as a namespace; ending one needs no engine support.
        out = list(
            s.stub.Generate(
                pb.GenerateRequest(
                    prompt=[pb.PromptSegment(text="turn", scope="session")],
                    start_session=True,
                    max_tokens=2,
                ),
                metadata=auth(),
                timeout=RPC_TIMEOUT_S,
            )
        )
        s.stub.EndSession(
            pb.EndSessionRequest(session_id=out[0].session_id),
            metadata=auth(),
            timeout=RPC_TIMEOUT_S,
        )
    finally:
        s.stop()

"""Adversarial cases over a real loopback channel: what a hostile or broken client sends.

Each test is a regression test for a class of defect (issue 14): work before bounds, parsing
before authentication, oracles across tenants, guessable ids, ... The soak (`scripts/soak.py`)
covers the same classes under load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import grpc
import pytest
from serving_harness import RPC_TIMEOUT_S, auth, generate, text_request

from pijax.serving.admission import TenantGate
from pijax.serving.auth import AuthError, bearer_token
from pijax.serving.guard import RateLimitedLog
from pijax.serving.proto.pijax.v1 import inference_pb2 as pb
from pijax.serving.validation import (
    ModelLimits,
    RequestError,
    RequestLimits,
    max_message_bytes,
    max_token_bytes,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return e.value


def raw_call(server, method: str, payload: bytes, metadata=(), streaming: bool = False):
    """Send `payload` as the request message of `method`, unparsed."""
    path = f"/pijax.v1.Inference/{method}"
    call = (server.channel.unary_stream if streaming else server.channel.unary_unary)(
        path, request_serializer=None, response_deserializer=None
    )
    result = call(payload, metadata=metadata, timeout=RPC_TIMEOUT_S)
    return list(result) if streaming else result


class CountingTokenizer:
    """The engine's tokenizer, counting the characters it was asked to encode."""

    def __init__(self, inner):
        self._inner = inner
        self.chars = 0

    def encode(self, text, add_bos=None):
        self.chars += len(text)
        return self._inner.encode(text, add_bos=add_bos)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture
def counting_tokenizer(server):
    servicer = server.server.servicer
    original = servicer.tokenizer
    servicer.tokenizer = CountingTokenizer(original)
    yield servicer.tokenizer
    servicer.tokenizer = original


# --- bounds before work ---------------------------------------------------------------------------


def test_limits_derive_from_max_model_len_and_the_longest_token(server, llm):
    info = server.server.info
    assert info.max_token_bytes == max_token_bytes(llm.engine.tokenizer) == 1  # byte tokenizer
    assert info.limits.max_text_bytes == info.max_model_len
    assert server.server.max_message_bytes == max_message_bytes(info.limits, RequestLimits())


def test_oversized_prompt_is_refused_before_it_is_tokenized(server, counting_tokenizer):
    too_long = server.server.info.limits.max_text_bytes + 1
    for request in (
        text_request("a" * too_long),
        pb.GenerateRequest(  # split over segments: the total counts
            prompt=[pb.PromptSegment(text="é" * (too_long // 4 + 1)) for _ in range(3)]
        ),
    ):
        err = rpc_error(server.stub.Generate, request, metadata=auth(), timeout=RPC_TIMEOUT_S)
        assert err.code() == INVALID and "bytes" in err.details(), err.details()
        assert "prompt" in err.details()
    err = rpc_error(
        server.stub.Tokenize,
        pb.TokenizeRequest(text="b" * too_long),
        metadata=auth(),
        timeout=RPC_TIMEOUT_S,
    )
    assert err.code() == INVALID and err.details().startswith("text must be at most")
    assert counting_tokenizer.chars == 0


def test_too_many_token_ids_are_refused(server):
    n = server.server.info.max_model_len + 1
    request = pb.GenerateRequest(prompt=[pb.PromptSegment(token_ids=pb.TokenIds(ids=[1] * n))])
    err = rpc_error(server.stub.Generate, request, metadata=auth(), timeout=RPC_TIMEOUT_S)
    assert err.code() == INVALID and "token ids" in err.details()


def test_a_message_over_the_bound_is_refused_by_the_transport(server, counting_tokenizer):
    request = text_request("x" * (server.server.max_message_bytes + 1))
    err = rpc_error(server.stub.Generate, request, metadata=auth(), timeout=RPC_TIMEOUT_S)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert counting_tokenizer.chars == 0
    out = generate(server.stub, text_request("still serving", max_tokens=2, ignore_eos=True))
    assert out[-1].usage.completion_tokens == 2


def test_tenant_gate_caps_running_and_waiting_calls():
    async def scenario():
        gate = TenantGate("tokenizing", per_tenant=1, max_waiting=1)
        release = asyncio.Event()
        entered = []

        async def hold(tenant):
            async with gate.slot(tenant):
                entered.append(tenant)
                await release.wait()

        first = asyncio.create_task(hold("a"))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(hold("a"))
        other = asyncio.create_task(hold("b"))  # another tenant is not held up
        await asyncio.sleep(0)
        assert entered == ["a", "b"] and gate.in_use("a") == 1
        with pytest.raises(RequestError) as e:
            async with gate.slot("a"):
                pass
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        await asyncio.gather(first, waiting, other)
        assert entered == ["a", "b", "a"] and gate.in_use("a") == 0

    asyncio.run(scenario())


# --- malformed input, authentication before parsing -----------------------------------------------

GARBAGE = [
    b"\x0a\x04\xff\xfe\xfd\xfc",  # field 1 (a string) holding invalid UTF-8
    b"\x0a\x10abc",  # field 1 truncated: says 16 bytes, has 3
    bytes(range(256)) * 4,  # not protobuf at all
]


@pytest.mark.parametrize("method, streaming", [("Tokenize", False), ("Generate", True)])
def test_garbage_without_credentials_is_unauthenticated(server, method, streaming):
    for payload in GARBAGE:
        with pytest.raises(grpc.RpcError) as e:
            raw_call(server, method, payload, streaming=streaming)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method, streaming", [("Tokenize", False), ("Generate", True)])
def test_garbage_with_credentials_is_invalid_argument_logged_once(
    server, method, streaming, caplog
):
    metric = server.server.metrics.malformed.labels(method=method)
    before = metric._value.get()
    with caplog.at_level(logging.WARNING, logger="pijax.serving.guard"):
        for _ in range(10):
            for payload in GARBAGE:
                with pytest.raises(grpc.RpcError) as e:
                    raw_call(server, method, payload, metadata=auth(), streaming=streaming)
                assert e.value.code() == INVALID, e.value.details()
                assert "could not be parsed" in e.value.details()
    assert metric._value.get() - before == 10 * len(GARBAGE)
    lines = [r for r in caplog.records if r.name == "pijax.serving.guard"]
    assert len(lines) <= 1  # rate limited (the first of a minute may still be logged)
    assert all(r.exc_info is None for r in lines)


def test_rate_limited_log_reports_a_count():
    now = [0.0]
    rl = RateLimitedLog("things", interval_s=60, clock=lambda: now[0])
    for _ in range(100):
        rl.note("x")
    now[0] = 61.0
    rl.note("y")
    assert rl.total == 101 and rl.lines == 2


@pytest.mark.parametrize(
    "metadata",
    [
        (("authorization", "Bearer nope"), ("authorization", "Bearer key-acme")),
        (("authorization", "Bearer key-acme"), ("authorization", "Bearer key-acme")),
        (("authorization", "Bearer  key-acme"),),
        (("authorization", "Bearer key-acme extra"),),
        (("authorization", "Basic key-acme"),),
    ],
    ids=["wrong then right", "twice", "two spaces", "two words", "basic"],
)
def test_duplicate_or_malformed_authorization_is_unauthenticated(server, metadata):
    # (A trailing tab never reaches a server: gRPC's client library refuses the header value
    # itself, INTERNAL "Invalid metadata"; `bearer_token` refuses it too, below.)
    err = rpc_error(
        server.stub.ModelInfo, pb.ModelInfoRequest(), metadata=metadata, timeout=RPC_TIMEOUT_S
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
    assert "key-acme" not in err.details()


@pytest.mark.parametrize(
    "value", ["Bearer key\t", "Bearer  key", "Bearer key ", "Bearer k\x00y", "Bearer ké", b"x"]
)
def test_bearer_token_refuses_rather_than_trims(value):
    with pytest.raises(AuthError):
        bearer_token(value)
    assert bearer_token("bearer key-1") == "key-1"


# --- no oracle across tenants ---------------------------------------------------------------------


def test_unknown_and_forbidden_zones_get_the_same_answer(server):
    def answer(zone):
        request = pb.GenerateRequest(prompt=[pb.PromptSegment(text="x", scope=f"shared:{zone}")])
        err = rpc_error(
            server.stub.Generate, request, metadata=auth("key-beta"), timeout=RPC_TIMEOUT_S
        )
        return err.code(), err.details().replace(zone, "<zone>")

    assert answer("policy") == answer("no-such-zone")  # policy exists, beta may not use it
    assert answer("policy")[0] == grpc.StatusCode.PERMISSION_DENIED


def test_metrics_bind_to_loopback_by_default():
    from pijax.serving.server import ServerConfig, _is_loopback

    assert ServerConfig(insecure_dev_mode=True).metrics_host == "127.0.0.1"
    assert _is_loopback("::1") and not _is_loopback("0.0.0.0")


# --- ids ------------------------------------------------------------------------------------------


def test_server_ids_are_random_and_outside_the_client_namespace(server):
    ids = [generate(server.stub, text_request("id", max_tokens=1))[-1].request_id for _ in range(2)]
    assert ids[0] != ids[1]
    for rid in ids:
        assert rid.startswith("~") and len(rid) == 33
        assert int(rid[1:], 16) >= 0  # 128 bits of hex
    err = rpc_error(
        server.stub.Generate,
        text_request("x", request_id=ids[0]),
        metadata=auth(),
        timeout=RPC_TIMEOUT_S,
    )
    assert err.code() == INVALID and "request_id must be" in err.details()


def test_limits_are_finite():
    m = ModelLimits(vocab_size=100, max_model_len=4096, max_token_bytes=16)
    assert max_message_bytes(m, RequestLimits()) < 1 << 20
    assert math.isfinite(m.max_text_bytes)


# --- structured output admission ------------------------------------------------------------------


def deep_schema(depth: int) -> str:
    inner = '{"type": "string"}'
    for _ in range(depth):
        inner = '{"type": "object", "properties": {"a": ' + inner + "}}"
    return inner


@pytest.mark.parametrize(
    "schema, needle",
    [
        (deep_schema(1000), "json_schema must nest at most"),
        ('{"$ref": "#"}', "json_schema admits no finite JSON value"),
        (
            '{"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}',
            "json_schema admits no finite JSON value",
        ),
        ("[" * 5000 + "]" * 5000, "json_schema must nest at most"),
    ],
    ids=["deep properties", "self ref", "required self", "raw nesting"],
)
def test_hostile_schemas_are_invalid_argument_naming_the_field(server, schema, needle):
    request = text_request("x", json_schema=schema)
    err = rpc_error(server.stub.Generate, request, metadata=auth(), timeout=RPC_TIMEOUT_S)
    assert err.code() == INVALID, err.details()
    assert err.details().startswith(needle)


def regex_bomb(tag: str, n: int = 50) -> str:
    return json.dumps({"type": "string", "allOf": [{"pattern": f"{tag}{{{i}}}"} for i in range(n)]})


@pytest.mark.slow
def test_runaway_schema_is_bounded_and_others_keep_their_cached_schema(server):
    good = json.dumps(
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    )
    generate(server.stub, text_request("warm", max_tokens=12, json_schema=good), key="key-beta")
    err = rpc_error(
        server.stub.Generate,
        text_request("x", json_schema=regex_bomb("q")),
        metadata=auth(),
        timeout=RPC_TIMEOUT_S,
    )
    assert err.code() == INVALID and "compile" in err.details() and "budget" in err.details()
    out = generate(
        server.stub, text_request("again", max_tokens=12, json_schema=good), key="key-beta"
    )
    assert out[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


@pytest.mark.slow
def test_abandoned_compilation_is_killed(server):
    sandbox = server.server.servicer.compiler.sandbox
    killed = sandbox.num_killed
    with pytest.raises(grpc.RpcError) as e:
        generate(server.stub, text_request("x", json_schema=regex_bomb("w")), timeout=1.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(200):  # bounded wait for the kill (no timing assertion)
        if sandbox.num_killed > killed:
            break
        time.sleep(0.05)
    assert sandbox.num_killed > killed


# --- audit reads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("since", [math.nan, math.inf, -math.inf])
def test_read_audit_log_refuses_a_non_finite_since(server, since):
    err = rpc_error(
        server.stub.ReadAuditLog,
        pb.ReadAuditLogRequest(since_unix_seconds=since),
        metadata=auth("key-admin"),
        timeout=RPC_TIMEOUT_S,
    )
    assert err.code() == INVALID and "since_unix_seconds must be a finite number" in err.details()


def test_audit_reads_are_admin_only_and_page_by_seq(server):
    for key in ("key-acme", "key-beta"):
        err = rpc_error(
            server.stub.ReadAuditLog,
            pb.ReadAuditLogRequest(after_seq=-1),
            metadata=auth(key),
            timeout=RPC_TIMEOUT_S,
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    for i in range(3):
        server.on_engine(
            lambda e, i=i: e.register_trusted_prefix(f"paging{i}", [5, 6, 7, 8], source="test")
        )
    seqs, after = [], -1
    for _ in range(1000):
        page = server.stub.ReadAuditLog(
            pb.ReadAuditLogRequest(after_seq=after, limit=2),
            metadata=auth("key-admin"),
            timeout=RPC_TIMEOUT_S,
        ).records
        if not page:
            break
        seqs += [r.seq for r in page]
        after = page[-1].seq
    assert seqs == list(range(len(seqs))) and len(seqs) >= 3


# --- fairness between tenants ---------------------------------------------------------------------


def test_priority_is_capped_by_the_key(server):
    """A key without `min_priority` may not ask to be more urgent than 0 (issue 14: any client
    sent -100 and preempted another tenant's running request ~300 times)."""
    err = rpc_error(
        server.stub.Generate,
        text_request("x", priority=-100),
        metadata=auth("key-acme"),
        timeout=RPC_TIMEOUT_S,
    )
    assert err.code() == INVALID
    assert err.details().startswith("priority must be in [0, 100] for this API key")
    out = generate(server.stub, text_request("ok", max_tokens=1, priority=5))
    assert out[-1].usage.completion_tokens == 1


def test_key_file_grants_urgency():
    from pijax.serving.auth import KeyFileError, KeyStore

    store = KeyStore.from_dict({"k1": {"tenant": "a", "min_priority": -20}, "k2": {"tenant": "b"}})
    assert store.authenticate("Bearer k1").min_priority == -20
    assert store.authenticate("Bearer k2").min_priority == 0
    for bad in (-101, 101, 1.5, True, "0"):
        with pytest.raises(KeyFileError, match="min_priority must be an integer in"):
            KeyStore.from_dict({"k": {"tenant": "a", "min_priority": bad}})


# --- one session TTL, the KV-quant gate at every entry point --------------------------------------


def test_server_reports_the_engines_session_ttl(server, llm):
    ttl = llm.engine.config.cache.session_ttl_s
    info = server.stub.ModelInfo(pb.ModelInfoRequest(), metadata=auth(), timeout=RPC_TIMEOUT_S)
    assert info.session_ttl_seconds == ttl
    assert server.server.servicer.sessions.idle_timeout_s == ttl


def test_a_second_session_ttl_is_refused(llm, keys_file):
    from pijax.serving.server import InferenceServer, ServerConfig, ServerConfigError

    ttl = llm.engine.config.cache.session_ttl_s
    with pytest.raises(ServerConfigError, match="session_idle_timeout_s must be None"):
        InferenceServer(
            llm.engine, ServerConfig(api_keys_path=keys_file, session_idle_timeout_s=ttl + 1)
        )


def test_quantized_cache_needs_the_gate_in_the_engine(caplog):
    from pijax import LLM
    from pijax.quant_gate import GateError

    with pytest.raises(GateError, match="needs a passing quality-gate report"):
        LLM("tiny-random", kv_cache_dtype="int8", num_pages=8, max_model_len=64)
    with caplog.at_level(logging.WARNING, logger="pijax.quant_gate"):
        llm = LLM(
            "tiny-random",
            kv_cache_dtype="int8",
            skip_kv_quant_gate=True,
            num_pages=8,
            max_model_len=64,
            max_num_seqs=2,
            max_num_batched_tokens=16,
        )
    assert llm.engine.config.cache.kv_cache_dtype.value == "int8"
    assert any("WITHOUT a quality gate" in r.getMessage() for r in caplog.records)


def test_longest_token_bound_holds_for_a_tokenizer_json(tmp_path):
    from pijax.model.tokenizer import Tokenizer
    from pijax.testing import make_tokenizer_json

    tok = Tokenizer.from_file(make_tokenizer_json(tmp_path / "tokenizer.json"))
    bound = max_token_bytes(tok)
    assert bound >= 2
    texts = (tok.decode([i]) for i in range(tok.vocab_size))
    # (a token holding part of a UTF-8 character decodes to U+FFFD, not to its bytes)
    worst = max(len(t.encode("utf-8")) for t in texts if "\ufffd" not in t)
    assert worst <= bound
    text = "claim 4471 billed twice; " * 40
    assert len(text.encode()) / bound <= len(tok.encode(text, add_bos=False))

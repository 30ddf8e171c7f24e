"""The `pijax.v1.Inference` servicer: protos <-> engine types, nothing more.

Each RPC authenticates the caller (`auth`), validates the request (`validation`), and talks to
the engine only through the `EngineLoop` (the engine's own thread). It makes no scheduling
decision. Errors leave as `RequestError(code, message)` and become the RPC's status; every RPC's
final status code is counted in the metrics.

Generate: the request is queued on the loop (the engine's `InvalidRequestError` and
`OverloadedError` come back at once as INVALID_ARGUMENT / RESOURCE_EXHAUSTED), then deltas arrive
on an asyncio queue and are streamed; deltas that piled up while the client was slow are merged
into one message. If the client goes away (cancel, deadline) the handler is cancelled and the
request aborted, which the loop applies before its next step. While draining, new requests get
UNAVAILABLE and, after the grace period, so do the ones still running.

Engine features from the scheduler issue (trusted prefixes, sessions' KV, the audit log) are
used when the engine has them and answer UNIMPLEMENTED, saying so, when it does not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import secrets
import threading

import grpc

from pijax.request import (
    FinishReason,
    OverloadedError,
    PromptSegment,
    Scope,
    ScopeKind,
)
from pijax.serving.admission import TenantGate
from pijax.serving.auth import Authenticator, AuthError, Principal
from pijax.serving.engine_loop import AsyncioSink, EngineFailure, EngineLoop, EngineRequest
from pijax.serving.metrics import ServingMetrics
from pijax.serving.proto.pijax.v1 import inference_pb2 as pb
from pijax.serving.proto.pijax.v1 import inference_pb2_grpc as pb_grpc
from pijax.serving.sessions import SessionExists, SessionNotFound, SessionRegistry, TooManySessions
from pijax.serving.validation import (
    ModelLimits,
    RequestError,
    RequestLimits,
    ValidGenerate,
    check_text_size,
    invalid,
    max_token_bytes,
    validate_generate,
    validate_zone,
)
from pijax.structured import SchemaCompiler, SchemaError
from pijax.structured_limits import CompileCancelled

log = logging.getLogger(__name__)

FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
DEFAULT_AUDIT_LIMIT = 1000
MAX_AUDIT_LIMIT = 10000
# Tokenizing runs on this many threads (never on the event loop); each tenant may hold at most
# TOKENIZE_PER_TENANT of them, with TOKENIZE_MAX_WAITING more calls queued behind.
TOKENIZE_THREADS = 2
TOKENIZE_PER_TENANT = 1
TOKENIZE_MAX_WAITING = 16
# Schema compilations: each tenant at most one at a time with a few queued behind it; the
# compiler's worker processes bound them globally (pijax.structured_limits).
COMPILE_THREADS = 8
COMPILE_PER_TENANT = 1
COMPILE_MAX_WAITING = 4
# Server-made request ids: 128 random bits behind a character client ids cannot contain.
SERVER_ID_PREFIX = "~"


class _Shutdown:
    """Put into a stream's queue when the drain grace period is over."""


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """Static facts about the engine, read once before its loop starts."""

    model: str
    architecture: str
    vocab_size: int
    max_model_len: int
    page_size: int
    kv_cache_dtype: str
    mesh_shape: tuple[int, ...]
    mesh_axes: tuple[str, ...]
    num_pages: int
    max_num_seqs: int
    eos_token_ids: tuple[int, ...]
    max_token_bytes: int = 64

    @classmethod
    def from_engine(cls, engine, model: str) -> EngineInfo:
        mc, cfg = engine.model_config, engine.config
        eos = getattr(engine.model, "eos_token_ids", None) or engine.tokenizer.eos_token_ids
        return cls(
            model=model,
            architecture=mc.architecture,
            vocab_size=mc.vocab_size,
            max_model_len=engine.max_model_len,
            page_size=cfg.cache.page_size,
            kv_cache_dtype=cfg.cache.kv_cache_dtype.value,
            mesh_shape=tuple(int(x) for x in engine.mesh.shape.values()),
            mesh_axes=tuple(str(a) for a in engine.mesh.shape.keys()),
            num_pages=engine.blocks.num_usable_pages,
            max_num_seqs=cfg.scheduler.max_num_seqs,
            eos_token_ids=tuple(int(t) for t in eos),
            max_token_bytes=max_token_bytes(engine.tokenizer),
        )

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits(
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            max_token_bytes=self.max_token_bytes,
        )


class ServingState:
    """Mutable server-wide state the servicer reads: readiness, draining, known zones."""

    def __init__(self, static_zones: frozenset[str] = frozenset()):
        self.ready = False
        self.draining = False
        self._zones = set(static_zones)

    @property
    def known_zones(self) -> frozenset[str]:
        return frozenset(self._zones)

    def add_zone(self, zone: str) -> None:
        self._zones.add(zone)


def _rpc(method: str, streaming: bool = False):
    """Maps `RequestError` to the RPC's status and counts every RPC's final status code."""

    def decorate(fn):
        if streaming:

            @functools.wraps(fn)
            async def stream(self, request, context):
                code = grpc.StatusCode.OK
                try:
                    async for item in fn(self, request, context):
                        yield item
                except RequestError as e:
                    code = e.code
                    await context.abort(e.code, e.message)
                except asyncio.CancelledError:
                    code = _cancel_code(context)
                    raise
                except Exception:
                    code = grpc.StatusCode.UNKNOWN
                    log.exception("%s failed", method)
                    raise
                finally:
                    self.metrics.count_rpc(method, code.name)

            return stream

        @functools.wraps(fn)
        async def unary(self, request, context):
            code = grpc.StatusCode.OK
            try:
                return await fn(self, request, context)
            except RequestError as e:
                code = e.code
                await context.abort(e.code, e.message)
            except asyncio.CancelledError:
                code = _cancel_code(context)
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN
                log.exception("%s failed", method)
                raise
            finally:
                self.metrics.count_rpc(method, code.name)

        return unary

    return decorate


def _cancel_code(context) -> grpc.StatusCode:
    remaining = context.time_remaining()
    return (
        grpc.StatusCode.DEADLINE_EXCEEDED
        if remaining is not None and remaining <= 0
        else grpc.StatusCode.CANCELLED
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(
        self,
        loop: EngineLoop,
        info: EngineInfo,
        tokenizer,
        authenticator: Authenticator,
        compiler: SchemaCompiler | None,
        metrics: ServingMetrics,
        state: ServingState,
        limits: RequestLimits | None = None,
        sessions: SessionRegistry | None = None,
    ):
        self.loop = loop
        self.info = info
        self.tokenizer = tokenizer
        self.auth = authenticator
        self.compiler = compiler
        self.metrics = metrics
        self.state = state
        self.limits = limits or RequestLimits()
        self.sessions = sessions or SessionRegistry()
        self._inflight: dict[str, asyncio.Queue] = {}
        self._prep_pool = concurrent.futures.ThreadPoolExecutor(
            TOKENIZE_THREADS, thread_name_prefix="pijax-tokenize"
        )
        self._tokenize_gate = TenantGate("tokenizing", TOKENIZE_PER_TENANT, TOKENIZE_MAX_WAITING)
        self._compile_pool = concurrent.futures.ThreadPoolExecutor(
            COMPILE_THREADS, thread_name_prefix="pijax-compile"
        )
        self._compile_gate = TenantGate(
            "schema compilation", COMPILE_PER_TENANT, COMPILE_MAX_WAITING
        )

    # --- shared ---------------------------------------------------------------------------------

    def authenticate(self, context) -> Principal:
        """The caller, from exactly one `authorization` metadata entry (UNAUTHENTICATED
        otherwise: missing, repeated, malformed or unknown)."""
        values = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
        if len(values) > 1:
            raise RequestError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"send exactly one 'authorization' metadata entry; got {len(values)}",
            )
        try:
            return self.auth.authenticate(values[0] if values else None)
        except AuthError as e:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None

    def _principal(self, context, admin: bool = False) -> Principal:
        principal = self.authenticate(context)
        if admin and not principal.admin:
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, "this RPC needs an admin API key")
        return principal

    def _engine_feature(self, name: str, what: str):
        if not callable(getattr(self.loop.engine, name, None)):
            raise RequestError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{what} is not available: this engine build has no {name}()",
            )

    async def _tokenizing(self, tenant: str, fn, *args):
        """`fn(*args)` on the tokenizer threads, under the tenant's cap."""
        async with self._tokenize_gate.slot(tenant):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._prep_pool, functools.partial(fn, *args))

    async def _on_engine(self, fn):
        try:
            return await asyncio.wrap_future(self.loop.call(fn))
        except EngineFailure as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def close(self) -> None:
        self._prep_pool.shutdown(wait=False, cancel_futures=True)
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        sandbox = getattr(self.compiler, "sandbox", None)
        if sandbox is not None:
            sandbox.close()  # compilations still running die with the server

    def cancel_inflight(self) -> int:
        """Drain's last step: end every stream still running with UNAVAILABLE."""
        for q in self._inflight.values():
            q.put_nowait(_Shutdown())
        return len(self._inflight)

    # --- Generate -------------------------------------------------------------------------------

    @_rpc("Generate", streaming=True)
    async def Generate(self, request, context):
        principal = self._principal(context)
        if not self.state.ready or self.state.draining:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                "server is draining"
                if self.state.draining
                else "server is warming up; retry shortly",
            )
        v = await self._tokenizing(
            principal.tenant,
            validate_generate,
            request,
            principal,
            self.state.known_zones,
            self.tokenizer,
            self.info.limits,
            self.limits,
        )
        constraint = await self._constraint(principal.tenant, v)
        request_id = v.request_id or SERVER_ID_PREFIX + secrets.token_hex(16)
        engine_id = f"{principal.tenant}/{request_id}"
        if engine_id in self._inflight:
            raise RequestError(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already in flight"
            )
        session_id, opened = self._session(principal, v)
        q: asyncio.Queue = asyncio.Queue()
        self._inflight[engine_id] = q
        finished = False
        try:
            await self._submit(
                EngineRequest(
                    request_id=engine_id,
                    prompt=_engine_segments(v, session_id),
                    params=v.params,
                    priority=v.priority,
                    tenant=principal.tenant,
                    session_id=session_id or None,
                    permitted_zones=principal.permitted_zones(self.state.known_zones),
                    constraint=constraint,
                ),
                q,
            )
            first = True
            while not finished:
                items = [await q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                response, finished = self._merge(request_id, items, v.params.logprobs)
                if session_id and (first or finished):
                    response.session_id = session_id
                first = False
                yield response
        except BaseException:
            if opened and not finished and self.sessions.is_open(principal.tenant, session_id):
                self.sessions.close(principal.tenant, session_id)
            raise
        finally:
            self._inflight.pop(engine_id, None)
            if not finished:
                self.loop.abort(engine_id)

    async def _constraint(self, tenant: str, v: ValidGenerate):
        if not v.json_schema:
            return None
        if self.compiler is None:
            raise RequestError(
                grpc.StatusCode.UNIMPLEMENTED,
                "structured output is not available for this model's tokenizer",
            )
        cancel = threading.Event()  # the client went away: kill the compilation
        try:
            async with self._compile_gate.slot(tenant):
                loop = asyncio.get_running_loop()
                compiled = await loop.run_in_executor(
                    self._compile_pool, self.compiler.compile, v.json_schema, cancel
                )
        except SchemaError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"json_schema {e}") from None
        except CompileCancelled:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE, "json_schema compilation was cancelled"
            ) from None
        except BaseException:
            cancel.set()
            raise
        return compiled.new_constraint()

    def _session(self, principal: Principal, v: ValidGenerate) -> tuple[str, bool]:
        """(session id or '', whether this request opened it)."""
        tenant = principal.tenant
        if v.start_session:
            try:
                return self.sessions.open(tenant, v.session_id), True
            except SessionExists:
                raise RequestError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"session_id {v.session_id!r} is already open; continue it "
                    "without start_session",
                ) from None
            except TooManySessions as e:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        if v.session_id:
            try:
                self.sessions.touch(tenant, v.session_id)
            except SessionNotFound:
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND, f"session_id {v.session_id!r} not found"
                ) from None
            return v.session_id, False
        return "", False

    async def _submit(self, request: EngineRequest, q: asyncio.Queue) -> None:
        sink = AsyncioSink(asyncio.get_running_loop(), q)
        try:
            await asyncio.wrap_future(self.loop.submit(request, sink))
        except OverloadedError as e:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded, retry later: {e}"
            ) from None
        except ValueError as e:  # InvalidRequestError, or a scope the engine refuses
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except EngineFailure as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None

    def _merge(self, request_id: str, items: list, logprobs: bool):
        response = pb.GenerateResponse(request_id=request_id)
        texts = []
        for item in items:
            if isinstance(item, _Shutdown):
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE, "server shut down before the request finished"
                )
            if isinstance(item, EngineFailure):
                raise RequestError(grpc.StatusCode.UNAVAILABLE, str(item))
            texts.append(item.new_text)
            response.token_ids.extend(item.new_token_ids)
            if logprobs and item.logprobs:
                response.logprobs.extend(
                    item.logprobs[len(item.logprobs) - len(item.new_token_ids) :]
                )
            if item.finished:
                response.text = "".join(texts)
                _finish(response, item)
                return response, True
        response.text = "".join(texts)
        return response, False

    # --- small RPCs -----------------------------------------------------------------------------

    @_rpc("Tokenize")
    async def Tokenize(self, request, context):
        principal = self._principal(context)
        check_text_size("text", request.text, self.info.limits)
        add_bos = request.add_bos if request.HasField("add_bos") else None
        try:
            ids = await self._tokenizing(
                principal.tenant, self.tokenizer.encode, request.text, add_bos
            )
        except ValueError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"add_bos: {e}") from None
        return pb.TokenizeResponse(token_ids=ids)

    @_rpc("ModelInfo")
    async def ModelInfo(self, request, context):
        principal = self._principal(context)
        i = self.info
        return pb.ModelInfoResponse(
            model=i.model,
            architecture=i.architecture,
            vocab_size=i.vocab_size,
            context_length=i.max_model_len,
            page_size=i.page_size,
            kv_cache_dtype=i.kv_cache_dtype,
            mesh_shape=i.mesh_shape,
            mesh_axes=i.mesh_axes,
            num_pages=i.num_pages,
            max_num_seqs=i.max_num_seqs,
            eos_token_ids=i.eos_token_ids,
            tenant=principal.tenant,
            permitted_zones=sorted(principal.permitted_zones(self.state.known_zones)),
            admin=principal.admin,
            session_ttl_seconds=self.sessions.idle_timeout_s,
        )

    @_rpc("EndSession")
    async def EndSession(self, request, context):
        principal = self._principal(context)
        sid = request.session_id
        try:
            self.sessions.close(principal.tenant, sid)
        except SessionNotFound:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"session_id {sid!r} not found") from None
        if callable(getattr(self.loop.engine, "end_session", None)):
            await self._on_engine(lambda e: e.end_session(principal.tenant, sid))
        return pb.EndSessionResponse()

    @_rpc("RegisterTrustedPrefix")
    async def RegisterTrustedPrefix(self, request, context):
        principal = self._principal(context, admin=True)
        zone = validate_zone("zone", request.zone)
        kind = request.WhichOneof("content")
        if kind == "text" and request.text:
            check_text_size("text", request.text, self.info.limits)
            ids = await self._tokenizing(principal.tenant, self.tokenizer.encode, request.text)
        elif kind == "token_ids" and request.token_ids.ids:
            if len(request.token_ids.ids) >= self.info.max_model_len:
                raise invalid(
                    "content",
                    f"shorter than max_model_len={self.info.max_model_len} tokens",
                    f"{len(request.token_ids.ids)} tokens",
                )
            ids = list(request.token_ids.ids)
            bad = [t for t in ids if t >= self.info.vocab_size]
            if bad:
                raise invalid("token_ids", f"token ids in [0, {self.info.vocab_size})", bad[:5])
        else:
            raise invalid("content", "non-empty text or token_ids", kind or "neither")
        if len(ids) >= self.info.max_model_len:
            raise invalid(
                "content",
                f"shorter than max_model_len={self.info.max_model_len} tokens",
                f"{len(ids)} tokens",
            )
        self._engine_feature("register_trusted_prefix", "RegisterTrustedPrefix")
        try:
            await self._on_engine(lambda e: e.register_trusted_prefix(zone, ids, source="rpc"))
        except ValueError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        self.state.add_zone(zone)
        log.info("registered a %d-token trusted prefix for zone %r", len(ids), zone)
        return pb.RegisterTrustedPrefixResponse(zone=zone, num_tokens=len(ids))

    @_rpc("ReadAuditLog")
    async def ReadAuditLog(self, request, context):
        self._principal(context, admin=True)
        limit = request.limit or DEFAULT_AUDIT_LIMIT
        if limit > MAX_AUDIT_LIMIT:
            raise invalid("limit", f"in [0, {MAX_AUDIT_LIMIT}] (0 = {DEFAULT_AUDIT_LIMIT})", limit)
        if not math.isfinite(request.since_unix_seconds):
            raise invalid(
                "since_unix_seconds", "a finite number (0 = any)", request.since_unix_seconds
            )
        paging = request.HasField("after_seq")
        if paging and request.after_seq < -1:
            raise invalid("after_seq", "an integer >= -1 (-1 = from the start)", request.after_seq)
        self._engine_feature("read_audit_log", "ReadAuditLog")
        # The engine's reader filters what it can (so it copies less); we filter again, exactly.
        filters = {
            "tenant": request.tenant or None,
            "zone": request.zone or None,
            "kind": request.event or None,
            "since": request.since_unix_seconds or None,
            "after_seq": request.after_seq if paging else None,
            "limit": limit if paging and not request.request_id else None,
        }
        filters = {k: v for k, v in filters.items() if v is not None}
        # The audit log is thread-safe and may read its file: off the engine's thread.
        records = await asyncio.to_thread(self.loop.engine.read_audit_log, **filters)
        out = [r for r in map(_audit_record, records) if _audit_match(r, request)]
        return pb.ReadAuditLogResponse(records=out[:limit] if paging else out[-limit:])


# --- conversions ----------------------------------------------------------------------------------


def _engine_segments(v: ValidGenerate, session_id: str) -> list[PromptSegment]:
    segs = []
    for ids, scope in v.segments:
        if scope.kind is ScopeKind.SESSION:
            scope = Scope(ScopeKind.SESSION, session_id)
        segs.append(PromptSegment(content=ids, scope=scope))
    return segs


def _finish(response, out) -> None:
    response.finish_reason = FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
    response.usage.prompt_tokens = out.num_prompt_tokens
    response.usage.cached_prompt_tokens = out.num_cached_tokens
    response.usage.completion_tokens = len(out.token_ids)
    t = out.timings
    if t is not None:
        response.timings.queue_seconds = t.queue_time or 0.0
        response.timings.time_to_first_token_seconds = t.ttft or 0.0
        response.timings.time_per_output_token_seconds = t.tpot or 0.0
        response.timings.total_seconds = t.e2e or 0.0


_AUDIT_KEYS = {  # proto field -> the engine record keys that may hold it
    "event": ("event", "kind", "type"),
    "request_id": ("request_id",),
    "tenant": ("tenant",),
    "scope": ("scope",),
    "zone": ("zone",),
    "num_blocks": ("num_blocks", "blocks", "blocks_reused"),
    "num_tokens": ("num_tokens", "tokens", "tokens_reused"),
}


def _audit_record(record) -> pb.AuditRecord:
    d = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(record)
    r = pb.AuditRecord(json=json.dumps(d, sort_keys=True, default=str))
    if isinstance(d.get("seq"), int):
        r.seq = d["seq"]
    for field, keys in _AUDIT_KEYS.items():
        value = next((d[k] for k in keys if d.get(k) is not None), None)
        if value is not None:
            setattr(r, field, int(value) if field.startswith("num_") else str(value))
    t = d.get("time", d.get("timestamp"))
    if isinstance(t, (int, float)):
        r.time_unix_seconds = float(t)
    r.block_hashes.extend(str(h) for h in d.get("block_hashes") or ())
    return r


def _audit_match(r: pb.AuditRecord, q) -> bool:
    return (
        (not q.tenant or r.tenant == q.tenant)
        and (not q.zone or r.zone == q.zone)
        and (not q.request_id or q.request_id in (r.request_id, r.request_id.partition("/")[2]))
        and (not q.event or r.event == q.event)
        and (not q.since_unix_seconds or r.time_unix_seconds >= q.since_unix_seconds)
    )

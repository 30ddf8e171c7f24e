"""OpenAI-compatible HTTP API, in the gRPC server's process and on its engine loop.

    api = HttpApi(server, chat_template=ChatTemplate.from_dir(model_dir))   # server: InferenceServer
    port = await api.start("127.0.0.1", 8000)     # before server.start(): /health says 503 meanwhile
    ...
    await api.stop()                              # after server.drain()

One engine, two front ends. Every generation goes through `InferenceServicer.Generate` itself:
the JSON body is checked against OpenAI's schema (an unsupported field or value is a 400 naming
it), turned into a `pijax.v1.GenerateRequest`, and handed to the servicer with a small call
context that carries the `Authorization` header. So authentication (the same API-key file),
validation, trust-zone policy, sessions, structured output (the same llguidance compiler), the
in-flight table that draining waits for, the engine loop and the metrics are the gRPC service's
own; this module only translates. `/tokenize` and `/v1/models` likewise go through the
servicer's `Tokenize` and `ModelInfo`.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (server-sent
events with `stream: true`, ending `data: [DONE]`), `GET /health` (200 serving; 503 while warming
up or draining), `GET /metrics` (the server's Prometheus registry), `POST /tokenize`,
`POST /detokenize`, and `DELETE /v1/sessions/{id}` (gRPC's EndSession).

pijax's own fields travel in an extension object, `"pijax": {...}` (with the `openai` client:
`extra_body={"pijax": {...}}`):
  * `segments`: `[{"text" | "token_ids": ..., "scope": "shared:policy"}, ...]` (completions):
    prompt segments placed before `prompt`, each with its cache scope;
  * `message_scopes`: `["shared:policy", ...]` (chat): the scope of each message's rendered text
    (the first also covers what the template writes before it); messages past the list, and the
    generation prompt, take the request's scope;
  * `scope`: the scope of the rest of the prompt;
  * `session_id`, `start_session`, `priority`, `top_k`, `ignore_eos`, `stop_token_ids`: as in
    gRPC's `GenerateRequest`. A session's id comes back as `"pijax": {"session_id": ...}`;
  * `return_token_ids`: each choice (and each streamed delta) also carries its `token_ids`.
Scopes: a plain OpenAI request is computed under the `private` scope: nothing it sends is
reusable by anyone else. A session request defaults to `session`. The operator may give tenants
another default (`default_scopes={"acme": "tenant"}`, `"*"` for every tenant; `scripts/serve.py
--http_default_scope acme=tenant`); only `private` and `tenant` are allowed there.

Errors are OpenAI error objects (`{"error": {"message", "type", "param", "code"}}`) with the
status of the servicer's code: 400 invalid, 401 unauthenticated, 403 permission denied, 404
unknown model or session, 409 already exists, 413 body too large, 429 overloaded (with
`Retry-After`), 503 warming up or draining. A client that disconnects mid-stream has its engine
requests aborted; their pages are free before the engine's next step.

Sampling over HTTP: `n` choices are `n` engine requests; with a `seed`, choice `i` uses
`seed + i`, so the same request and seed give the same choices. `logprobs` returns each sampled
token's log-probability (`0` for completions, `top_logprobs: 0` for chat): the engine computes
no alternatives, so asking for them is a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import secrets
import socket
import time
from collections.abc import Mapping

import anyio
import grpc
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pijax.serving.auth import AuthError
from pijax.serving.proto.pijax.v1 import inference_pb2 as pb
from pijax.serving.validation import RequestError

log = logging.getLogger(__name__)

MAX_N = 16
RETRY_AFTER_S = 1
DEFAULT_MAX_BODY_BYTES = 32 << 20
DEFAULT_SCOPES_ALLOWED = ("private", "tenant")
FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
}
# Neutral values of OpenAI fields the engine has no use for: accepted, anything else is a 400.
NEUTRAL = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "suffix": ("",),
    "best_of": (1,),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),
    "store": (False,),
}
COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
    "pijax",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "response_format",
}
PIJAX_FIELDS = {
    "return_token_ids",
    "segments",
    "message_scopes",
    "scope",
    "session_id",
    "start_session",
    "priority",
    "top_k",
    "ignore_eos",
    "stop_token_ids",
}
# Field names of validation messages (proto names) -> OpenAI's, for the rare error only the
# servicer's validation catches.
_PROTO_FIELDS = [
    (re.compile(r"^sampling\.(temperature|top_p|seed)\b"), r"\1"),
    (re.compile(r"^sampling\.top_k\b"), "pijax.top_k"),
    (re.compile(r"^sampling: "), ""),
    (re.compile(r"^(priority|session_id|stop_token_ids|ignore_eos)\b"), r"pijax.\1"),
    (re.compile(r"^json_schema\b"), "response_format.json_schema.schema"),
]


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def bad(field: str, allowed: str, got) -> HttpError:
    return HttpError(400, f"{field} must be {allowed}; got {_short(got)!r}", field)


def _short(value):
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


class _CallContext:
    """What `InferenceServicer` reads of a gRPC call context: the caller's metadata, abort, and
    the deadline (HTTP calls have none)."""

    def __init__(self, authorization: str | None):
        self._metadata = (("authorization", authorization),) if authorization else ()

    def invocation_metadata(self):
        return self._metadata

    async def abort(self, code, message):
        raise RequestError(code, message)

    def time_remaining(self):
        return None


class _NoSignals(uvicorn.Server):
    """uvicorn inside a process whose signals belong to `scripts/serve.py` (drain on SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpApi:
    def __init__(
        self,
        server,
        *,
        chat_template=None,
        default_scopes: Mapping[str, str] | None = None,
        max_body_bytes: int | None = None,
    ):
        self.server = server
        self.servicer = server.servicer
        self.tokenizer = server.engine.tokenizer
        self.chat_template = chat_template
        self.default_scopes = dict(default_scopes or {})
        for tenant, scope in self.default_scopes.items():
            if scope not in DEFAULT_SCOPES_ALLOWED:
                raise ValueError(
                    f"default scope of tenant {tenant!r} must be one of "
                    f"{DEFAULT_SCOPES_ALLOWED}; got {scope!r}"
                )
        wire = getattr(server, "max_message_bytes", None)
        self.max_body_bytes = max_body_bytes or (8 * wire if wire else DEFAULT_MAX_BODY_BYTES)
        self.created = int(time.time())
        self.requests = getattr(server.metrics, "http_requests", None)
        if self.requests is None:  # one per registry, however many front ends a server gets
            self.requests = server.metrics.http_requests = Counter(
                "pijax:http_requests",
                "HTTP API requests by route and status code.",
                ["model_name", "route", "status"],
                registry=server.metrics.registry,
            )
        routes = [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/v1/sessions/{session_id}", self.end_session, methods=["DELETE"]),
        ]
        self.app = Starlette(routes=routes)
        self._uvicorn: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    @property
    def model_name(self) -> str:
        return self.servicer.info.model or "default"

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 8000) -> int:
        """Listen on `host:port` (0: a free port) on the running event loop; returns the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._uvicorn = _NoSignals(config)
        self._task = asyncio.ensure_future(self._uvicorn.serve(sockets=[sock]))
        for _ in range(500):
            if self._uvicorn.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises why it could not start
        log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._uvicorn is None or self._task is None:
            return
        self._uvicorn.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        if not self._task.done():
            self._uvicorn.force_exit = True
            self._task.cancel()

    # --- plumbing -------------------------------------------------------------------------------

    def _count(self, route: str, status: int) -> None:
        self.requests.labels(model_name=self.model_name, route=route, status=str(status)).inc()

    def _error(self, route: str, e: HttpError) -> JSONResponse:
        self._count(route, e.status)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status in (429, 503) else None
        body = {
            "error": {
                "message": e.message,
                "type": ERROR_TYPE.get(e.status, "server_error"),
                "param": e.param,
                "code": e.status,
            }
        }
        return JSONResponse(body, status_code=e.status, headers=headers)

    async def _handle(self, route: str, request: Request, fn):
        try:
            response = await fn(request)
        except HttpError as e:
            return self._error(route, e)
        except RequestError as e:
            return self._error(route, _from_request_error(e))
        except Exception:
            log.exception("%s failed", route)
            return self._error(route, HttpError(500, "internal error"))
        self._count(route, response.status_code)
        return response

    def _authenticate(self, request: Request):
        try:
            return self.servicer.auth.authenticate(request.headers.get("authorization"))
        except AuthError as e:
            raise HttpError(401, str(e).replace("metadata", "header")) from None

    def _context(self, request: Request) -> _CallContext:
        return _CallContext(request.headers.get("authorization"))

    async def _json(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise HttpError(413, f"request body must be at most {self.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise HttpError(413, f"request body must be at most {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HttpError(400, f"request body must be a JSON object: {e}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "request body must be a JSON object")
        return {k: v for k, v in body.items() if v is not None}

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad("model", f"the served model's name ({self.model_name!r})", model)
        if model != self.model_name:
            raise HttpError(
                404, f"model {model!r} does not exist; this server serves {self.model_name!r}"
            )

    def _check_ready(self) -> None:
        state = self.servicer.state
        if state.draining:
            raise HttpError(503, "server is draining")
        if not state.ready:
            raise HttpError(503, "server is warming up; retry shortly")

    # --- small endpoints ------------------------------------------------------------------------

    async def health(self, request: Request):
        state = self.servicer.state
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "warming_up"}, status_code=503)
        return JSONResponse({"status": "serving"})

    async def metrics(self, request: Request):
        data = await asyncio.to_thread(generate_latest, self.server.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request):
        async def run(request):
            self._authenticate(request)
            info = await self.servicer.ModelInfo(pb.ModelInfoRequest(), self._context(request))
            card = {
                "id": self.model_name,
                "object": "model",
                "created": self.created,
                "owned_by": "pijax",
                "root": self.model_name,
                "max_model_len": info.context_length,
            }
            return JSONResponse({"object": "list", "data": [card]})

        return await self._handle("/v1/models", request, run)

    async def tokenize(self, request: Request):
        async def run(request):
            self._authenticate(request)
            body = await self._json(request)
            _only(
                body, {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"}
            )
            if "model" in body:
                self._check_model(body)
            if ("prompt" in body) == ("messages" in body):
                raise bad("prompt", "given, or messages given (exactly one)", "both or neither")
            if "messages" in body:
                agp = _bool(body, "add_generation_prompt", True)
                ids = await asyncio.to_thread(self._chat_ids, body["messages"], agp)
            else:
                prompt = body["prompt"]
                if not isinstance(prompt, str):
                    raise bad("prompt", "a string", prompt)
                tok = pb.TokenizeRequest(text=prompt)
                if "add_special_tokens" in body:
                    tok.add_bos = _bool(body, "add_special_tokens", True)
                ids = list((await self.servicer.Tokenize(tok, self._context(request))).token_ids)
            return JSONResponse(
                {
                    "count": len(ids),
                    "max_model_len": self.servicer.info.max_model_len,
                    "tokens": ids,
                }
            )

        return await self._handle("/tokenize", request, run)

    async def detokenize(self, request: Request):
        async def run(request):
            self._authenticate(request)
            body = await self._json(request)
            _only(body, {"model", "tokens"})
            if "model" in body:
                self._check_model(body)
            ids = self._token_ids("tokens", body.get("tokens"))
            text = await asyncio.to_thread(self.tokenizer.decode, ids)
            return JSONResponse({"prompt": text})

        return await self._handle("/detokenize", request, run)

    async def end_session(self, request: Request):
        """`DELETE /v1/sessions/{id}`: gRPC's EndSession (frees the session's KV pages)."""

        async def run(request):
            self._authenticate(request)
            sid = request.path_params["session_id"]
            await self.servicer.EndSession(
                pb.EndSessionRequest(session_id=sid), self._context(request)
            )
            return JSONResponse({"id": sid, "object": "session", "deleted": True})

        return await self._handle("/v1/sessions", request, run)

    # --- completions ----------------------------------------------------------------------------

    async def completions(self, request: Request):
        return await self._handle("/v1/completions", request, self._completions)

    async def _completions(self, request: Request):
        principal = self._authenticate(request)
        body = await self._json(request)
        _only(body, COMPLETION_FIELDS)
        self._check_model(body)
        self._check_ready()
        ext = _extension(body)
        if "message_scopes" in ext:
            raise bad("pijax.message_scopes", "absent on completions (chat only)", "given")
        logprobs = body.get("logprobs")
        if logprobs is not None and (_not_int(logprobs) or logprobs != 0):
            raise bad(
                "logprobs",
                "0 or null (the sampled tokens' log-probabilities; the engine computes no "
                "alternatives)",
                logprobs,
            )
        echo = _bool(body, "echo", False)
        if echo and logprobs is not None:
            raise bad("echo", "false when logprobs is set (no prompt log-probabilities)", echo)
        prompts = self._prompts(body.get("prompt"))
        scope = self._scope(principal, ext)
        prefix = self._segments(ext)
        base = self._base_request(body, ext, max_tokens_field="max_tokens")
        base.logprobs = logprobs is not None
        requests, echoes = [], []
        for kind, value in prompts:
            req = pb.GenerateRequest()
            req.CopyFrom(base)
            req.prompt.extend(prefix)
            if kind == "text" and value:
                req.prompt.append(pb.PromptSegment(text=value, scope=scope))
            elif kind == "ids":
                req.prompt.append(pb.PromptSegment(token_ids=pb.TokenIds(ids=value), scope=scope))
            requests.append(req)
            echoes.append(self._echo_text(prefix, kind, value) if echo else "")
        return await self._generate(
            request, "text_completion", body, requests, echoes, _segment_fields(prefix)
        )

    def _prompts(self, prompt) -> list[tuple[str, object]]:
        if isinstance(prompt, str):
            return [("text", prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [("text", p) for p in prompt]
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return [("ids", self._token_ids("prompt", prompt))]
            if all(isinstance(p, list) for p in prompt):
                return [("ids", self._token_ids(f"prompt[{i}]", p)) for i, p in enumerate(prompt)]
        raise bad(
            "prompt",
            "a string, a list of strings, a list of token ids or a list of token-id lists",
            prompt,
        )

    def _token_ids(self, field: str, ids) -> list[int]:
        vocab = self.servicer.info.vocab_size
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        ):
            raise bad(field, "a non-empty list of token ids", ids)
        if len(ids) > self.servicer.info.max_model_len:
            raise bad(
                field,
                f"at most max_model_len={self.servicer.info.max_model_len} token ids",
                f"{len(ids)} ids",
            )
        out_of_range = [t for t in ids if not 0 <= t < vocab]
        if out_of_range:
            raise bad(field, f"token ids in [0, {vocab})", out_of_range[:5])
        return ids

    def _echo_text(self, prefix, kind: str, value) -> str:
        parts = [
            s.text if s.WhichOneof("content") == "text" else self.tokenizer.decode(s.token_ids.ids)
            for s in prefix
        ]
        parts.append(value if kind == "text" else self.tokenizer.decode(value))
        return "".join(parts)

    # --- chat -----------------------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        return await self._handle("/v1/chat/completions", request, self._chat)

    async def _chat(self, request: Request):
        principal = self._authenticate(request)
        body = await self._json(request)
        _only(body, CHAT_FIELDS)
        self._check_model(body)
        self._check_ready()
        ext = _extension(body)
        if "segments" in ext:
            raise bad("pijax.segments", "absent on chat (use pijax.message_scopes)", "given")
        logprobs = _bool(body, "logprobs", False)
        top = body.get("top_logprobs")
        if top is not None and (_not_int(top) or top != 0):
            raise bad(
                "top_logprobs",
                "0 or null (the engine computes no alternatives to the sampled token)",
                top,
            )
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise bad("max_tokens", "absent when max_completion_tokens is given", "both given")
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        scope = self._scope(principal, ext)
        message_scopes = ext.get("message_scopes", [])
        if not isinstance(message_scopes, list) or not all(
            isinstance(s, str) for s in message_scopes
        ):
            raise bad("pijax.message_scopes", "a list of scope strings", message_scopes)
        spans = await asyncio.to_thread(self._chat_spans, body.get("messages"), message_scopes)
        base = self._base_request(body, ext, max_tokens_field=field, chat=True)
        base.logprobs = logprobs
        base.json_schema = _response_format(body.get("response_format"))
        num_tokens = 0
        for i, (ids, span_scope) in enumerate(spans):
            if ids:
                num_tokens += len(ids)
                base.prompt.append(
                    pb.PromptSegment(
                        token_ids=pb.TokenIds(ids=ids),
                        scope=span_scope if i < len(message_scopes) else scope,
                    )
                )
        if not base.prompt:
            raise bad("messages", "messages the chat template renders to some text", [])
        if field not in body:  # OpenAI's default: as much as the context allows
            room = self.servicer.info.max_model_len - num_tokens
            if room < 1:
                raise bad(
                    "messages",
                    f"at most {self.servicer.info.max_model_len - 1} tokens once rendered "
                    f"(max_model_len={self.servicer.info.max_model_len})",
                    f"{num_tokens} tokens",
                )
            base.max_tokens = room
        fields = ["messages"] * len(base.prompt)
        for i in range(min(len(message_scopes), len(fields))):
            fields[i] = f"pijax.message_scopes[{i}]"
        return await self._generate(request, "chat.completion", body, [base], [""], fields)

    def _template(self):
        if self.chat_template is None:
            raise bad(
                "messages",
                "sent to a model with a chat template (this one has none: use /v1/completions, "
                "or start the server with --chat_template)",
                "messages",
            )
        return self.chat_template

    def _chat_ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        text = self._render(_messages(messages), add_generation_prompt)
        return self.tokenizer.encode(text, add_bos=False)

    def _render(self, messages, add_generation_prompt: bool) -> str:
        from pijax.model.chat_template import ChatTemplateError

        try:
            return self._template().render(messages, add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as e:
            raise HttpError(400, f"messages: {e}", "messages") from None

    def _chat_spans(self, messages, message_scopes: list[str]) -> list[tuple[list[int], str]]:
        """Token ids of the rendered chat, split after each message named in `message_scopes`
        (the template must render a conversation's prefix as a prefix of its text)."""
        messages = _messages(messages)
        if len(message_scopes) > len(messages):
            raise bad(
                "pijax.message_scopes",
                f"at most one scope per message ({len(messages)})",
                f"{len(message_scopes)} scopes",
            )
        full = self._render(messages, True)
        cuts = []
        for k in range(1, len(message_scopes) + 1):
            head = self._render(messages[:k], False)
            if not full.startswith(head):
                raise bad(
                    "pijax.message_scopes",
                    "used with a chat template that renders the first messages as a prefix "
                    "of the whole conversation (this one does not)",
                    message_scopes,
                )
            cuts.append(len(head))
        bounds = [0, *cuts, len(full)]
        spans = []
        for i in range(len(bounds) - 1):
            text = full[bounds[i] : bounds[i + 1]]
            ids = self.tokenizer.encode(text, add_bos=False) if text else []
            spans.append((ids, message_scopes[i] if i < len(message_scopes) else ""))
        return spans

    # --- shared request building ----------------------------------------------------------------

    def _scope(self, principal, ext: dict) -> str:
        if "scope" in ext:
            scope = ext["scope"]
            if not isinstance(scope, str):
                raise bad("pijax.scope", "a scope string", scope)
            return scope
        if ext.get("session_id") or ext.get("start_session"):
            return "session"
        tenant = principal.tenant
        return self.default_scopes.get(tenant, self.default_scopes.get("*", "private"))

    def _segments(self, ext: dict) -> list:
        segments = ext.get("segments", [])
        if not isinstance(segments, list):
            raise bad("pijax.segments", "a list of {text | token_ids, scope}", segments)
        out = []
        for i, seg in enumerate(segments):
            field = f"pijax.segments[{i}]"
            if not isinstance(seg, dict):
                raise bad(field, "an object {text | token_ids, scope}", seg)
            _only(seg, {"text", "token_ids", "scope"}, prefix=field + ".")
            scope = seg.get("scope", "")
            if not isinstance(scope, str):
                raise bad(f"{field}.scope", "a scope string", scope)
            if ("text" in seg) == ("token_ids" in seg):
                raise bad(field, "an object with exactly one of text, token_ids", seg)
            if "text" in seg:
                if not isinstance(seg["text"], str) or not seg["text"]:
                    raise bad(f"{field}.text", "a non-empty string", seg["text"])
                out.append(pb.PromptSegment(text=seg["text"], scope=scope))
            else:
                ids = self._token_ids(f"{field}.token_ids", seg["token_ids"])
                out.append(pb.PromptSegment(token_ids=pb.TokenIds(ids=ids), scope=scope))
        return out

    def _base_request(
        self, body: dict, ext: dict, max_tokens_field: str, chat: bool = False
    ) -> pb.GenerateRequest:
        req = pb.GenerateRequest()
        s = req.sampling
        if "temperature" in body:
            s.temperature = _number(body, "temperature", lambda x: x >= 0, ">= 0 (0 = greedy)")
        if "top_p" in body:
            s.top_p = _number(body, "top_p", lambda x: 0 < x <= 1, "in (0, 1]")
        if "seed" in body:
            s.seed = _int(body, "seed", 0, 2**32 - 1)
        if "top_k" in ext:
            s.top_k = _int(ext, "top_k", 0, self.servicer.info.vocab_size, "pijax.top_k")
        if max_tokens_field in body:
            req.max_tokens = _int(body, max_tokens_field, 1, self.servicer.info.max_model_len - 1)
        elif not chat:
            req.max_tokens = 16  # OpenAI's completions default
        stop = body.get("stop", [])
        stops = [stop] if isinstance(stop, str) else stop
        limits = self.servicer.limits
        if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
            raise bad("stop", "a non-empty string or a list of them", stop)
        if len(stops) > limits.max_stop:
            raise bad("stop", f"at most {limits.max_stop} strings", f"{len(stops)} strings")
        req.stop.extend(stops)
        if "stop_token_ids" in ext:
            req.stop_token_ids.extend(
                self._token_ids("pijax.stop_token_ids", ext["stop_token_ids"])
            )
        req.ignore_eos = _bool(ext, "ignore_eos", False, "pijax.ignore_eos")
        if "priority" in ext:
            req.priority = _int(
                ext, "priority", limits.min_priority, limits.max_priority, "pijax.priority"
            )
        if "session_id" in ext:
            if not isinstance(ext["session_id"], str):
                raise bad("pijax.session_id", "a string", ext["session_id"])
            req.session_id = ext["session_id"]
        req.start_session = _bool(ext, "start_session", False, "pijax.start_session")
        n = _int(body, "n", 1, MAX_N) if "n" in body else 1
        if n > 1 and (req.session_id or req.start_session):
            raise bad("n", "1 on a session request", n)
        if "stream_options" in body:
            opts = body["stream_options"]
            if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
                raise bad("stream_options", "{include_usage: bool}", opts)
            if not _bool(body, "stream", False):
                raise bad("stream_options", "given only with stream: true", opts)
        return req

    # --- generation -----------------------------------------------------------------------------

    async def _generate(self, request, kind, body, requests, echoes, fields):
        n = body.get("n", 1)
        seed = body.get("seed")
        jobs = []  # (choice index, prompt index, GenerateRequest)
        for p, base in enumerate(requests):
            for j in range(n):
                req = pb.GenerateRequest()
                req.CopyFrom(base)
                if seed is not None:
                    req.sampling.seed = (seed + j) % 2**32
                jobs.append((p * n + j, p, req))
        run = _Choices(self.servicer, self._context(request), jobs, fields)
        stream = _bool(body, "stream", False)
        try:
            first = await _unless_disconnected(request, run.first_event())
        except BaseException:
            await run.cancel()
            raise
        meta = {
            "id": ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + secrets.token_hex(12),
            "created": int(time.time()),
            "model": self.model_name,
        }
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            ids = _bool(body.get("pijax", {}), "return_token_ids", False, "pijax.return_token_ids")
            chunks = self._stream(kind, meta, run, first, echoes, n, include_usage, ids)
            return _SseResponse(chunks, media_type="text/event-stream", headers=_SSE_HEADERS)
        try:
            outcome = await _unless_disconnected(request, run.collect(first))
        finally:
            await run.cancel()
        ids = _bool(body.get("pijax", {}), "return_token_ids", False, "pijax.return_token_ids")
        return JSONResponse(self._response(kind, meta, outcome, echoes, n, ids))

    def _response(self, kind, meta, outcome, echoes, n, token_ids: bool = False) -> dict:
        choices = []
        for index in sorted(outcome):
            c = outcome[index]
            text = echoes[index // n] + c.text
            choice = {"index": index, "finish_reason": c.finish_reason}
            if kind == "chat.completion":
                choice["message"] = {"role": "assistant", "content": text}
                choice["logprobs"] = self._chat_logprobs(c) if c.want_logprobs else None
            else:
                choice["text"] = text
                choice["logprobs"] = self._completion_logprobs(c, 0) if c.want_logprobs else None
            if token_ids:
                choice["token_ids"] = list(c.token_ids)
            choices.append(choice)
        body = {
            **meta,
            "object": kind,
            "choices": choices,
            "usage": _usage(outcome, n),
            "system_fingerprint": None,
        }
        sessions = {c.session_id for c in outcome.values() if c.session_id}
        if sessions:
            body["pijax"] = {"session_id": sessions.pop()}
        return body

    async def _stream(self, kind, meta, run, first, echoes, n, include_usage, token_ids=False):
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        started: set[int] = set()
        offsets: dict[int, int] = {}
        session_id = ""

        def chunk(choices, **extra):
            return _sse({**meta, "object": chunk_kind, "choices": choices, **extra})

        try:
            event = first
            while event is not None:
                index, choice, response = event
                session_id = session_id or response.session_id
                delta_text = response.text
                if index not in started:
                    started.add(index)
                    if kind == "chat.completion":
                        yield chunk(
                            [
                                {
                                    "index": index,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    else:
                        delta_text = echoes[index // n] + delta_text
                finish = FINISH.get(response.finish_reason) if choice.done else None
                item = {"index": index, "finish_reason": finish}
                if kind == "chat.completion":
                    item["delta"] = {"content": response.text} if response.text else {}
                    item["logprobs"] = (
                        self._chat_logprobs(response) if choice.want_logprobs else None
                    )
                else:
                    item["text"] = delta_text
                    item["logprobs"] = (
                        self._completion_logprobs(response, offsets.get(index, 0))
                        if choice.want_logprobs
                        else None
                    )
                    offsets[index] = offsets.get(index, 0) + len(delta_text)
                if token_ids:
                    item["token_ids"] = list(response.token_ids)
                if delta_text or response.token_ids or finish:
                    extra = {"pijax": {"session_id": session_id}} if session_id else {}
                    yield chunk([item], **extra)
                event = await run.next_event()
            if include_usage:
                yield chunk([], usage=_usage(run.choices, n))
        except RequestError as e:
            err = _from_request_error(e)
            yield _sse({"error": {"message": err.message, "type": ERROR_TYPE.get(err.status)}})
        finally:
            await run.cancel()
        yield b"data: [DONE]\n\n"

    def _completion_logprobs(self, c, offset: int) -> dict:
        tokens = [self.tokenizer.decode([t], skip_special_tokens=False) for t in c.token_ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        lps = [float(x) for x in c.logprobs]
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, lps, strict=False)],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, c) -> dict:
        content = []
        for t, lp in zip(c.token_ids, c.logprobs, strict=False):
            token = self.tokenizer.decode([t], skip_special_tokens=False)
            content.append(
                {
                    "token": token,
                    "logprob": float(lp),
                    "bytes": list(token.encode("utf-8")),
                    "top_logprobs": [],
                }
            )
        return {"content": content}


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _SseResponse(StreamingResponse):
    """Watches for the client going away whatever ASGI version the server speaks (Starlette
    stops watching from ASGI 2.4 on, relying on a failed send, which never comes while a request
    waits for its first token): a disconnect cancels the body iterator, whose cleanup aborts the
    engine requests."""

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def run_then_cancel(fn) -> None:
                await fn()
                group.cancel_scope.cancel()

            group.start_soon(run_then_cancel, functools.partial(self.stream_response, send))
            await run_then_cancel(functools.partial(self.listen_for_disconnect, receive))


class _Choice:
    def __init__(self, want_logprobs: bool):
        self.want_logprobs = want_logprobs
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.done = False
        self.session_id = ""
        self.usage = None


class _Choices:
    """`n` x prompts concurrent `Generate` calls, their responses merged into one event queue."""

    def __init__(self, servicer, context, jobs, fields):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._fields = fields
        self.choices = {index: _Choice(req.logprobs) for index, _, req in jobs}
        self._tasks = [
            asyncio.ensure_future(self._run(servicer, context, index, req))
            for index, _, req in jobs
        ]
        self._remaining = len(jobs)

    async def _run(self, servicer, context, index, req):
        gen = servicer.Generate(req, context)
        try:
            async for response in gen:
                self._queue.put_nowait((index, response))
            self._queue.put_nowait((index, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._queue.put_nowait((index, e))
        finally:
            await gen.aclose()

    async def next_event(self):
        """(index, choice, response) with the choice updated, or None once every choice is
        done; raises the first error (as `RequestError`)."""
        while self._remaining:
            index, item = await self._queue.get()
            if item is None:
                self._remaining -= 1
                continue
            if isinstance(item, RequestError):
                raise _rename(item, self._fields)
            if isinstance(item, Exception):
                raise item
            c = self.choices[index]
            c.text += item.text
            c.token_ids.extend(item.token_ids)
            c.logprobs.extend(item.logprobs)
            c.session_id = c.session_id or item.session_id
            if item.HasField("usage"):
                c.done = True
                c.finish_reason = FINISH.get(item.finish_reason, "stop")
                c.usage = item.usage
            return index, c, item
        return None

    async def first_event(self):
        event = await self.next_event()
        if event is None:
            raise HttpError(500, "the engine returned no output")
        return event

    async def collect(self, first) -> dict:
        while await self.next_event() is not None:
            pass
        return self.choices

    async def cancel(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- helpers --------------------------------------------------------------------------------------


async def _unless_disconnected(request: Request, coro):
    """`await coro`, unless the client goes away first (then `HttpError(499)`, which nobody
    reads, and `coro` is cancelled). The body has been read, so `receive()` now waits for the
    disconnect."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
    if work.cancelled():
        raise HttpError(499, "client disconnected")
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _usage(choices: dict, n: int) -> dict:
    prompt = cached = completion = 0
    for index, c in choices.items():
        if c.usage is None:
            continue
        completion += c.usage.completion_tokens
        if index % n == 0:  # the prompt counts once per prompt, not per choice
            prompt += c.usage.prompt_tokens
            cached += c.usage.cached_prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _from_request_error(e: RequestError) -> HttpError:
    status = HTTP_STATUS.get(e.code, 500)
    param = e.message.split(" ", 1)[0].rstrip(":") if status == 400 else None
    return HttpError(status, e.message, param)


def _rename(e: RequestError, fields: list[str]) -> RequestError:
    """A servicer validation message with OpenAI's field names instead of the proto's."""
    message = e.message
    m = re.match(r"^prompt\[(\d+)\]", message)
    if m:
        i = int(m.group(1))
        name = fields[i] if i < len(fields) else "prompt"
        message = name + message[m.end() :]
    elif re.match(r"^prompt\b", message):
        message = fields[-1] + message[len("prompt") :]
    for pattern, repl in _PROTO_FIELDS:
        message = pattern.sub(repl, message)
    return RequestError(e.code, message)


def _segment_fields(prefix) -> list[str]:
    return [f"pijax.segments[{i}]" for i in range(len(prefix))] + ["prompt"]


def _only(body: dict, allowed: set[str], prefix: str = "") -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        if key in NEUTRAL and value in NEUTRAL[key]:
            continue
        if key in NEUTRAL:
            raise bad(
                prefix + key,
                f"absent or {' / '.join(json.dumps(v) for v in NEUTRAL[key])} (not supported)",
                value,
            )
        raise HttpError(400, f"unsupported field {prefix + key!r}", prefix + key)


def _extension(body: dict) -> dict:
    ext = body.get("pijax", {})
    if not isinstance(ext, dict):
        raise bad("pijax", "an object", ext)
    ext = {k: v for k, v in ext.items() if v is not None}
    _only(ext, PIJAX_FIELDS, prefix="pijax.")
    return ext


def _not_int(x) -> bool:
    return not isinstance(x, int) or isinstance(x, bool)


def _int(body: dict, key: str, lo: int, hi: int, field: str | None = None) -> int:
    x = body[key]
    if _not_int(x) or not lo <= x <= hi:
        raise bad(field or key, f"an integer in [{lo}, {hi}]", x)
    return x


def _number(body: dict, key: str, ok, allowed: str) -> float:
    x = body[key]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x or not ok(x):
        raise bad(key, f"a finite number {allowed}", x)
    if x in (float("inf"), float("-inf")):
        raise bad(key, f"a finite number {allowed}", x)
    return float(x)


def _bool(body: dict, key: str, default: bool, field: str | None = None) -> bool:
    x = body.get(key, default)
    if not isinstance(x, bool):
        raise bad(field or key, "true or false", x)
    return x


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "a non-empty list of {role, content}", messages)
    out = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(field, "an object {role, content}", m)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"{field}.role", "system, developer, user or assistant", role)
        _only(
            {k: v for k, v in m.items() if v is not None},
            {"role", "content", "name"},
            prefix=field + ".",
        )
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(f"{field}.content[{j}]", "a text part {type: text, text}", part)
                if not isinstance(part.get("text"), str):
                    raise bad(f"{field}.content[{j}].text", "a string", part.get("text"))
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"{field}.content", "a string or a list of text parts", content)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _response_format(fmt) -> str:
    """The JSON schema text for the servicer's `json_schema` ('' for plain text)."""
    if fmt is None:
        return ""
    if not isinstance(fmt, dict):
        raise bad("response_format", "an object {type: text | json_object | json_schema}", fmt)
    kind = fmt.get("type")
    if kind == "text":
        return ""
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad("response_format.json_schema", "an object {name, schema, strict}", spec)
        _only(
            {k: v for k, v in spec.items() if v is not None},
            {"name", "schema", "strict", "description"},
            prefix="response_format.json_schema.",
        )
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema", "a JSON Schema object", schema)
        return json.dumps(schema)
    raise bad("response_format.type", "text, json_object or json_schema", kind)

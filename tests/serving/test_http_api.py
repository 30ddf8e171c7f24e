"""The OpenAI-compatible HTTP API over loopback, with the official `openai` client and raw
`httpx`: models, completions and chat (streaming and not), structured output, stop, seed, n,
usage, errors as the client's exception types, SSE framing, error bodies, overload, disconnect,
HTTP vs gRPC, trust zones, health, metrics, tokenize, draining (last: it stops the server)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from http_harness import HTTP_TIMEOUT_S, TEST_CHAT_TEMPLATE, start_http, stop_http
from serving_harness import auth, generate, text_request

from pijax.serving.http_api import HttpApi
from pijax.serving.proto.pijax.v1 import inference_pb2 as pb

SCHEMA_TEXT = (Path(__file__).parent / "findings_test.schema.json").read_text()
MODEL = "tiny-random"
POLICY = (
    "Payment integrity policy PI-HTTP-7 (synthetic): a procedure billed on the same date as its "
    "comprehensive code is bundled unless modifier 59 is present and the pair allows it. "
)


@pytest.fixture(scope="module")
def http(server):
    api = start_http(server, chat_template=TEST_CHAT_TEMPLATE)
    yield api
    stop_http(server, api)


@pytest.fixture(scope="module")
def base_url(http):
    return f"http://127.0.0.1:{http.port}"


def client(base_url: str, key: str = "key-acme") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=HTTP_TIMEOUT_S
    )


def post(base_url: str, path: str, body: dict, key: str | None = "key-acme") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=HTTP_TIMEOUT_S)


def greedy(**extra) -> dict:
    return {"temperature": 0.0, **extra}


def wait_idle(server) -> int:
    """An idle engine's pages in use (see test_service.pages_in_use: not free pages)."""
    from test_service import idle_engine

    return idle_engine(server)


def pages_in_use(server) -> int:
    from test_service import pages_in_use as in_use

    return in_use(server)


# --- the openai client ----------------------------------------------------------------------------


def test_models_list(base_url):
    models = client(base_url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "pijax"


def test_completion_same_tokens_as_grpc_and_usage(server, base_url, llm):
    prompt = "Claim 3001: CPT 99213 x2"
    c = client(base_url).completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=12,
        temperature=0.0,
        extra_body={"pijax": {"ignore_eos": True}},
    )
    grpc_out = generate(server.stub, text_request(prompt, max_tokens=12, ignore_eos=True))
    assert c.choices[0].text == "".join(r.text for r in grpc_out)
    ids = client(base_url).completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=12,
        temperature=0.0,
        extra_body={"pijax": {"ignore_eos": True, "return_token_ids": True}},
    )
    assert ids.choices[0].model_extra["token_ids"] == [t for r in grpc_out for t in r.token_ids]
    assert c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 12 == grpc_out[-1].usage.completion_tokens
    assert c.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert c.usage.total_tokens == c.usage.prompt_tokens + 12
    assert c.usage.prompt_tokens_details.cached_tokens == 0  # private: nothing reused
    # Token ids as the prompt give the same completion (BOS included by the caller).
    ids = llm.tokenizer.encode(prompt)
    by_ids = client(base_url).completions.create(
        model=MODEL,
        prompt=ids,
        max_tokens=12,
        temperature=0.0,
        extra_body={"pijax": {"ignore_eos": True}},
    )
    assert by_ids.choices[0].text == c.choices[0].text


def test_completion_stream_equals_non_stream(base_url):
    args = dict(model=MODEL, prompt="Claim 3002:", max_tokens=10, temperature=0.0)
    args["extra_body"] = {"pijax": {"ignore_eos": True}}
    whole = client(base_url).completions.create(**args)
    chunks = list(
        client(base_url).completions.create(
            **args, stream=True, stream_options={"include_usage": True}
        )
    )
    text_chunks = [ch for ch in chunks if ch.choices]
    assert len(text_chunks) > 1  # streamed, not one blob
    assert "".join(ch.choices[0].text for ch in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.choices[0].finish_reason is None for ch in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_completion_and_stream(base_url, llm, http):
    messages = [
        {"role": "system", "content": "You review claims."},
        {"role": "user", "content": "Claim 3003: CPT 97110 x6"},
    ]
    c = client(base_url).chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=8,
        temperature=0.0,
        extra_body={"pijax": {"ignore_eos": True}},
    )
    msg = c.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    rendered = http.chat_template.render(messages, add_generation_prompt=True)
    assert c.usage.prompt_tokens == len(llm.tokenizer.encode(rendered, add_bos=False))
    assert c.usage.completion_tokens == 8
    # The same prompt through /v1/completions (as token ids) gives the same text.
    ids = llm.tokenizer.encode(rendered, add_bos=False)
    same = client(base_url).completions.create(
        model=MODEL,
        prompt=ids,
        max_tokens=8,
        temperature=0.0,
        extra_body={"pijax": {"ignore_eos": True}},
    )
    assert same.choices[0].text == msg.content
    chunks = list(
        client(base_url).chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            temperature=0.0,
            stream=True,
            extra_body={"pijax": {"ignore_eos": True}},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_json_schema_output_validates(base_url):
    schema = json.loads(SCHEMA_TEXT)

    def one(seed: int):
        return client(base_url).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Review claim C{4000 + seed} in JSON."}],
            max_tokens=440,
            temperature=1.0,
            seed=seed,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "findings", "schema": schema, "strict": True},
            },
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(6)))
    for c in results:
        assert c.choices[0].finish_reason == "stop", c.choices[0].message.content
        jsonschema.validate(json.loads(c.choices[0].message.content), schema)
    obj = client(base_url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Any JSON object."}],
        max_tokens=300,
        temperature=0.0,
        response_format={"type": "json_object"},
    )
    if obj.choices[0].finish_reason == "stop":  # a random model may fill the budget first
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.startswith("{")


def test_stop_string_ends_the_completion(base_url):
    args = dict(model=MODEL, prompt="Claim 3004:", max_tokens=24, temperature=0.0)
    args["extra_body"] = {"pijax": {"ignore_eos": True}}
    free = client(base_url).completions.create(**args).choices[0].text
    stop = free[5:8]
    assert len(stop) == 3
    cut = client(base_url).completions.create(**args, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free[: free.index(stop)]


def test_seed_and_n(base_url):
    args = dict(model=MODEL, prompt="Claim 3005:", max_tokens=12, temperature=1.0, n=3)
    args["extra_body"] = {"pijax": {"ignore_eos": True}}
    a = client(base_url).completions.create(**args, seed=7)
    b = client(base_url).completions.create(**args, seed=7)
    c = client(base_url).completions.create(**args, seed=8)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    texts = [ch.text for ch in a.choices]
    assert texts == [ch.text for ch in b.choices]  # same seed, same text
    assert len(set(texts)) > 1  # the choices differ (seed + i)
    assert texts != [ch.text for ch in c.choices]
    assert a.usage.completion_tokens == 3 * 12
    assert a.usage.prompt_tokens == b.usage.prompt_tokens  # once per prompt, not per choice
    # A list of prompts: n choices per prompt, in order.
    two = client(base_url).completions.create(
        model=MODEL, prompt=["Claim A:", "Claim B:"], max_tokens=3, temperature=0.0, n=2
    )
    assert [ch.index for ch in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text  # greedy: both choices agree


def test_logprobs_and_echo(base_url):
    c = client(base_url).completions.create(
        model=MODEL, prompt="Claim 3006:", max_tokens=5, temperature=0.0, logprobs=0
    )
    lp = c.choices[0].logprobs
    assert len(lp.token_logprobs) == c.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == c.choices[0].text
    e = client(base_url).completions.create(
        model=MODEL, prompt="Claim 3006:", max_tokens=5, temperature=0.0, echo=True
    )
    assert e.choices[0].text == "Claim 3006:" + c.choices[0].text
    chat = client(base_url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0.0,
        logprobs=True,
    )
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens


@pytest.mark.parametrize(
    "call, key, error, status, needle",
    [
        ({"model": MODEL, "prompt": "x"}, "key-nobody", openai.AuthenticationError, 401, "API key"),
        ({"model": "gpt-4", "prompt": "x"}, "key-acme", openai.NotFoundError, 404, "gpt-4"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, "key-acme", openai.BadRequestError, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "key-acme", openai.BadRequestError, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "logprobs": 3}, "key-acme", openai.BadRequestError, 400, "logprobs"),
        ({"model": MODEL, "prompt": "x", "extra_body": {"frobnicate": 1}}, "key-acme", openai.BadRequestError, 400, "frobnicate"),
        ({"model": MODEL, "prompt": "x", "frequency_penalty": 0.5}, "key-acme", openai.BadRequestError, 400, "frequency_penalty"),
        ({"model": MODEL, "prompt": "x", "extra_body": {"pijax": {"segments": [{"text": "p", "scope": "shared:policy"}]}}}, "key-beta", openai.PermissionDeniedError, 403, "policy"),
        ({"model": MODEL, "prompt": "x", "extra_body": {"pijax": {"session_id": "nope"}}}, "key-acme", openai.NotFoundError, 404, "session_id"),
        ({"model": MODEL, "prompt": "x", "extra_body": {"pijax": {"scope": "shared:nowhere"}}}, "key-acme", openai.PermissionDeniedError, 403, "prompt.scope"),
    ],
)  # fmt: skip
def test_errors_surface_as_openai_exceptions(base_url, call, key, error, status, needle):
    with pytest.raises(error) as e:
        client(base_url, key).completions.create(**call)
    assert e.value.status_code == status
    assert needle in e.value.message


def test_server_keeps_serving_after_bad_requests(base_url):
    for body in ({"model": MODEL}, {"model": MODEL, "prompt": 3}, "not json"):
        r = httpx.post(
            f"{base_url}/v1/completions",
            content=body if isinstance(body, str) else json.dumps(body),
            headers={"Authorization": "Bearer key-acme"},
            timeout=HTTP_TIMEOUT_S,
        )
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    ok = client(base_url).completions.create(model=MODEL, prompt="still here", max_tokens=2)
    assert ok.usage.completion_tokens >= 1


# --- raw HTTP ---------------------------------------------------------------------------------


def test_sse_framing(base_url):
    body = {"model": MODEL, "prompt": "Claim 3007:", "max_tokens": 6, "stream": True, **greedy()}
    body["pijax"] = {"ignore_eos": True}
    with httpx.stream(
        "POST",
        f"{base_url}/v1/completions",
        json=body,
        headers={"Authorization": "Bearer key-acme"},
        timeout=HTTP_TIMEOUT_S,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "key, body, status, kind",
    [
        (None, {"model": MODEL, "prompt": "x"}, 401, "authentication_error"),
        ("key-bad", {"model": MODEL, "prompt": "x"}, 401, "authentication_error"),
        ("key-beta", {"model": MODEL, "prompt": "x", "pijax": {"segments": [{"text": "p", "scope": "shared:policy"}]}}, 403, "permission_error"),
        ("key-acme", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "invalid_request_error"),
        ("key-acme", {"model": MODEL, "prompt": "x", "best_of": 4}, 400, "invalid_request_error"),
    ],
)  # fmt: skip
def test_error_bodies(base_url, key, body, status, kind):
    r = post(base_url, "/v1/completions", body, key)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == kind and err["message"]
    assert "key-bad" not in r.text  # no credential echoed


def test_body_too_large_is_413(base_url, http):
    r = httpx.post(
        f"{base_url}/v1/completions",
        content=b"{" + b" " * (http.max_body_bytes + 1) + b"}",
        headers={"Authorization": "Bearer key-acme", "Content-Type": "application/json"},
        timeout=HTTP_TIMEOUT_S,
    )
    assert r.status_code == 413 and r.json()["error"]["message"]


def test_overload_is_429_with_retry_after(server, base_url):
    baseline = wait_idle(server)
    body = {"model": MODEL, "prompt": "load", "max_tokens": 480, "stream": True, **greedy()}
    body["pijax"] = {"ignore_eos": True}

    async def load():
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as c:
            request = functools.partial(
                c.build_request,
                "POST",
                f"{base_url}/v1/completions",
                json=body,
                headers={"Authorization": "Bearer key-acme"},
            )
            # 4 running + 4 waiting fit; of 12 sent at once the rest are refused at once.
            sends = [asyncio.ensure_future(c.send(request(), stream=True)) for _ in range(12)]
            refused = []
            for _ in range(2400):  # a hang guard, not a timing assertion
                done = [t.result() for t in sends if t.done()]
                refused = [r for r in done if r.status_code != 200]
                if len(refused) >= 4:
                    break
                await asyncio.sleep(0.05)
            out = [
                (r.status_code, r.headers.get("retry-after"), (await r.aread())) for r in refused
            ]
            for t in sends:  # hang up on everything else: queued ones too
                t.cancel()
            for t in sends:
                if not t.cancelled() and t.done() and t.exception() is None:
                    await t.result().aclose()
            return out

    refused = asyncio.run(load())
    assert len(refused) >= 4
    for status, retry_after, raw in refused:
        assert status == 429 and retry_after == "1"
        assert "overloaded" in json.loads(raw)["error"]["message"]
    from test_service import wait_for

    wait_for(lambda: pages_in_use(server) == baseline, "pages after the load went away")
    assert server.on_engine(lambda e: not e.has_unfinished_requests())


def test_disconnect_mid_stream_frees_pages(server, base_url):
    baseline = wait_idle(server)
    body = {"model": MODEL, "prompt": "hang up", "max_tokens": 480, "stream": True, **greedy()}
    body["pijax"] = {"ignore_eos": True}
    with httpx.stream(
        "POST",
        f"{base_url}/v1/completions",
        json=body,
        headers={"Authorization": "Bearer key-acme"},
        timeout=HTTP_TIMEOUT_S,
    ) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(4), strict=False)]
        assert any(line.startswith("data: {") for line in got)
        assert pages_in_use(server) > baseline  # it holds pages while running
    from test_service import wait_for

    wait_for(lambda: pages_in_use(server) == baseline, "the disconnected request's pages")
    assert server.on_engine(lambda e: not e.has_unfinished_requests())


# --- trust zones over HTTP ------------------------------------------------------------------------


def test_private_text_is_not_reused_across_tenants(base_url):
    text = "Private claim C5001 of tenant acme: member 88-1234, CPT 99215, billed $310. " * 3
    args = dict(model=MODEL, prompt=text, max_tokens=2, temperature=0.0)
    first = client(base_url, "key-acme").completions.create(**args)
    again = client(base_url, "key-acme").completions.create(**args)
    other = client(base_url, "key-beta").completions.create(**args)
    assert first.usage.prompt_tokens > 128  # more than two pages: reuse would show
    assert again.usage.prompt_tokens_details.cached_tokens == 0  # private: not even the owner
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_permitted_shared_zone_is_reused(server, base_url, llm):
    if not callable(getattr(llm.engine, "register_trusted_prefix", None)):
        pytest.skip("engine has no register_trusted_prefix (scheduler issue)")
    r = server.stub.RegisterTrustedPrefix(
        pb.RegisterTrustedPrefixRequest(zone="policy", text=POLICY),
        metadata=auth("key-admin"),
        timeout=HTTP_TIMEOUT_S,
    )
    page = llm.engine.config.cache.page_size
    assert r.num_tokens >= page

    def review(claim: str, key: str = "key-acme"):
        return client(base_url, key).completions.create(
            model=MODEL,
            prompt=f"Claim {claim}: CPT 99213 x2",
            max_tokens=2,
            temperature=0.0,
            extra_body={"pijax": {"segments": [{"text": POLICY, "scope": "shared:policy"}]}},
        )

    review("C6001")
    second = review("C6002")
    assert second.usage.prompt_tokens_details.cached_tokens >= page * (r.num_tokens // page) > 0
    with pytest.raises(openai.PermissionDeniedError):
        review("C6003", key="key-beta")
    # The same policy sent as a plain prompt is private: nothing reused.
    plain = client(base_url).completions.create(
        model=MODEL, prompt=POLICY + "Claim C6004", max_tokens=2, temperature=0.0
    )
    assert plain.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_message_scopes_reuse_a_shared_zone(server, base_url, http, llm):
    if not callable(getattr(llm.engine, "register_trusted_prefix", None)):
        pytest.skip("engine has no register_trusted_prefix (scheduler issue)")
    system = {"role": "system", "content": POLICY + "Chat edition."}
    # The operator registers the system message's rendered text (the template writes no BOS).
    span = http.chat_template.render([system], add_generation_prompt=False)
    ids = llm.tokenizer.encode(span, add_bos=False)
    server.stub.RegisterTrustedPrefix(
        pb.RegisterTrustedPrefixRequest(zone="policy", token_ids=pb.TokenIds(ids=ids)),
        metadata=auth("key-admin"),
        timeout=HTTP_TIMEOUT_S,
    )
    page = llm.engine.config.cache.page_size

    def review(claim: str, key: str = "key-acme", scopes=("shared:policy",)):
        return client(base_url, key).chat.completions.create(
            model=MODEL,
            messages=[system, {"role": "user", "content": [{"type": "text", "text": claim}]}],
            max_tokens=2,
            temperature=0.0,
            extra_body={"pijax": {"message_scopes": list(scopes)}},
        )

    review("C7001")
    second = review("C7002")
    assert second.usage.prompt_tokens_details.cached_tokens >= page * (len(ids) // page) > 0
    assert review("C7003", scopes=()).usage.prompt_tokens_details.cached_tokens == 0
    with pytest.raises(openai.PermissionDeniedError):
        review("C7004", key="key-beta")


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "pijax": {"message_scopes": ["private", "private"]}}, "pijax.message_scopes"),
        ({"messages": [{"role": "user", "content": "x"}], "pijax": {"segments": []}}, "pijax.segments"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}, "response_format.type"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, "json_schema"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 2}, "max_tokens"),
    ],
)  # fmt: skip
def test_chat_bad_requests_name_the_field(base_url, body, needle):
    r = post(base_url, "/v1/chat/completions", {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_sessions_over_http(base_url):
    turn1 = "Claim C8001 review, turn 1: CPT 99213 x2, 97110 x6, diagnosis M54.5, billed $394. " * 2
    first = client(base_url).completions.create(
        model=MODEL,
        prompt=turn1,
        max_tokens=4,
        temperature=0.0,
        extra_body={"pijax": {"start_session": True, "ignore_eos": True}},
    )
    sid = first.model_extra["pijax"]["session_id"]
    assert sid
    turn2 = client(base_url).completions.create(
        model=MODEL,
        prompt=turn1 + first.choices[0].text + " [tool] fee schedule: $92.00",
        max_tokens=4,
        temperature=0.0,
        extra_body={"pijax": {"session_id": sid, "ignore_eos": True}},
    )
    assert turn2.model_extra["pijax"]["session_id"] == sid
    assert turn2.usage.prompt_tokens_details.cached_tokens > 0  # the session's KV was kept
    with pytest.raises(openai.NotFoundError):  # another tenant cannot name it
        client(base_url, "key-beta").completions.create(
            model=MODEL, prompt="x", max_tokens=1, extra_body={"pijax": {"session_id": sid}}
        )
    with pytest.raises(openai.ConflictError):  # already open
        client(base_url).completions.create(
            model=MODEL,
            prompt="x",
            max_tokens=1,
            extra_body={"pijax": {"session_id": sid, "start_session": True}},
        )
    assert httpx.delete(f"{base_url}/v1/sessions/{sid}", timeout=HTTP_TIMEOUT_S).status_code == 401
    foreign = httpx.delete(
        f"{base_url}/v1/sessions/{sid}",
        headers={"Authorization": "Bearer key-beta"},
        timeout=HTTP_TIMEOUT_S,
    )
    assert foreign.status_code == 404
    ended = httpx.delete(
        f"{base_url}/v1/sessions/{sid}",
        headers={"Authorization": "Bearer key-acme"},
        timeout=HTTP_TIMEOUT_S,
    )
    assert ended.status_code == 200 and ended.json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):  # gone
        client(base_url).completions.create(
            model=MODEL, prompt="x", max_tokens=1, extra_body={"pijax": {"session_id": sid}}
        )


def test_operator_tenant_default_scope(server):
    """`default_scopes={"acme": "tenant"}`: acme's plain requests are reusable by acme (only);
    everyone else's stay private."""
    with pytest.raises(ValueError, match="default scope"):
        HttpApi(server.server, default_scopes={"acme": "shared:policy"})
    api = start_http(server, default_scopes={"acme": "tenant"})
    try:
        base = f"http://127.0.0.1:{api.port}"
        text = "Tenant-scoped claim C9001: CPT 99214, 97110 x4, M54.5, billed $402.17. " * 3
        args = dict(model=MODEL, prompt=text, max_tokens=2, temperature=0.0)
        client(base, "key-acme").completions.create(**args)
        again = client(base, "key-acme").completions.create(**args)
        other = client(base, "key-beta").completions.create(**args)
        other_again = client(base, "key-beta").completions.create(**args)
    finally:
        stop_http(server, api)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert other_again.usage.prompt_tokens_details.cached_tokens == 0


# --- health, metrics, tokenize --------------------------------------------------------------------


def test_health_and_metrics(base_url):
    assert httpx.get(f"{base_url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200
    client(base_url).completions.create(model=MODEL, prompt="metrics", max_tokens=2)
    body = httpx.get(f"{base_url}/metrics", timeout=HTTP_TIMEOUT_S).text
    label = f'model_name="{MODEL}"'
    for name in (
        "pijax:num_requests_waiting{",
        "pijax:num_requests_running{",
        "pijax:kv_cache_usage_perc{",
        "pijax:prompt_tokens_total{",
        "pijax:generation_tokens_total{",
        "pijax:time_to_first_token_seconds_bucket{",
        "pijax:e2e_request_latency_seconds_bucket{",
        'pijax:request_success_total{finished_reason="length"',
        'pijax:http_requests_total{model_name="tiny-random",route="/v1/completions",status="200"}',
    ):
        lines = [line for line in body.splitlines() if line.startswith(name)]
        assert lines and all(label in line for line in lines), name
    info = [line for line in body.splitlines() if line.startswith("pijax:cache_config_info{")]
    assert len(info) == 1 and 'block_size="64"' in info[0] and info[0].endswith(" 1.0")
    usage = [line for line in body.splitlines() if line.startswith("pijax:kv_cache_usage_perc{")]
    assert 0.0 <= float(usage[0].rsplit(" ", 1)[1]) <= 1.0


def test_tokenize_and_detokenize(base_url, llm):
    text = "Claim 3008: CPT 99213"
    t = post(base_url, "/tokenize", {"model": MODEL, "prompt": text}).json()
    assert t["tokens"] == llm.tokenizer.encode(text) and t["count"] == len(t["tokens"])
    d = post(base_url, "/detokenize", {"model": MODEL, "tokens": t["tokens"]}).json()
    assert d["prompt"] == text
    chat = post(base_url, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2
    assert post(base_url, "/tokenize", {"prompt": text}, key=None).status_code == 401
    bad = post(base_url, "/detokenize", {"tokens": [10**6]})
    assert bad.status_code == 400 and "tokens" in bad.json()["error"]["message"]


def test_stream_with_n_interleaves_choices(base_url):
    chunks = list(
        client(base_url).completions.create(
            model=MODEL,
            prompt="Claim 3009:",
            max_tokens=5,
            temperature=1.0,
            seed=3,
            n=2,
            stream=True,
            extra_body={"pijax": {"ignore_eos": True}},
        )
    )
    whole = client(base_url).completions.create(
        model=MODEL,
        prompt="Claim 3009:",
        max_tokens=5,
        temperature=1.0,
        seed=3,
        n=2,
        extra_body={"pijax": {"ignore_eos": True}},
    )
    for choice in whole.choices:
        streamed = [ch.choices[0] for ch in chunks if ch.choices[0].index == choice.index]
        assert "".join(c.text for c in streamed) == choice.text
        assert streamed[-1].finish_reason == "length"


def test_warming_up_answers_503(llm):
    """An HTTP front end on a server that has not finished starting: health and requests say
    503 (the engine is not touched: its loop never starts here)."""
    from pijax.serving.server import InferenceServer, ServerConfig

    async def probe():
        server = InferenceServer(
            llm.engine, ServerConfig(insecure_dev_mode=True, port=0, model_name=MODEL)
        )
        api = HttpApi(server)
        await api.start("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}") as c:
                health = await c.get("/health")
                req = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
                return health, req
        finally:
            await api.stop()

    health, req = asyncio.run(probe())
    assert health.status_code == 503 and health.json()["status"] == "warming_up"
    assert req.status_code == 503 and req.headers["retry-after"] == "1"
    assert "warming up" in req.json()["error"]["message"]


# --- draining (last: it stops this module's server) -----------------------------------------------


def test_drain_answers_503(server, base_url):
    baseline = wait_idle(server)
    # 1,000 tokens (max_model_len is 1,024): the stream must outlast the 0.5 s grace period.
    body = {"model": MODEL, "prompt": "long", "max_tokens": 1000, "stream": True, **greedy()}
    body["pijax"] = {"ignore_eos": True}
    with httpx.stream(
        "POST",
        f"{base_url}/v1/completions",
        json=body,
        headers={"Authorization": "Bearer key-acme"},
        timeout=HTTP_TIMEOUT_S,
    ) as r:
        lines = r.iter_lines()
        next(lines)
        drained = server.drain_in_background(grace_s=0.5)
        from test_service import wait_for

        wait_for(lambda: server.server.state.draining, "draining")
        h = httpx.get(f"{base_url}/health", timeout=HTTP_TIMEOUT_S)
        assert h.status_code == 503 and h.json()["status"] == "draining"
        refused = post(base_url, "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "service_unavailable_error"
        rest = "\n".join(lines)  # the in-flight stream is ended after the grace period
    assert rest.rstrip().endswith("data: [DONE]")
    assert "error" in rest
    drained.result(60)
    assert server.server.engine.blocks.num_used_pages() == baseline  # the loop has stopped

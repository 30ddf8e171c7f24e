"""Test harness for the HTTP API: an `HttpApi` on a gRPC test server's event loop."""

from __future__ import annotations

from pijax.model.chat_template import ChatTemplate
from pijax.serving.http_api import HttpApi

HTTP_TIMEOUT_S = 120.0  # generous: a first request may compile on a loaded CPU
# A generic template for the byte-tokenizer test model (it has none of its own).
TEST_CHAT_TEMPLATE = ChatTemplate(
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def start_http(server, **kwargs) -> HttpApi:
    """Start the HTTP API on `server` (a `serving_harness.ServerThread`) on a free port."""

    async def start():
        api = HttpApi(server.server, **kwargs)
        await api.start("127.0.0.1", 0)
        return api

    return server.run(start())


def stop_http(server, api: HttpApi) -> None:
    server.run(api.stop())

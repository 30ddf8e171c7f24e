"""Test harness for the gRPC tests: an in-process server on a background asyncio loop, and
request helpers. Fixtures live in conftest.py."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import grpc

from pijax.serving.proto.pijax.v1 import inference_pb2 as pb
from pijax.serving.proto.pijax.v1 import inference_pb2_grpc as pb_grpc
from pijax.serving.server import InferenceServer, ServerConfig

ENGINE_OVERRIDES = dict(
    num_pages=40,
    page_size=64,
    max_num_seqs=4,
    max_num_batched_tokens=16,
    max_model_len=1024,
    max_waiting=4,
    seed=0,
    compilation_cache_dir=os.environ.get("PIJAX_COMPILATION_CACHE"),
)
KEYS = {
    "key-acme": {"tenant": "acme", "zones": ["policy"]},
    "key-beta": {"tenant": "beta", "zones": []},
    "key-admin": {"tenant": "ops", "zones": ["*"], "admin": True},
}
RPC_TIMEOUT_S = 120.0  # generous: a first request may compile on a loaded CPU


def auth(key: str = "key-acme") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


class ServerThread:
    """An `InferenceServer` on its own asyncio loop in a background thread."""

    def __init__(self, engine, config: ServerConfig, wait: bool = True):
        self.aio = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.aio.run_forever, name="test-grpc-server", daemon=True
        )
        self._thread.start()
        self.server = self.run(_build(engine, config))
        self.started = asyncio.run_coroutine_threadsafe(self.server.start(), self.aio)
        if wait:
            self.started.result(600)
        else:  # listening happens before warm-up: wait for the port only
            for _ in range(6000):
                if self.server.port is not None or self.started.done():
                    break
                time.sleep(0.01)
        self.port = self.server.port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.InferenceStub(self.channel)

    def run(self, coro, timeout: float = RPC_TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.aio).result(timeout)

    def on_engine(self, fn, timeout: float = RPC_TIMEOUT_S):
        """Run `fn(engine)` on the engine loop thread (the only thread allowed to touch it)."""
        return self.server.loop.call(fn).result(timeout)

    def free_pages(self) -> int:
        return self.on_engine(lambda e: e.blocks.num_free_pages())

    def drain_in_background(self, grace_s: float | None = None):
        return asyncio.run_coroutine_threadsafe(self.server.drain(grace_s), self.aio)

    def stop(self, grace_s: float = 0.0) -> None:
        self.channel.close()
        self.run(self.server.drain(grace_s))
        self.aio.call_soon_threadsafe(self.aio.stop)
        self._thread.join(30)


async def _build(engine, config):
    return InferenceServer(engine, config)


def start_server(engine, keys_file: str | None, wait: bool = True, **config) -> ServerThread:
    defaults = dict(host="127.0.0.1", port=0, model_name="tiny-random", drain_grace_s=5.0)
    if keys_file is None:
        defaults["insecure_dev_mode"] = True
    else:
        defaults["api_keys_path"] = keys_file
    return ServerThread(engine, ServerConfig(**{**defaults, **config}), wait=wait)


def generate(
    stub, request: pb.GenerateRequest, key: str = "key-acme", timeout: float = RPC_TIMEOUT_S
) -> list[pb.GenerateResponse]:
    return list(stub.Generate(request, metadata=auth(key), timeout=timeout))


def text_request(text: str, max_tokens: int = 8, **kw) -> pb.GenerateRequest:
    sampling = kw.pop("sampling", pb.SamplingParams(temperature=0.0))
    return pb.GenerateRequest(
        prompt=[pb.PromptSegment(text=text)], max_tokens=max_tokens, sampling=sampling, **kw
    )

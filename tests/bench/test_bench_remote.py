"""`scripts/bench.py --target`: the smoke workload over gRPC against an in-process server."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pijax.bench.presets import load_bench_preset
from pijax.bench.remote import REMOTE, run_remote
from pijax.bench.report import markdown


@pytest.fixture(scope="module")
def server_target():
    from pijax.config import engine_config_from_overrides
    from pijax.engine import Engine
    from pijax.serving.server import InferenceServer, ServerConfig

    preset = load_bench_preset("smoke")
    engine = Engine.from_source(preset.model, engine_config_from_overrides(**preset.engine))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-test-server", daemon=True)
    thread.start()

    async def build():
        return InferenceServer(
            engine,
            ServerConfig(
                host="127.0.0.1",
                port=0,
                insecure_dev_mode=True,
                model_name=preset.model,
                trusted_zones=("policy",),
                drain_grace_s=1.0,
            ),
        )

    server = asyncio.run_coroutine_threadsafe(build(), loop).result(60)
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(600)
    yield f"127.0.0.1:{port}", engine
    asyncio.run_coroutine_threadsafe(server.drain(0.0), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


@pytest.mark.slow
def test_smoke_workload_over_grpc(server_target):
    target, engine = server_target
    preset = load_bench_preset("smoke")
    results, runs = run_remote(preset, target, api_key=None, progress=False)
    entry = results["configs"][REMOTE]
    assert entry["num_errors"] == 0, entry["errors"]
    s = entry["summary"]
    wl = results["workload"]
    assert s["requests"] == wl["requests"] and s["conversations"] == wl["conversations"]
    # Every turn streamed exactly its drawn output length.
    assert s["output_tokens"] == wl["output_tokens"]["total"]
    assert results["server"]["policy_registration"] == "registered"
    # The scaffold was reused over the wire: later requests found it cached.
    assert s["cached_prompt_tokens"] > 0
    for key in ("ttft", "tpot", "itl", "queue", "e2e"):
        assert s["latency_s"][key]["p50"] is not None
    assert s["throughput"]["claims_per_hour"] > 0
    assert s["concurrency"]["peak"] >= 1  # from the turns: no engine samples over gRPC
    # Sessions were ended after their last turn: nothing is left pinned.
    assert engine.kv.sessions.num_pages_held() == 0
    md = markdown(results)
    assert "| remote |" in md and "over gRPC" in md

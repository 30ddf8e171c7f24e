"""Serve pijax over gRPC (`pijax.v1.Inference`, health, reflection) and an OpenAI-compatible
HTTP API (`--http_port`, default 8000; 0 disables it), with Prometheus metrics. One process, one
engine: both front ends share authentication, validation, metrics and the engine loop.

    python scripts/serve.py --insecure_dev_mode                    # local demo, default model
    python scripts/serve.py --model path/to/hf_checkpoint --api_keys keys.json \
        --host 0.0.0.0 --port 50051 --metrics_port 9400 --mesh 1,2

The server listens at once, answers health checks with NOT_SERVING while it compiles its step
shapes (`--warmup`, on by default; a progress bar on a terminal; a few step shapes, loaded from
the persistent compilation cache after the first start), then logs "pijax server ready" and
reports SERVING. SIGTERM or Ctrl-C drains: new
requests get UNAVAILABLE, in-flight ones get `--drain_grace_s` to finish, the rest are cancelled.

The API-key file maps each key to a tenant, the trust zones it may use and an admin flag (see
`pijax/serving/auth.py`). `--trusted_prefix ZONE=FILE` registers a prefix trusted for
`shared:ZONE` at start-up; with the synthetic claims package present, its policy scaffold is
registered in zone `policy` (`--register_claims_policy`), which `scripts/review_claims.py` uses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from pathlib import Path

from absl import app, flags
from grpc_health.v1 import health_pb2

from pijax import distributed
from pijax import flags as engine_flags
from pijax.claims.prompt import policy_scaffold, render_policy_segment
from pijax.config import ConfigError
from pijax.engine import Engine
from pijax.quant_gate import GateError, enforce_gate
from pijax.serving.auth import KeyStore
from pijax.serving.server import SERVICE_NAME, InferenceServer, ServerConfig, ServerConfigError

FLAGS = flags.FLAGS
engine_flags.define_engine_flags()
distributed.define_flags()  # multi-host: --coordinator_address, --num_processes, --process_id
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 or [::] for all).")
flags.DEFINE_integer("port", 50051, "gRPC port (0 = any free port).")
flags.DEFINE_string("api_keys", None, "API-key file (JSON: key -> tenant, zones, admin).")
flags.DEFINE_bool(
    "insecure_dev_mode",
    False,
    "No authentication: every caller is tenant 'dev' "
    "with every zone and admin rights. Local demos only.",
)
flags.DEFINE_integer(
    "http_port", 8000, "OpenAI-compatible HTTP API port (/v1/..., /health, /metrics); 0 = off."
)
flags.DEFINE_string("http_host", None, "Address for the HTTP API (default: --host).")
flags.DEFINE_string(
    "chat_template",
    None,
    "Jinja chat template file for /v1/chat/completions "
    "(default: the model's chat_template.jinja or tokenizer_config.json chat_template).",
)
flags.DEFINE_multi_string(
    "http_default_scope",
    [],
    "TENANT=SCOPE: the cache scope of plain HTTP requests of TENANT ('*' = every tenant); "
    "SCOPE is private (the default) or tenant (repeatable).",
)
flags.DEFINE_integer("metrics_port", 9400, "Prometheus /metrics port (0 = any free, -1 = off).")
flags.DEFINE_string("metrics_host", "127.0.0.1", "Address for the metrics endpoint.")
flags.DEFINE_float("drain_grace_s", 30.0, "On SIGTERM, seconds in-flight requests get to finish.")
flags.DEFINE_multi_string(
    "trusted_zone", [], "A zone the server knows besides those in the key file (repeatable)."
)
flags.DEFINE_multi_string(
    "trusted_prefix",
    [],
    "ZONE=FILE: register FILE's text as a trusted prefix of shared:ZONE at start-up (repeatable).",
)
flags.DEFINE_bool(
    "register_claims_policy",
    True,
    "Register the synthetic claims policy scaffold (pijax.claims) in zone 'policy'.",
)
flags.DEFINE_enum(
    "warmup",
    "auto",
    ["auto", "on", "off"],
    "Compile every step shape before reporting SERVING (auto = on: a few shapes, and later "
    "starts load them from the persistent compilation cache); off: shapes compile on first use.",
)
flags.DEFINE_string(
    "kv_quant_gate_report",
    None,
    "Passing report of scripts/kv_quant_eval.py "
    "for this model and --kv_cache_dtype; required for a quantized cache.",
)
flags.DEFINE_bool(
    "skip_kv_quant_gate",
    False,
    "Start a quantized KV cache without a gate report (logged as a warning).",
)

log = logging.getLogger("pijax.serve")


def warmup_wanted() -> bool:
    return FLAGS.warmup != "off"


def trusted_prefixes() -> list[tuple[str, str]]:
    out = []
    for spec in FLAGS.trusted_prefix:
        zone, sep, path = spec.partition("=")
        if not sep or not zone or not path:
            raise app.UsageError(f"--trusted_prefix must be ZONE=FILE; got {spec!r}")
        out.append((zone, Path(path).read_text()))
    if FLAGS.register_claims_policy:
        out.append(("policy", render_policy_segment(policy_scaffold())))
    return out


def chat_template(model: str):
    from pijax.model.chat_template import ChatTemplate

    if FLAGS.chat_template:
        specials = ChatTemplate.from_dir(model) if Path(model).is_dir() else None
        return ChatTemplate.from_file(
            FLAGS.chat_template, specials.special_tokens if specials else None
        )
    return ChatTemplate.from_dir(model) if Path(model).is_dir() else None


def http_default_scopes() -> dict[str, str]:
    out = {}
    for spec in FLAGS.http_default_scope:
        tenant, sep, scope = spec.partition("=")
        if not sep or not tenant or scope not in ("private", "tenant"):
            raise app.UsageError(
                f"--http_default_scope must be TENANT=private or TENANT=tenant; got {spec!r}"
            )
        out[tenant] = scope
    return out


async def serve(
    engine: Engine, config: ServerConfig, prefixes: list[tuple[str, str]], http=None
) -> None:
    server = InferenceServer(engine, config)
    for zone, text in prefixes:  # before the loop starts, this thread may touch the engine
        ids = engine.tokenizer.encode(text)
        engine.register_trusted_prefix(zone, ids, source="startup")
        server.state.add_zone(zone)
        log.info("trusted prefix for shared:%s: %d tokens", zone, len(ids))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: _on_signal(server, s))
    cluster = distributed.cluster()
    if cluster is not None:  # a worker died: stop admitting, NOT_SERVING; the process then exits
        cluster.on_failure(lambda reason: loop.call_soon_threadsafe(_stop_admitting, server))
    api = None
    if http is not None:  # listening before warm-up: /health answers 503 meanwhile
        from pijax.serving.http_api import HttpApi

        host, port, template, scopes = http
        api = HttpApi(server, chat_template=template, default_scopes=scopes)
        await api.start(host, port)
    await server.start()
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, server.metrics_port)
    if api is not None:
        log.info("OpenAI-compatible API ready on http://%s:%d/v1", http[0], api.port)
    await server.wait_for_termination()
    if api is not None:
        await api.stop()
    if cluster is not None:
        cluster.stop_workers()


def _stop_admitting(server: InferenceServer) -> None:
    """Multi-host failure: refuse new requests and report NOT_SERVING until the process exits
    (`distributed.FAILURE_EXIT_CODE`); nothing waits on a step that can no longer finish."""
    server.state.draining = True
    for service in ("", SERVICE_NAME):
        asyncio.ensure_future(
            server.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        )


def _on_signal(server: InferenceServer, sig: signal.Signals) -> None:
    log.info("received %s: draining", signal.Signals(sig).name)
    asyncio.ensure_future(server.drain())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    try:  # before anything touches a device
        distributed.initialize_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    model = engine_flags.model_source()
    try:
        engine_config = engine_flags.engine_config()
    except ConfigError as e:
        raise app.UsageError(str(e)) from None
    try:
        config = ServerConfig(
            host=FLAGS.host,
            port=FLAGS.port,
            metrics_host=FLAGS.metrics_host,
            metrics_port=None if FLAGS.metrics_port < 0 else FLAGS.metrics_port,
            api_keys_path=FLAGS.api_keys,
            insecure_dev_mode=FLAGS.insecure_dev_mode,
            model_name=FLAGS.model or "default_model",
            trusted_zones=tuple(FLAGS.trusted_zone),
            drain_grace_s=FLAGS.drain_grace_s,
            warmup=warmup_wanted(),
        )
    except ServerConfigError as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.api_keys:
        KeyStore.from_file(FLAGS.api_keys)  # fail on a bad key file before loading the model
    try:  # before loading the model: a quantized cache needs its quality gate
        enforce_gate(
            engine_config.cache.kv_cache_dtype,
            model,
            FLAGS.kv_quant_gate_report,
            FLAGS.skip_kv_quant_gate,
        )
    except GateError as e:
        raise app.UsageError(str(e)) from None
    engine_config = dataclasses.replace(  # the engine checks the gate again, as for every caller
        engine_config,
        cache=dataclasses.replace(
            engine_config.cache,
            kv_quant_gate_report=FLAGS.kv_quant_gate_report,
            skip_kv_quant_gate=FLAGS.skip_kv_quant_gate,
        ),
    )
    prefixes = trusted_prefixes()
    http = None  # checked before loading the model: (host, port, chat template, default scopes)
    if FLAGS.http_port:
        if not 0 < FLAGS.http_port < 65536:
            raise app.UsageError(f"--http_port must be in [0, 65535]; got {FLAGS.http_port}")
        try:
            template = chat_template(model)
        except (OSError, ValueError) as e:
            raise app.UsageError(f"--chat_template: {e}") from None
        http = (FLAGS.http_host or FLAGS.host, FLAGS.http_port, template, http_default_scopes())
    engine = Engine.from_source(model, engine_config)
    if distributed.is_worker():  # process 0 serves; the others run its steps on their devices
        distributed.run_worker(engine)
        return
    asyncio.run(serve(engine, config, prefixes, http))


if __name__ == "__main__":
    app.run(main)

"""The gRPC server: `pijax.v1.Inference` + health + reflection + a Prometheus endpoint.

    server = InferenceServer(engine, ServerConfig(port=50051, api_keys_path="keys.json"))
    await server.start()        # listening at once; SERVING after warm-up
    ...
    await server.drain()        # SIGTERM: stop accepting, finish or cancel in-flight, stop

Lifecycle and health (`grpc.health.v1`, for the overall server "" and `pijax.v1.Inference`):
NOT_SERVING while the engine compiles its step shapes (Generate answers UNAVAILABLE), SERVING
once warm, NOT_SERVING again while draining. `drain()` refuses new Generate calls with
UNAVAILABLE, waits up to the grace period for in-flight streams to finish, ends the rest with
UNAVAILABLE (their pages are freed by the abort), then stops the gRPC server, the engine loop and
the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pijax.serving.auth import Authenticator, KeyStore
from pijax.serving.engine_loop import EngineLoop
from pijax.serving.guard import guarded_handler
from pijax.serving.metrics import ServingMetrics, start_metrics_server
from pijax.serving.proto.pijax.v1 import inference_pb2 as pb
from pijax.serving.servicer import EngineInfo, InferenceServicer, ServingState
from pijax.serving.sessions import SessionRegistry
from pijax.serving.validation import RequestLimits, max_message_bytes
from pijax.structured import SchemaCompiler

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
INSECURE_BANNER = """
################################################################################
#  INSECURE DEV MODE: no API keys are checked. Every caller is tenant 'dev'    #
#  with every trust zone and admin rights. Never expose this server.           #
################################################################################"""


class ServerConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How the server listens and whom it lets in. `metrics_port=None` disables metrics;
    `port=0` / `metrics_port=0` pick free ports."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    api_keys_path: str | None = None
    insecure_dev_mode: bool = False
    model_name: str = ""
    trusted_zones: tuple[str, ...] = ()  # zones known besides those named in the key file
    drain_grace_s: float = 30.0
    warmup: bool = True
    session_idle_timeout_s: float | None = None  # None: the engine's session TTL (the only one)
    max_sessions_per_tenant: int = 1024
    limits: RequestLimits = dataclasses.field(default_factory=RequestLimits)

    def __post_init__(self):
        if self.insecure_dev_mode == bool(self.api_keys_path):
            raise ServerConfigError(
                "give exactly one of api_keys_path (an API-key file) or "
                f"insecure_dev_mode; got api_keys_path={self.api_keys_path!r}, "
                f"insecure_dev_mode={self.insecure_dev_mode}"
            )
        if not 0 <= self.port < 65536:
            raise ServerConfigError(f"port must be in [0, 65535]; got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ServerConfigError(
                f"metrics_port must be None or in [0, 65535]; got {self.metrics_port}"
            )
        if self.drain_grace_s < 0:
            raise ServerConfigError(f"drain_grace_s must be >= 0; got {self.drain_grace_s}")


class InferenceServer:
    def __init__(self, engine, config: ServerConfig):
        self.config = config
        self.engine = engine
        self.metrics = ServingMetrics(
            model_name=config.model_name,
            cache_config={
                "block_size": engine.config.cache.page_size,
                "num_gpu_blocks": engine.blocks.num_usable_pages,
            },
        )
        self.loop = EngineLoop(engine, self.metrics)
        if config.insecure_dev_mode:
            self.authenticator = Authenticator.insecure_dev_mode()
        else:
            self.authenticator = Authenticator(KeyStore.from_file(config.api_keys_path))
        self.state = ServingState(self.authenticator.known_zones | set(config.trusted_zones))
        self.info = EngineInfo.from_engine(engine, config.model_name)
        self.servicer = InferenceServicer(
            self.loop,
            self.info,
            engine.tokenizer,
            self.authenticator,
            _schema_compiler(engine, config),
            self.metrics,
            self.state,
            config.limits,
            SessionRegistry(_session_ttl_s(engine, config), config.max_sessions_per_tenant),
        )
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._stopped = asyncio.Event()
        self._drain_task: asyncio.Task | None = None

    async def start(self) -> int:
        """Listen, warm the engine up (health NOT_SERVING meanwhile), start the loop, report
        SERVING. Returns the bound port."""
        if self.authenticator.is_insecure:
            log.warning(INSECURE_BANNER)
        self.max_message_bytes = max_message_bytes(self.info.limits, self.config.limits)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_metadata_size", 16 << 10),
            ]
        )
        # Authenticate before parsing: the service's handlers take raw bytes (`guard`).
        server.add_generic_rpc_handlers((guarded_handler(self.servicer, self.metrics),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        if self.config.metrics_port is not None:
            self._metrics_http, _ = start_metrics_server(
                self.metrics, self.config.metrics_port, self.config.metrics_host
            )
            self.metrics_port = self._metrics_http.server_port
            if not _is_loopback(self.config.metrics_host):
                log.warning(
                    "metrics endpoint on %s, not loopback: it has no authentication and its "
                    "histograms move with every request; expose it to monitoring only, never "
                    "to tenants",
                    self.config.metrics_host,
                )
        if self.config.warmup:
            from pijax.engine import progress_bar  # a bar on a terminal, else nothing

            total = len(list(self.engine.buckets.grid()))
            with progress_bar(None, total, "warm-up") as bar:
                n = await asyncio.to_thread(self.engine.warmup, lambda *_: bar.update(1))
            log.info("warm-up done: %d step shapes compiled", n)
        self.loop.start()
        self.state.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "pijax server ready on %s:%d (model %s, %d KV pages of %d tokens)",
            self.config.host,
            self.port,
            self.info.model or "?",
            self.info.num_pages,
            self.info.page_size,
        )
        return self.port

    async def drain(self, grace_s: float | None = None) -> None:
        """Graceful shutdown; safe to call more than once (later calls wait for the first)."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(
                self._drain(self.config.drain_grace_s if grace_s is None else grace_s)
            )
        await asyncio.shield(self._drain_task)

    async def _drain(self, grace_s: float) -> None:
        log.info(
            "draining: %d in-flight requests, grace %.1fs", self.servicer.num_inflight, grace_s
        )
        self.state.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.servicer.num_inflight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        cancelled = self.servicer.cancel_inflight()
        if cancelled:
            log.warning("grace period over: ending %d requests with UNAVAILABLE", cancelled)
        for _ in range(250):  # bounded: the cancelled streams close within a few ticks
            if not self.servicer.num_inflight:
                break
            await asyncio.sleep(0.02)
        if self._server is not None:
            await self._server.stop(grace=1.0)
        await asyncio.to_thread(self.loop.stop)
        self.servicer.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("server stopped")
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _session_ttl_s(engine, config: ServerConfig) -> float:
    """One session TTL, the engine's: the server forgets a session exactly when the engine
    unpins its KV, so a client is never told a session exists that has lost its cache."""
    ttl = float(engine.config.cache.session_ttl_s)
    if config.session_idle_timeout_s is not None and config.session_idle_timeout_s != ttl:
        raise ServerConfigError(
            f"session_idle_timeout_s must be None (the engine's session_ttl_s={ttl:g}) or equal "
            f"to it; got {config.session_idle_timeout_s} (set the engine's session_ttl_s instead)"
        )
    return ttl


def _schema_compiler(engine, config: ServerConfig) -> SchemaCompiler | None:
    """The engine's own structured-output compiler: gRPC and the offline API share one code path
    and one cache of compiled grammars. None when the tokenizer is unsupported."""
    compiler = engine.schema_compiler
    if compiler is None:
        log.warning("structured output disabled: %s", engine.structured_unavailable_reason)
    else:
        compiler.max_schema_bytes = config.limits.max_schema_bytes
        compiler.limits = dataclasses.replace(
            compiler.limits, max_schema_bytes=config.limits.max_schema_bytes
        )
    return compiler

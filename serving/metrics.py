"""Prometheus metrics of the server, named after the ecosystem's convention (`pijax:<name>`).

Per-request histograms are observed once, when a request finishes, from the engine's
`RequestTimings` (so they measure the engine, not the network). Engine-wide gauges and counters
(running, waiting, KV usage, preemptions, prefix-cache queries and hits by zone, ...) are read
at scrape time from the latest `EngineStats` snapshot the engine loop publishes, so scraping
never touches the engine, which belongs to its own thread.

Each server owns its `CollectorRegistry`, so several servers (tests) can live in one process.

The Kubernetes inference gateway's model-server protocol reads `pijax:num_requests_waiting`,
`pijax:num_requests_running`, `pijax:kv_cache_usage_perc` (0-1) and `pijax:cache_config_info`
(value 1, labels `block_size` and `num_gpu_blocks`); these, the latency histograms and the
vLLM-style counters (`pijax:prompt_tokens_total`, `pijax:generation_tokens_total`,
`pijax:request_success_total{finished_reason}`) carry a `model_name` label.
"""

from __future__ import annotations

import dataclasses
import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class ServingMetrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        model_name: str = "",
        cache_config: dict[str, int] | None = None,
    ):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.cache_config = dict(cache_config or {})  # block_size, num_gpu_blocks
        r = self.registry
        model = ["model_name"]

        def seconds(name: str, doc: str):
            h = Histogram(f"pijax:{name}", doc, model, buckets=LATENCY_BUCKETS, registry=r)
            return h.labels(model_name)

        def tokens(name: str, doc: str):
            h = Histogram(f"pijax:{name}", doc, model, buckets=TOKEN_BUCKETS, registry=r)
            return h.labels(model_name)

        self.ttft = seconds("time_to_first_token_seconds", "Arrival to first output token.")
        self.tpot = seconds(
            "time_per_output_token_seconds",
            "Mean gap between output tokens after the first, per request.",
        )
        self.itl = seconds("inter_token_latency_seconds", "Gap between consecutive output tokens.")
        self.queue_time = seconds("request_queue_time_seconds", "Arrival to first scheduled.")
        self.e2e = seconds("e2e_request_latency_seconds", "Arrival to finish.")
        self.prompt_tokens = tokens("request_prompt_tokens", "Prompt tokens per request.")
        self.cached_tokens = tokens(
            "request_cached_prompt_tokens", "Prompt tokens whose KV was reused, per request."
        )
        self.completion_tokens = tokens(
            "request_generation_tokens", "Completion tokens per request."
        )
        self.finished = Counter(
            "pijax:request_finished",
            "Finished requests by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.rpcs = Counter(
            "pijax:rpc_requests",
            "RPCs by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.prompt_tokens_total = Counter(
            "pijax:prompt_tokens", "Prompt tokens of finished requests.", model, registry=r
        ).labels(model_name)
        self.generation_tokens_total = Counter(
            "pijax:generation_tokens", "Generated tokens of finished requests.", model, registry=r
        ).labels(model_name)
        self.success = Counter(
            "pijax:request_success",
            "Requests that finished by stop or length, by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.malformed = Counter(
            "pijax:rpc_malformed_messages",
            "Authenticated requests whose message could not be parsed, by method.",
            ["method"],
            registry=r,
        )
        self._stats = None
        r.register(_EngineStatsCollector(self))

    def publish_engine_stats(self, stats) -> None:
        """Called by the engine loop; one reference assignment, read at scrape time."""
        self._stats = stats

    @property
    def engine_stats(self):
        return self._stats

    def observe_finished(self, output) -> None:
        reason = output.finish_reason.value if output.finish_reason is not None else "unknown"
        self.finished.labels(finish_reason=reason).inc()
        self.prompt_tokens_total.inc(output.num_prompt_tokens)
        self.generation_tokens_total.inc(len(output.token_ids))
        if reason in ("stop", "length"):
            self.success.labels(model_name=self.model_name, finished_reason=reason).inc()
        self.prompt_tokens.observe(output.num_prompt_tokens)
        self.cached_tokens.observe(output.num_cached_tokens)
        self.completion_tokens.observe(len(output.token_ids))
        t = output.timings
        if t is None:
            return
        for hist, value in (
            (self.ttft, t.ttft),
            (self.tpot, t.tpot),
            (self.queue_time, t.queue_time),
            (self.e2e, t.e2e),
        ):
            if value is not None:
                hist.observe(value)
        for gap in t.inter_token_latencies:
            self.itl.observe(gap)

    def count_rpc(self, method: str, code_name: str) -> None:
        self.rpcs.labels(method=method, code=code_name).inc()

    def count_malformed(self, method: str) -> None:
        self.malformed.labels(method=method).inc()


class _EngineStatsCollector:
    """Engine-wide series from the latest `EngineStats`; fields the engine lacks are skipped."""

    def __init__(self, metrics: ServingMetrics):
        self._metrics = metrics

    def describe(self):
        return list(self._families(None))

    def collect(self):
        return list(self._families(self._metrics.engine_stats))

    def _families(self, stats):
        s = (
            {}
            if stats is None
            else (
                dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(vars(stats))
            )
        )
        gauges = (
            ("num_requests_running", "num_running", "Requests running in the engine."),
            ("num_requests_waiting", "num_waiting", "Requests waiting in the engine's queue."),
            ("kv_cache_usage_perc", "pool_usage", "Share of usable KV pages in use (0-1)."),
            ("kv_cache_free_pages", "num_free_pages", "Free KV pages."),
            (
                "prefix_cache_pages",
                "pages_held_by_prefix_cache",
                "KV pages held by the prefix cache (unreferenced, evictable).",
            ),
            ("session_pages", "pages_held_by_sessions", "KV pages held by idle sessions."),
            (
                "kv_cache_waste_perc",
                "waste",
                "Allocated but unwritten KV slots over allocated slots, running requests (0-1).",
            ),
            ("compile_count", "compile_count", "Step-function compilations so far."),
        )
        model = [self._metrics.model_name]
        for name, field, doc in gauges:
            g = GaugeMetricFamily(f"pijax:{name}", doc, labels=["model_name"])
            if field in s:
                g.add_metric(model, float(s[field]))
            yield g
        cache = self._metrics.cache_config
        info = GaugeMetricFamily(
            "pijax:cache_config_info",
            "KV cache configuration (value 1): page size in tokens and usable page count.",
            labels=["model_name", "block_size", "num_gpu_blocks"],
        )
        if cache:
            info.add_metric(
                model + [str(cache.get("block_size", "")), str(cache.get("num_gpu_blocks", ""))],
                1.0,
            )
        yield info
        counters = (
            ("num_preemptions", "num_preemptions", "Preemptions by recompute."),
            (
                "prefix_cache_tokens_saved",
                "prefix_tokens_saved",
                "Prompt tokens not recomputed thanks to prefix reuse.",
            ),
        )
        for name, field, doc in counters:
            c = CounterMetricFamily(f"pijax:{name}", doc, labels=["model_name"])
            if field in s:
                c.add_metric(model, float(s[field]))
            yield c
        for name, field, doc in (
            ("prefix_cache_queries", "prefix_queries_by_zone", "Prefix-cache lookups by zone."),
            ("prefix_cache_hits", "prefix_hits_by_zone", "Prefix-cache hits by zone."),
        ):
            c = CounterMetricFamily(f"pijax:{name}", doc, labels=["model_name", "zone"])
            for zone, value in sorted((s.get(field) or {}).items()):
                c.add_metric(model + [str(zone)], float(value))
            yield c


def start_metrics_server(metrics: ServingMetrics, port: int, host: str = "127.0.0.1"):
    """Serve `/metrics` over HTTP; returns `(server, thread)`. Port 0 picks a free port
    (`server.server_port`)."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics at http://%s:%d/metrics", host, server.server_port)
    return server, thread

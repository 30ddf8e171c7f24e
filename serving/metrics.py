"""Prometheus metrics of the server, named after the ecosystem's convention (`pijax:<name>`).

Per-request histograms are observed once, when a request finishes, from the engine's
`RequestTimings` (so they measure the engine, not the network). Engine-wide gauges and counters
(running, waiting, KV usage, preemptions, prefix-cache queries and hits by zone, ...) are read
at scrape time from the latest `EngineStats` snapshot the engine loop publishes, so scraping
never touches the engine, which belongs to its own thread.

Each server owns its `CollectorRegistry`, so several servers (tests) can live in one process.
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
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry

        def seconds(name: str, doc: str) -> Histogram:
            return Histogram(f"pijax:{name}", doc, buckets=LATENCY_BUCKETS, registry=r)

        def tokens(name: str, doc: str) -> Histogram:
            return Histogram(f"pijax:{name}", doc, buckets=TOKEN_BUCKETS, registry=r)

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
        for name, field, doc in gauges:
            g = GaugeMetricFamily(f"pijax:{name}", doc)
            if field in s:
                g.add_metric([], float(s[field]))
            yield g
        counters = (
            ("num_preemptions", "num_preemptions", "Preemptions by recompute."),
            (
                "prefix_cache_tokens_saved",
                "prefix_tokens_saved",
                "Prompt tokens not recomputed thanks to prefix reuse.",
            ),
        )
        for name, field, doc in counters:
            c = CounterMetricFamily(f"pijax:{name}", doc)
            if field in s:
                c.add_metric([], float(s[field]))
            yield c
        for name, field, doc in (
            ("prefix_cache_queries", "prefix_queries_by_zone", "Prefix-cache lookups by zone."),
            ("prefix_cache_hits", "prefix_hits_by_zone", "Prefix-cache hits by zone."),
        ):
            c = CounterMetricFamily(f"pijax:{name}", doc, labels=["zone"])
            for zone, value in sorted((s.get(field) or {}).items()):
                c.add_metric([str(zone)], float(value))
            yield c


def start_metrics_server(metrics: ServingMetrics, port: int, host: str = "127.0.0.1"):
    """Serve `/metrics` over HTTP; returns `(server, thread)`. Port 0 picks a free port
    (`server.server_port`)."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics at http://%s:%d/metrics", host, server.server_port)
    return server, thread

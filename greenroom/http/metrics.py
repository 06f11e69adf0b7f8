"""Prometheus metrics with vLLM's names under the `greenroom:` prefix.

Request-level series (latency histograms, token and finish-reason counters) are measured in the
HTTP processes; with several processes they live in prometheus_client's multiprocess files
(PROMETHEUS_MULTIPROC_DIR, set by the launcher) and a scrape sums them. Node-level series
(running and waiting requests, KV use, prefix-cache queries and hits) come from the node's stats
query at scrape time.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from greenroom.bus.messages import NodeStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class HttpMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        kw = {"registry": self.registry}
        self.request_success = Counter(
            "greenroom:request_success",
            "Requests that finished, by finish reason.",
            [*labels, "finished_reason"],
            **kw,
        )
        self.request_failure = Counter(
            "greenroom:request_failure",
            "Requests that ended with an error, by error kind.",
            [*labels, "kind"],
            **kw,
        )
        self.prompt_tokens = Counter(
            "greenroom:prompt_tokens", "Prompt tokens of finished requests.", labels, **kw
        )
        self.generation_tokens = Counter(
            "greenroom:generation_tokens", "Generated tokens.", labels, **kw
        )

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, **kw)

        self.ttft = hist(
            "greenroom:time_to_first_token_seconds",
            "Time from request arrival to its first token.",
            _LATENCY_BUCKETS,
        )
        self.itl = hist(
            "greenroom:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            _LATENCY_BUCKETS,
        )
        self.e2e = hist(
            "greenroom:e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            _LATENCY_BUCKETS,
        )
        self.queue = hist(
            "greenroom:request_queue_time_seconds",
            "Time a request waited before the scheduler admitted it.",
            _LATENCY_BUCKETS,
        )
        self.prompt_len = hist(
            "greenroom:request_prompt_tokens", "Prompt length of finished requests.", _TOKEN_BUCKETS
        )
        self.output_len = hist(
            "greenroom:request_generation_tokens",
            "Output length of finished requests.",
            _TOKEN_BUCKETS,
        )

        # children for this model, looked up once (labels() takes a lock per call)
        m = [model_name]
        self.prompt_tokens_m = self.prompt_tokens.labels(*m)
        self.generation_tokens_m = self.generation_tokens.labels(*m)
        self.ttft_m, self.itl_m, self.e2e_m = (
            h.labels(*m) for h in (self.ttft, self.itl, self.e2e)
        )
        self.queue_m = self.queue.labels(*m)
        self.prompt_len_m, self.output_len_m = (
            self.prompt_len.labels(*m),
            self.output_len.labels(*m),
        )

    def render(self, node: NodeStats | None) -> bytes:
        """The text exposition: this server's series (all processes) and the node's."""
        if multiprocess():
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            text = generate_latest(merged)
        else:
            text = generate_latest(self.registry)
        if node is not None:
            text += generate_latest(_NodeCollector(node, self.model_name).registry())
        return text


class _NodeCollector:
    def __init__(self, stats: NodeStats, model_name: str) -> None:
        self.stats = stats
        self.model_name = model_name

    def registry(self) -> CollectorRegistry:
        reg = CollectorRegistry()
        reg.register(self)
        return reg

    def collect(self):
        s, m = self.stats, [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(m, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(m, value)
            return c

        used = s.kv_total_blocks - s.kv_free_blocks
        yield gauge(
            "greenroom:num_requests_running", "Requests admitted by the scheduler.", s.running
        )
        yield gauge("greenroom:num_requests_waiting", "Requests waiting for admission.", s.waiting)
        yield gauge(
            "greenroom:kv_cache_usage_perc",
            "Fraction of KV blocks in use (1 = full).",
            used / s.kv_total_blocks if s.kv_total_blocks else 0.0,
        )
        yield counter(
            "greenroom:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            s.prefix_query_blocks * s.tokens_per_block,
        )
        yield counter(
            "greenroom:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            s.prefix_hit_blocks * s.tokens_per_block,
        )

"""Prometheus metrics of the server: vLLM-equivalent series under the `kvwise:` prefix.

Owns: one `CollectorRegistry` per app (no global registry, so tests can build many apps), the
latency histograms fed per request by `RequestTracker`, and a collector that turns the engine's
latest `stats()` snapshot into gauges and counters at scrape time.

Series (label `model_name` on all):
- histograms: time_to_first_token_seconds, inter_token_latency_seconds,
  e2e_request_latency_seconds, request_queue_time_seconds, request_prompt_tokens,
  request_generation_tokens
- gauges (engine snapshot): num_requests_running, num_requests_waiting, kv_cache_usage_perc,
  num_blocks_used, num_blocks_total, kv_cache_bytes_per_block, kv_cache_bytes_used,
  prefix_cache_shared_blocks, prefix_cache_private_blocks,
  prefix_cache_cached_blocks, prefix_cache_pinned_blocks
- counters (engine snapshot): prompt_tokens_total, generation_tokens_total,
  num_preemptions_total, prefix_cache_queries_total, prefix_cache_hits_total
- counters (front end): request_success_total{finished_reason}, request_rejected_total{reason}

Invariants:
- Engine-owned counts are read from the engine's own counters, never re-counted here.
- A request is observed at most once in the per-request histograms (`RequestTracker.finish`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvwise.outputs import RequestOutput

PREFIX = "kvwise:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class _EngineStatsCollector(Collector):
    """Reads the engine's latest stats snapshot at scrape time."""

    _GAUGES = (("num_requests_running", "num_running", "Sequences running in the engine."),
               ("num_requests_waiting", "num_waiting", "Sequences waiting to be scheduled."),
               ("kv_cache_usage_perc", "kv_usage", "Fraction of KV blocks in use (0..1)."),
               ("num_blocks_used", "num_blocks_used", "KV blocks referenced by requests."),
               ("num_blocks_total", "num_blocks_total", "KV blocks in the pool."),
               ("kv_cache_bytes_per_block", "kv_bytes_per_block",
                "Bytes one KV block takes in the cache's format (all layers, K and V)."),
               ("kv_cache_bytes_used", "kv_bytes_used",
                "Bytes of KV held: used blocks plus the format's side storage."),
               ("kv_cache_entries_kept", "kv_entries_kept",
                "KV entries (token x layer x KV head) the running requests keep."),
               ("kv_cache_entries_full", "kv_entries_full",
                "KV entries the running requests would hold uncompressed."),
               ("kv_cache_kept_ratio", "kv_kept_ratio",
                "kv_cache_entries_kept / kv_cache_entries_full (1 when nothing is compressed)."),
               ("prefix_cache_shared_blocks", "shared_blocks",
                "KV blocks held by more than one running request (shared prefix chunks)."),
               ("prefix_cache_private_blocks", "private_blocks",
                "KV blocks held by exactly one running request."),
               ("prefix_cache_cached_blocks", "num_blocks_cached",
                "Unreferenced prefix chunks kept cached (evictable)."),
               ("prefix_cache_pinned_blocks", "num_blocks_pinned",
                "Unreferenced prefix chunks kept by pin_prefix."))
    _COUNTERS = (("prompt_tokens", "prompt_tokens_total", "Prefill tokens processed."),
                 ("generation_tokens", "generation_tokens_total", "Tokens generated."),
                 ("num_preemptions", "num_preemptions", "Preemptions by recompute."),
                 ("prefix_cache_queries", "prefix_query_tokens", "Prompt tokens looked up."),
                 ("prefix_cache_hits", "prefix_hit_tokens", "Prompt tokens found cached."))

    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self.stats()
        for name, key, doc in self._GAUGES:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric([self.model_name], float(stats.get(key, 0) or 0))
            yield g
        for name, key, doc in self._COUNTERS:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric([self.model_name], float(stats.get(key, 0) or 0))
            yield c


class ServingMetrics:
    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets,
                             registry=self.registry)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between two output tokens.",
                        _LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.",
                          _LATENCY_BUCKETS)
        self.prompt_tokens = hist("request_prompt_tokens", "Prompt tokens per request.",
                                  _TOKEN_BUCKETS)
        self.generation_tokens = hist("request_generation_tokens",
                                      "Generated tokens per request.", _TOKEN_BUCKETS)
        self.success = Counter(PREFIX + "request_success", "Finished requests.",
                               labels + ["finished_reason"], registry=self.registry)
        self.rejected = Counter(PREFIX + "request_rejected", "Requests refused before running.",
                                labels + ["reason"], registry=self.registry)
        self.registry.register(_EngineStatsCollector(model_name, stats))

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Per-request latency bookkeeping from the cumulative outputs a consumer sees."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.m = metrics
        self.seen: dict[int, int] = {}  # sibling index -> tokens already observed
        self.last_token_time: Optional[float] = None
        self.last: Optional[RequestOutput] = None
        self.done = False

    def update(self, out: RequestOutput) -> None:
        self.last = out
        met = out.metrics
        steps = 0  # decode steps since the last update ~ the most new tokens of any sibling
        for c in out.outputs:
            steps = max(steps, len(c.token_ids) - self.seen.get(c.index, 0))
            self.seen[c.index] = len(c.token_ids)
        if steps <= 0 or met.last_token_time is None:
            return
        name = self.m.model_name
        if self.last_token_time is None:
            if met.ttft is not None:
                self.m.ttft.labels(name).observe(max(met.ttft, 0.0))
            steps -= 1
            prev = met.first_token_time
        else:
            prev = self.last_token_time
        if steps > 0 and prev is not None:
            gap = max(met.last_token_time - prev, 0.0) / steps
            for _ in range(steps):
                self.m.itl.labels(name).observe(gap)
        self.last_token_time = met.last_token_time

    def finish(self, reason: Optional[str] = None) -> None:
        """Record the request's end; `reason` overrides the engine's (e.g. "abort")."""
        if self.done:
            return
        self.done = True
        out, name = self.last, self.m.model_name
        if out is None:
            self.m.success.labels(name, reason or "abort").inc()
            return
        met = out.metrics
        if reason is None:
            reasons = [c.finish_reason for c in out.outputs if c.finish_reason]
            reason = reasons[0] if reasons else "abort"
        self.m.success.labels(name, reason).inc()
        if met.queue_time is not None:
            self.m.queue.labels(name).observe(max(met.queue_time, 0.0))
        if met.e2e is not None:
            self.m.e2e.labels(name).observe(max(met.e2e, 0.0))
        self.m.prompt_tokens.labels(name).observe(len(out.prompt_token_ids))
        self.m.generation_tokens.labels(name).observe(sum(self.seen.values()))

"""Prometheus metrics of a server, on their own registry and HTTP port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rnngen_requests", "Generate calls by model and final status", ["model", "status"], registry=r)
        self.interrupted = Counter("rnngen_interrupted_streams", "Streams handed back with a session token by a stopping server",
                                   ["model"], registry=r)
        self.active = Gauge("rnngen_active_streams", "Streams decoding now", ["model"], registry=r)
        self.queued = Gauge("rnngen_queued_requests", "Accepted streams waiting for a row", ["model"], registry=r)
        self.generated = Counter("rnngen_generated_tokens", "Tokens generated (rate() gives tokens/s)", ["model"], registry=r)
        self.ttft = Histogram("rnngen_time_to_first_token_seconds", "From request to first text", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("rnngen_inter_token_latency_seconds", "Between consecutive messages of a stream", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prefix_hits = Counter("rnngen_prefix_cache_hits", "Prompts that started from a cached prefix state", ["model"],
                                   registry=r)
        self.prefix_misses = Counter("rnngen_prefix_cache_misses", "Prompts prefilled from their first token", ["model"],
                                     registry=r)
        self.prefix_hit_tokens = Counter("rnngen_prefix_cache_hit_tokens", "Prompt tokens not prefilled thanks to the cache",
                                         ["model"], registry=r)
        self.prefix_cache_bytes = Gauge("rnngen_prefix_cache_bytes", "Bytes of states and logits in the prefix cache",
                                        ["model"], registry=r)
        self._last_load: dict[str, tuple[int, int]] = {}  # per model: the gauges' values, set only when they change
        self._generated_of: dict = {}  # per model: its labelled counter (the label lookup costs more than the increment)
        self.wait = Histogram("rnngen_queue_wait_seconds", "From the request accepted (before its prefill) to joining the batch", buckets=LATENCY_BUCKETS, registry=r)

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics; returns (server, thread) from prometheus_client."""
        return start_http_server(port, addr=host, registry=self.registry)

    # Hooks called by the scheduler and the servicer.
    # load and tokens run on a decoding thread after every step: cheap when nothing changed.
    def load(self, model: str, active: int, queued: int) -> None:
        if self._last_load.get(model) != (active, queued):
            self._last_load[model] = (active, queued)
            self.active.labels(model).set(active)
            self.queued.labels(model).set(queued)

    def tokens(self, model: str, n: int) -> None:
        counter = self._generated_of.get(model)
        if counter is None:
            counter = self._generated_of[model] = self.generated.labels(model)
        counter.inc(n)

    def queue_wait(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def prefix_lookup(self, model: str, cached_tokens: int) -> None:
        if cached_tokens:
            self.prefix_hits.labels(model).inc()
            self.prefix_hit_tokens.labels(model).inc(cached_tokens)
        else:
            self.prefix_misses.labels(model).inc()

    def prefix_bytes(self, model: str, size: int) -> None:
        self.prefix_cache_bytes.labels(model).set(size)

"""Prometheus metrics of the server (prometheus_client, one registry per app)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineStats:
    """Every `engine.stats()` entry as a gauge `jinavlm_engine_<name>` (requests finished by reason,
    images encoded, vision-cache hits, ...), read at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        for name, value in sorted(self.engine.stats().items()):
            yield GaugeMetricFamily(f"jinavlm_engine_{name}", f"engine.stats()['{name}']", value=float(value))


class ServerMetrics:
    """Requests by status, prompt / generated tokens, queue depth, busy slots, time to first token,
    inter-token latency and request latency."""

    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        p = "jinavlm_"
        self.requests = Counter(p + "requests", "Chat-completion requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of completed requests", registry=r)
        self.generated_tokens = Counter(p + "generated_tokens", "Tokens generated for completed requests",
                                        registry=r)
        Gauge(p + "queue_depth", "Requests waiting for a decode slot", registry=r).set_function(
            lambda: engine.stats()["waiting"])
        Gauge(p + "busy_slots", "Decode slots holding a request", registry=r).set_function(
            lambda: engine.stats()["busy_slots"])
        Gauge(p + "decode_slots", "Decode slots (--max-batch)", registry=r).set(engine.max_batch)
        r.register(_EngineStats(engine))
        self.ttft = Histogram(p + "time_to_first_token_seconds", "From request receipt to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(p + "request_latency_seconds", "From request receipt to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float, tokens: int) -> None:
        for _ in range(max(tokens, 1)):
            self.itl.observe(seconds / max(tokens, 1))

    def request_done(self, status: str, out=None, seconds: float | None = None) -> None:
        self.requests.labels(status=status).inc()
        if out is not None:
            self.prompt_tokens.inc(out.prompt_tokens)
            self.generated_tokens.inc(out.completion_tokens)
        if seconds is not None:
            self.e2e.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

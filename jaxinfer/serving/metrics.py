"""Prometheus metrics of one server, in its own CollectorRegistry (two apps in one process, as in the
tests, never share counters). Per-replica gauges are read from the backend when /metrics is scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Seconds: CPU runs sit at the top, an H100 at the bottom.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _Replicas:
    """A collector of the backend's per-replica state, read at scrape time."""

    GAUGES = {
        "running": ("jaxinfer_running_requests", "Requests running (holding a batch slot)."),
        "waiting": ("jaxinfer_waiting_requests", "Requests queued for a slot."),
        "kv_pages_used": ("jaxinfer_kv_cache_pages_used", "KV-cache pages held by requests."),
        "kv_pages_total": ("jaxinfer_kv_cache_pages_total", "KV-cache pages in the pool."),
        "prefix_cache_hit_rate": ("jaxinfer_prefix_cache_hit_rate", "Prompt tokens served from cached pages."),
        "outstanding_tokens": ("jaxinfer_outstanding_tokens", "Prompt and new tokens still to run."),
    }

    def __init__(self, backend):
        self.backend = backend

    def collect(self):
        families = {k: GaugeMetricFamily(name, doc, labels=["replica"]) for k, (name, doc) in self.GAUGES.items()}
        for s in self.backend.stats():
            for k, family in families.items():
                family.add_metric([str(s["id"])], float(s.get(k, 0)))
        up = GaugeMetricFamily("jaxinfer_replica_up", "1 when the replica takes requests.", labels=["replica"])
        for r in self.backend.health()["replicas"]:
            up.add_metric([str(r["id"])], 1.0 if r["up"] else 0.0)
        yield from families.values()
        yield up


class Metrics:
    def __init__(self, backend):
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "jaxinfer_requests", "HTTP requests by route and status.", ["route", "status"], registry=reg
        )
        self.prompt_tokens = Counter("jaxinfer_prompt_tokens", "Prompt tokens of the requests run.", registry=reg)
        self.generation_tokens = Counter("jaxinfer_generation_tokens", "Tokens generated.", registry=reg)
        self.ttft = Histogram(
            "jaxinfer_time_to_first_token_seconds",
            "From arrival to the first token.",
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "jaxinfer_inter_token_latency_seconds",
            "Between the tokens of one request.",
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "jaxinfer_request_latency_seconds", "From arrival to the last token.", buckets=TTFT_BUCKETS, registry=reg
        )
        reg.register(_Replicas(backend))

    def render(self) -> bytes:
        return generate_latest(self.registry)

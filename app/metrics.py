"""Prometheus metrics, one registry per app (so several apps in one process never collide).

One process is one replica: each exports its own, and Prometheus sums over replicas. The gauges
an autoscaler can follow (deploy/k8s/README.md): `genserve_queue_items` (items waiting per batcher,
read at scrape time) and `genserve_requests_in_progress` (HTTP requests being handled).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # any other method counts as "other"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "genserve_requests", "HTTP requests by endpoint, method and status", ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "genserve_request_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # _count is the number of forward passes, _sum the items they computed: mean batch size = sum / count.
        self.batch_size = Histogram(
            "genserve_batch_size", "items per forward pass (padding excluded)", ["batcher"], buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "genserve_inference_seconds", "forward pass latency", ["batcher"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_failures = Counter(
            "genserve_batch_failures", "forward passes that raised", ["batcher"], registry=self.registry
        )
        self.queue_items = Gauge(
            "genserve_queue_items", "items waiting in each batcher's queue", ["batcher"], registry=self.registry
        )
        self.requests_in_progress = Gauge(
            "genserve_requests_in_progress", "HTTP requests being handled", registry=self.registry
        )

    def observe_batch(self, batcher: str, items: int, seconds: float, ok: bool) -> None:
        if ok:
            self.batch_size.labels(batcher).observe(items)
            self.inference_seconds.labels(batcher).observe(seconds)
        else:
            self.batch_failures.labels(batcher).inc()

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """endpoint: a route template or "unmatched"; an unknown method counts as "other"; status 499:
        the client disconnected before the answer."""
        self.requests.labels(endpoint, method if method in METHODS else "other", str(status)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def render(self, queues: Mapping[str, int] | None = None) -> bytes:
        """The text format; `queues` (batcher -> items waiting) sets genserve_queue_items first,
        dropping the batchers that are gone (a model removed while serving)."""
        if queues is not None:
            self.queue_items.clear()
            for batcher, items in queues.items():
                self.queue_items.labels(batcher).set(items)
        return generate_latest(self.registry)

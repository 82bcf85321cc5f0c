"""``microgpt serve``'s Prometheus metrics, shared by its HTTP process and its inference workers.

prometheus-client's multiprocess mode keeps every process's values in files under ``PROMETHEUS_MULTIPROC_DIR``;
``serve`` sets it before this module is first imported (the library reads it then), and ``/metrics`` sums them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REQUESTS = Counter("microgpt_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"])
NAMES = Counter("microgpt_names", "Names drawn and sent (or scored), by endpoint and status", ["endpoint", "status"])
LATENCY = Histogram("microgpt_request_seconds", "Seconds from a request's arrival to the end of its answer",
                    ["endpoint"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BATCH = Histogram("microgpt_batch_requests", "Requests an inference worker handled together in one batch",
                  ["endpoint"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


class Waiting:
    """``microgpt_requests_waiting``: requests queued for an inference worker, read from the queues when scraped."""

    def __init__(self, queues: dict):
        self.queues = queues

    def collect(self):
        gauge = GaugeMetricFamily("microgpt_requests_waiting", "Requests queued for an inference worker",
                                  labels=["endpoint"])
        for path, queue in self.queues.items():
            try:
                waiting = queue.qsize()
            except (OSError, EOFError, NotImplementedError):  # the queue's process is gone: shutting down
                continue
            gauge.add_metric([path], waiting)
        yield gauge


def exposition(queues: dict) -> bytes:
    """Every process's metrics and the queues' lengths, in Prometheus' text format."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(Waiting(queues))
    return generate_latest(registry)

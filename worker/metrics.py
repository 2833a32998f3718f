"""The worker's Prometheus metrics, served on ``TOKENRELAY_METRICS_PORT`` at ``/metrics``.

The server is prometheus_client's own (a thread, a greenlet under gevent's monkey-patching), so
it never blocks the streams. Names are the dashboard's contract (``ops/grafana``).
"""

from __future__ import annotations

import logging
from typing import Final

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("tokenrelay.worker")

_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

JOBS_FINISHED: Final = Counter(
    "tokenrelay_jobs_finished_total", "Jobs ended, by terminal status", ["status"]
)
TOKENS: Final = Counter("tokenrelay_tokens_published_total", "Token events published to Redis")
TTFT: Final = Histogram(
    "tokenrelay_time_to_first_token_seconds",
    "From taking a job to its first token from the upstream",
    buckets=_LATENCY_BUCKETS,
)
GAP: Final = Histogram(
    "tokenrelay_inter_token_gap_seconds",
    "Time between consecutive upstream reads that carried tokens",
    buckets=_LATENCY_BUCKETS,
)
ACTIVE: Final = Gauge("tokenrelay_active_streams", "Jobs this worker is streaming now")
UPSTREAM_ERRORS: Final = Counter(
    "tokenrelay_upstream_errors_total", "Jobs ended by an upstream failure, by code", ["code"]
)
RETRIES: Final = Counter(
    "tokenrelay_upstream_retries_total",
    "Upstream requests retried, by the failure's code",
    ["code"],
)
RESTARTS: Final = Counter("tokenrelay_restarts_total", "Attempts after the first (restart events)")
TAKEOVERS: Final = Counter(
    "tokenrelay_takeovers_total", "Jobs of dead workers re-enqueued by this worker's reaper"
)
REQUEUED: Final = Counter(
    "tokenrelay_requeued_total",
    "Jobs put on the queue again after waiting unclaimed past the queued grace (lost messages)",
)
PUBLISH: Final = Histogram(
    "tokenrelay_publish_seconds",
    "Round trip of one publish to Redis (a batch of events)",
    buckets=_LATENCY_BUCKETS,
)


def serve(port: int) -> bool:
    """Start the metrics endpoint; a taken port is logged, not fatal (metrics are optional)."""
    if port <= 0:
        return False
    try:
        start_http_server(port)
    except OSError as exc:
        log.warning("metrics endpoint not started on port %d: %s", port, exc.strerror)
        return False
    log.info("metrics on http://0.0.0.0:%d/metrics", port)
    return True

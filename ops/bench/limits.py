"""The limits every result is compared with, measured in the same run on the same machine."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import redis

from ops.bench.config import BenchConfig
from ops.bench.fleet import BenchFleet
from ops.bench.redis_limits import (
    LogCost,
    log_costs,
    pipelined_publish,
    pubsub_hop,
    redis_benchmark_publish,
    unlimited_pubsub_buffers,
)
from ops.bench.stats import Summary
from ops.bench.upstream_limits import RawUpstream, parse_rates, raw_upstream, sample_body
from producer.devservers import RedisServer

LOG_COST_METHODS = ("publish", "lua-publish", "lua-xadd-publish")
#: The pub/sub hop is timed at the paced scenarios' pace: one message per 20 ms.
HOP_INTERVAL_S = 0.02


@dataclass
class Limits:
    # redis-benchmark PUBLISH, messages/s, by setup
    redis_benchmark: dict[str, float | None] = field(default_factory=dict)
    redis_py_publish: float | None = None  # redis-py, one connection, 100 per pipeline
    log_costs: list[LogCost] = field(default_factory=list)
    raw_upstream: dict[str, RawUpstream] = field(default_factory=dict)  # by scenario key
    parse: dict[tuple[str, str], float] = field(default_factory=dict)  # (counter, chunking)
    pubsub_hop: Summary | None = None  # ms, PUBLISH to a subscriber process, at an idle pace

    @property
    def redis_publish(self) -> float | None:
        """Redis's own PUBLISH rate with a subscriber, pipelined: the ceiling of any relay."""
        return self.redis_benchmark.get("PUBLISH, 1 subscriber, -P 100, 50 clients")

    def parse_rate(self, chunking: str) -> float | None:
        return self.parse.get(("parse_stream deltas", chunking))

    def log_cost(self, method: str, batch: int, depth: int = 1) -> LogCost | None:
        found = [
            c
            for c in self.log_costs
            if c.method == method and c.batch == batch and c.depth == depth
        ]
        return found[0] if found else None


def measure_redis(cfg: BenchConfig, workdir: Path, limits: Limits) -> None:
    """On a private redis-server of its own, so nothing else runs on it meanwhile."""
    if not (
        cfg.redis_benchmark_requests
        or cfg.publish_messages
        or cfg.log_cost_batches
        or cfg.pubsub_hop_messages
    ):
        return
    (workdir / "redis-limits").mkdir(parents=True, exist_ok=True)
    server = RedisServer(directory=workdir / "redis-limits").start()
    try:
        port, n = server.port, cfg.redis_benchmark_requests
        unlimited_pubsub_buffers(port)
        if n:
            setups = {
                "PUBLISH, no subscriber, -P 100, 50 clients": (100, n, False),
                "PUBLISH, 1 subscriber, -P 100, 50 clients": (100, n, True),
                "PUBLISH, 1 subscriber, -P 1, 50 clients": (1, max(1, n // 10), True),
            }
            for label, (pipeline, requests, subscribed) in setups.items():
                limits.redis_benchmark[label] = redis_benchmark_publish(
                    port, pipeline=pipeline, requests=requests, subscribed=subscribed
                )
        if cfg.publish_messages:
            client = redis.Redis(port=port, socket_timeout=30)
            try:
                limits.redis_py_publish = pipelined_publish(
                    client, batch=100, total=cfg.publish_messages
                )
            finally:
                client.close()
        if cfg.log_cost_batches:
            limits.log_costs = log_costs(
                port,
                cfg.log_cost_batches,
                cfg.log_cost_tokens,
                LOG_COST_METHODS,
                pipelined=cfg.log_cost_pipelined,
            )
        if cfg.pubsub_hop_messages:
            limits.pubsub_hop = pubsub_hop(port, workdir, cfg.pubsub_hop_messages, HOP_INTERVAL_S)
    finally:
        server.stop()


def measure_upstream(cfg: BenchConfig, fleet: BenchFleet, limits: Limits) -> None:
    if cfg.parse_bodies:
        body = sample_body(fleet.mock_url)
        limits.parse = parse_rates(body, cfg.parse_bodies, cfg.parse_repeats)
    if cfg.raw_upstream:
        for scenario in cfg.live:
            # A worker with fewer slots than lanes streams at most its slots at once: so does
            # the bare client it is compared with.
            load = scenario.load
            if load.slots:
                load = replace(load, concurrency=load.slots)
            limits.raw_upstream[scenario.key] = raw_upstream(fleet.mock_url, load)

"""What a bench run measures: the full run (``make bench``) and the smoke run (``--quick``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ops.bench.fanout import FanoutSpec
from ops.bench.readers import Load

TOKENS = 200  # tokens per job in the full run


@dataclass(frozen=True)
class LiveScenario:
    load: Load
    runs: int  # repetitions; the table shows medians

    @property
    def key(self) -> str:
        return self.load.key

    @property
    def estimate_s(self) -> float:
        """Rough wall time, for the time budget: worker start, warm-up, the runs, the drain."""
        one = self.load.duration_s or self.load.tokens * self.load.delay_ms / 1000 + 1
        return 4 + self.runs * one * 1.5


@dataclass(frozen=True)
class BenchConfig:
    live: tuple[LiveScenario, ...]
    late_readers: tuple[int, ...]  # concurrent late readers, one job each
    fanout: tuple[FanoutSpec, ...]
    # limits
    raw_upstream: bool
    redis_benchmark_requests: int
    publish_messages: int
    log_cost_batches: tuple[int, ...]
    log_cost_tokens: int
    log_cost_pipelined: int  # calls per round trip in the flusher-like setup (0: not measured)
    pubsub_hop_messages: int  # PUBLISH -> subscriber latency at an idle pace (0: not measured)
    parse_bodies: int
    parse_repeats: int
    profile: bool
    # the fleet
    worker_concurrency: int = 600
    mock_processes: int = 2
    redis_pool: int = 0  # >0: max_connections=N in the worker's Redis URL; 0: as it sets it
    budget_s: float = 560.0
    smoke: bool = False

    @classmethod
    def full(cls) -> BenchConfig:
        loop = {1: (3.0, 0.5, 3), 10: (4.0, 1.0, 3), 100: (6.0, 1.5, 1), 500: (8.0, 2.5, 1)}
        waves = {1: 3, 10: 3, 100: 2, 500: 2}
        live = [
            LiveScenario(Load(c, 0, TOKENS, duration, warmup), runs)
            for c, (duration, warmup, runs) in loop.items()
        ] + [LiveScenario(Load(c, 20, TOKENS), runs) for c, runs in waves.items()]
        # The same full-speed load as 100 x 0 with the log left out: the log's end-to-end cost.
        duration, warmup, runs = loop[100]
        live.append(LiveScenario(Load(100, 0, TOKENS, duration, warmup, without_log=True), runs))
        # The 500-stream wave again on two worker processes: how the figures scale with workers.
        live.append(LiveScenario(Load(500, 20, TOKENS, workers=2), waves[500]))
        # A worker at capacity: short jobs from twice as many lanes as it has slots, so a job
        # waits in the queue for every slot that frees up.
        live.append(LiveScenario(Load(200, 0, 20, 5.0, 1.0, slots=100), 1))
        return cls(
            live=tuple(live),
            late_readers=(100, 500),
            fanout=(
                FanoutSpec(1000, 20, 1000, 10),
                FanoutSpec(1000, 20, 200, 50),
                FanoutSpec(1000, 20, 50, 100),
                FanoutSpec(1000, 20, 1000, 10, spread=True),
                FanoutSpec(1000, 20, 200, 50, spread=True),
            ),
            raw_upstream=True,
            redis_benchmark_requests=2_000_000,
            publish_messages=200_000,
            log_cost_batches=(1, 10, 100),
            log_cost_tokens=20_000,
            log_cost_pipelined=100,
            pubsub_hop_messages=200,
            parse_bodies=50,
            parse_repeats=3,
            profile=True,
        )

    @classmethod
    def quick(cls) -> BenchConfig:
        """The smoke run: a few seconds, for correctness (nothing lost), not speed."""
        return cls(
            live=(
                LiveScenario(Load(5, 0, 20), 1),
                LiveScenario(Load(5, 20, 20), 1),
            ),
            late_readers=(5,),
            fanout=(FanoutSpec(10, 2, 20, 20),),
            raw_upstream=True,
            redis_benchmark_requests=20_000,
            publish_messages=2_000,
            log_cost_batches=(1, 10),
            log_cost_tokens=1_000,
            log_cost_pipelined=10,
            pubsub_hop_messages=10,
            parse_bodies=2,
            parse_repeats=1,
            profile=False,
            worker_concurrency=20,
            mock_processes=1,
            budget_s=60.0,
            smoke=True,
        )

    def only(self, keys: set[str]) -> BenchConfig:
        """The same run restricted to some scenarios (``1x0``, ``500x20``, ``late``, ``fanout``,
        ``limits``, ``profile``)."""
        return replace(
            self,
            live=tuple(s for s in self.live if s.key in keys),
            late_readers=self.late_readers if "late" in keys else (),
            fanout=self.fanout if "fanout" in keys else (),
            raw_upstream=self.raw_upstream and "limits" in keys,
            redis_benchmark_requests=self.redis_benchmark_requests if "limits" in keys else 0,
            publish_messages=self.publish_messages if "limits" in keys else 0,
            log_cost_batches=self.log_cost_batches if "limits" in keys else (),
            pubsub_hop_messages=self.pubsub_hop_messages if "limits" in keys else 0,
            parse_bodies=self.parse_bodies if "limits" in keys else 0,
            profile=self.profile and "profile" in keys,
        )

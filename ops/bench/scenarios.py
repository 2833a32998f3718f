"""The scenarios: live jobs followed with the producer library, and late readers of finished ones.
Each live scenario gets a fresh worker, so its CPU and memory are its own."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from ops.bench.fleet import BenchFleet
from ops.bench.procstat import CpuMeter, RssSampler, rss_kib
from ops.bench.readers import PROBLEMS, Load, Tally, drive, follow_one, late_reads
from ops.bench.stats import Summary, median
from producer.aio import AsyncClient
from producer.heap import freeze_startup

log = logging.getLogger("tokenrelay.bench")
WARMUP_JOB = Load(1, 0, 10)
READER_CONNECTIONS = 32


@dataclass
class Counts:
    """Correctness over every job of a scenario."""

    jobs: int = 0
    tokens: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    foreign: int = 0
    restarts: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, tally: Tally) -> None:
        self.jobs += tally.jobs
        self.tokens += tally.tokens
        self.failed += tally.failed
        self.lost += tally.lost
        self.duplicated += tally.duplicated
        self.reordered += tally.reordered
        self.foreign += tally.foreign
        self.restarts += tally.restarts
        self.failures += tally.failures[: 5 - len(self.failures)]

    @property
    def clean(self) -> bool:
        return self.jobs > 0 and sum(getattr(self, name) for name in PROBLEMS) == 0


@dataclass
class LiveResult:
    load: Load
    runs: int
    rate: float | None  # median over runs, tokens/s
    latency: Summary  # per-token added latency, ms (medians over runs)
    ttft: Summary  # added time to first token, ms (medians over runs)
    queued: Summary  # of it, from the job's creation to its claim by the worker, ms
    stream_rate: float | None  # median tokens/s of one stream
    counts: Counts
    cpu: dict[str, float]  # cores busy while tokens flowed, per process
    cpu_ms_per_1k: dict[str, float]  # CPU ms per 1,000 tokens, per process
    rss_idle_kib: int
    rss_peak_kib: int
    wall_s: float
    job_ids: list[str]
    worker_problems: dict[str, int]  # what the worker's log reports, by kind
    peak_streams: int = 0  # the most jobs streaming at once (max over runs)
    # Paced waves: per-token latency while every job streamed (without the wave's starts).
    steady_latency: Summary | None = None

    @property
    def rss_per_stream_kib(self) -> float:
        """RSS growth of the (first) worker per stream it held at the peak."""
        streams = (self.peak_streams or self.load.concurrency) / self.load.workers
        return (self.rss_peak_kib - self.rss_idle_kib) / max(1.0, streams)


def run_live(fleet: BenchFleet, load: Load, runs: int, concurrency: int) -> LiveResult:
    """``runs`` repetitions of ``load`` on a fresh worker with ``concurrency`` greenlets."""
    worker = fleet.start_worker(concurrency, without_log=load.without_log, count=load.workers)
    result = asyncio.run(_live(fleet, worker.pid, load, runs))
    result.worker_problems = worker_problems(fleet.worker_log())
    return result


_EXCEPTION = re.compile(r"^(?:[a-z_]+\.)*([A-Z]\w*(?:Error|Exception)): ")
_LOG_SIGNS = {
    "lease lapsed, job re-enqueued": "stopped renewing the lease",
    "lease renewal failed": "lease keeping failed",
    "job failed unexpectedly": "unexpected failure",
    "task raised": "raised unexpected",
}


def worker_problems(log: str) -> dict[str, int]:
    """Errors and warnings in a worker's log: exception classes (the last of each chain) and
    known signs of trouble."""
    lines = log.splitlines()
    raised = Counter(
        match[1]
        for number, line in enumerate(lines)
        if (match := _EXCEPTION.match(line))
        and not any(
            later.startswith(("During handling", "The above exception"))
            for later in lines[number + 1 : number + 3]
        )
    )
    found = dict(raised)
    for label, sign in _LOG_SIGNS.items():
        if count := log.count(sign):
            found[label] = count
    return found


async def _live(fleet: BenchFleet, worker_pid: int, load: Load, runs: int) -> LiveResult:
    async with AsyncClient(settings=fleet.settings, max_connections=READER_CONNECTIONS) as client:

        async def step(tally: Tally) -> None:
            await follow_one(client, tally, load.delay_ms, load.tokens, load.job_timeout)

        # One short job first, so pools and lazy imports are in place before the idle RSS.
        warm = Tally()
        await follow_one(client, warm, 0, WARMUP_JOB.tokens, WARMUP_JOB.job_timeout)
        if warm.problems:
            raise RuntimeError(f"the warm-up job failed: {warm.failures}")
        # The reader runs in this process, next to the bench's own heap (its modules, Celery's
        # producer): freeze that, as a service tuned for latency would freeze its start-up
        # heap, so a full collection walks only what the reader library holds.
        freeze_startup(log)
        await asyncio.sleep(0.3)
        idle = rss_kib(worker_pid)
        meter = CpuMeter(fleet.pids())
        began, reader_cpu = time.monotonic(), time.process_time()
        with RssSampler(worker_pid) as rss:
            results = [await drive(load, step) for _ in range(runs)]
        used = meter.used()
        used["reader"] = time.process_time() - reader_cpu
        # Several worker processes count as one "worker" (the first one's RSS is sampled).
        for name in [name for name in used if name.startswith("worker") and name != "worker"]:
            used["worker"] = used.get("worker", 0.0) + used.pop(name)
        wall = time.monotonic() - began
    counts = Counts()
    for tally, _ in results:
        counts.add(tally)
    tallies = [tally for tally, _ in results]
    active = sum(t.active_s for t in tallies)
    return LiveResult(
        load=load,
        runs=runs,
        rate=median(rate for _, rate in results),
        latency=Summary.median_of([Summary.of(t.latency_ms) for t in tallies]),
        ttft=Summary.median_of([Summary.of(t.ttft_ms) for t in tallies]),
        queued=Summary.median_of([Summary.of(t.queued_ms) for t in tallies]),
        stream_rate=median(median(t.stream_rates()) for t in tallies),
        counts=counts,
        # Over the time tokens flowed: a job that never ends must not dilute the figure.
        cpu={name: seconds / (active or wall) for name, seconds in used.items()},
        cpu_ms_per_1k={
            name: seconds * 1e6 / counts.tokens for name, seconds in used.items() if counts.tokens
        },
        rss_idle_kib=idle,
        rss_peak_kib=rss.peak,
        wall_s=wall,
        job_ids=[job_id for t in tallies for job_id in t.job_ids],
        worker_problems={},
        peak_streams=max(t.peak_streams() for t in tallies),
        steady_latency=_steady_latency(load, tallies),
    )


def _steady_latency(load: Load, tallies: list[Tally]) -> Summary | None:
    """Medians over the runs that had a window where every job streamed (paced waves only)."""
    if load.closed:
        return None
    steady = [latencies for t in tallies if (latencies := t.steady_latency()) is not None]
    return Summary.median_of([Summary.of(latencies) for latencies in steady]) if steady else None


@dataclass
class LateResult:
    readers: int
    jobs: int  # distinct jobs read
    rate: float  # tokens/s read
    counts: Counts
    reader_ms_per_1k: float | None


def run_late(fleet: BenchFleet, job_ids: list[str], readers: int, tokens: int) -> LateResult:
    """``readers`` readers at once, each reading one finished job's whole log."""

    async def main() -> tuple[Tally, float, float]:
        async with AsyncClient(
            settings=fleet.settings, max_connections=READER_CONNECTIONS
        ) as client:
            cpu = time.process_time()
            tally, elapsed = await late_reads(client, job_ids, readers, tokens, limit_s=120)
            return tally, elapsed, time.process_time() - cpu

    tally, elapsed, cpu = asyncio.run(main())
    counts = Counts()
    counts.add(tally)
    return LateResult(
        readers=readers,
        jobs=min(readers, len(job_ids)),
        rate=tally.tokens / elapsed if elapsed > 0 else 0.0,
        counts=counts,
        reader_ms_per_1k=cpu * 1e6 / tally.tokens if tally.tokens else None,
    )

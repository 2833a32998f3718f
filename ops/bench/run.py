"""One bench run, start to end: ``run_bench(config)`` returns every result; nothing it started
outlives it, whether it ends normally, by an error or by Ctrl-C."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ops.bench.config import BenchConfig
from ops.bench.fanout import FanoutResult, FanoutSpec, run_fanout
from ops.bench.fleet import BenchFleet
from ops.bench.limits import Limits, measure_redis, measure_upstream
from ops.bench.machine import machine_facts
from ops.bench.profile import Profile, profile_gateway, profile_reader, profile_worker
from ops.bench.readers import Load
from ops.bench.scenarios import LateResult, LiveResult, run_late, run_live

PROFILE_ESTIMATE_S = 60.0
GATEWAY_PROFILE = FanoutSpec(200, 10, 50, 100)
LATE_ESTIMATE_S = 15.0


@dataclass
class BenchResults:
    config: BenchConfig
    machine: dict[str, str]
    limits: Limits = field(default_factory=Limits)
    live: list[LiveResult] = field(default_factory=list)
    late: list[LateResult] = field(default_factory=list)
    fanout: list[FanoutResult] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # parts that failed; the rest still counts
    elapsed_s: float = 0.0

    def live_result(self, key: str) -> LiveResult | None:
        found = [r for r in self.live if r.load.key == key]
        return found[0] if found else None

    @property
    def clean(self) -> bool:
        """Every part ran, and every job of every scenario ended done, with every token once
        and in order."""
        counts = [r.counts for r in self.live] + [r.counts for r in self.late]
        fanout = all(f.problems == 0 and f.connected == f.spec.readers for f in self.fanout)
        return not self.errors and all(c.clean for c in counts) and fanout

    @contextlib.contextmanager
    def part(self, name: str, progress: Callable[[str], None] | None) -> Iterator[None]:
        """Run one part of the bench; a failure is recorded and reported, and the rest runs."""
        _say(progress, name)
        try:
            yield
        except Exception as exc:
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            if progress is not None:
                progress(f"{name} FAILED:\n{traceback.format_exc()}")


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


class _Budget:
    """Skips what would not finish within the run's time budget."""

    def __init__(self, seconds: float, results: BenchResults) -> None:
        self.deadline = time.monotonic() + seconds
        self.results = results

    def allows(self, what: str, estimate: float) -> bool:
        if time.monotonic() + estimate <= self.deadline:
            return True
        self.results.skipped.append(f"{what} (time budget)")
        return False


def run_bench(
    config: BenchConfig,
    *,
    progress: Callable[[str], None] | None = None,
    keep_dir: Path | None = None,
) -> BenchResults:
    """Start the fleet, measure the limits, run the scenarios, stop everything."""
    began = time.monotonic()
    workdir = keep_dir or Path(tempfile.mkdtemp(prefix="tokenrelay-bench-"))
    results = BenchResults(config, machine_facts())
    budget = _Budget(config.budget_s, results)
    fleet = BenchFleet(workdir, mock_processes=config.mock_processes, redis_pool=config.redis_pool)
    try:
        _say(progress, "starting redis-server and the mock upstream")
        fleet.start()
        with results.part("limits: Redis (redis-benchmark, redis-py, the log's cost)", progress):
            measure_redis(config, workdir, results.limits)
        with results.part("limits: the upstream (raw SSE rate per load, parse rates)", progress):
            measure_upstream(config, fleet, results.limits)
        for scenario in config.live:
            if budget.allows(f"live {scenario.load.label}", scenario.estimate_s):
                name = f"live: {scenario.load.label}, {scenario.runs} run(s)"
                with results.part(name, progress):
                    results.live.append(
                        run_live(
                            fleet,
                            scenario.load,
                            scenario.runs,
                            scenario.load.slots or config.worker_concurrency,
                        )
                    )
        with results.part("late readers", progress):
            _late(config, fleet, results, budget, progress)
        for spec in config.fanout:
            if budget.allows(f"fan-out {spec.label}", spec.timeout / 3 + 10):
                with results.part(f"fan-out: {spec.label}", progress):
                    results.fanout.append(run_fanout(fleet, spec, config.worker_concurrency))
        if config.profile and budget.allows("profiles", PROFILE_ESTIMATE_S):
            _profiles(config, fleet, results, progress)
    finally:
        fleet.stop()
        if keep_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results.elapsed_s = time.monotonic() - began
    return results


def _late(
    config: BenchConfig,
    fleet: BenchFleet,
    results: BenchResults,
    budget: _Budget,
    progress: Callable[[str], None] | None,
) -> None:
    """Late readers of the jobs of the live scenario that finished the most jobs of the
    longest kind (not the short jobs of the at-capacity scenario)."""
    sources = [r for r in results.live if r.counts.clean and r.job_ids]
    if not config.late_readers:
        return
    if not sources:
        results.skipped.append("late readers (no clean live scenario to read)")
        return
    source = max(sources, key=lambda r: (r.load.tokens, len(r.job_ids)))
    for readers in config.late_readers:
        if budget.allows(f"late readers x{readers}", LATE_ESTIMATE_S):
            results.late.append(run_late(fleet, source.job_ids, readers, source.load.tokens))


def _profiles(
    config: BenchConfig,
    fleet: BenchFleet,
    results: BenchResults,
    progress: Callable[[str], None] | None,
) -> None:
    fleet.stop_worker()
    with results.part("profile: the worker's code path, paced", progress):
        results.profiles.append(profile_worker(fleet, Load(1, 2, 200), jobs=10))
    with results.part("profile: the worker's code path, full speed", progress):
        results.profiles.append(profile_worker(fleet, Load(1, 0, 200), jobs=20))
    with results.part("profile: the reader library", progress):
        fleet.start_worker(config.worker_concurrency)
        results.profiles.append(profile_reader(fleet, Load(20, 0, 200, 3.0, 0.5)))
        fleet.stop_worker()
    if config.fanout:
        with results.part(f"profile: the gateway, {GATEWAY_PROFILE.label}", progress):
            results.profiles.append(
                profile_gateway(fleet, GATEWAY_PROFILE, config.worker_concurrency)
            )
            fleet.stop_worker()

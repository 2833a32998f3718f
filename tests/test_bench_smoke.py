"""The bench's smoke run (``python -m ops.bench --quick``): through the real processes (its own
redis-server, mock upstream, worker and gateway), every token of every job arrives once and in
order, and the report has its columns. Speed is not checked here: ``make bench`` measures it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.bench import BenchConfig, run_bench
from ops.bench.fleet import BenchFleet
from ops.bench.profile import profile_worker
from ops.bench.readers import JobCheck, Load, Tally
from ops.bench.report import LIVE_COLUMNS, render

pytestmark = pytest.mark.slow


def _header_cells(text: str, first: str) -> list[str]:
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no table starting with a {first!r} column in:\n{text}")


def test_the_smoke_run_loses_nothing_and_prints_the_table() -> None:
    config = BenchConfig.quick()
    results = run_bench(config)

    assert [r.load for r in results.live] == [s.load for s in config.live], results.skipped
    for live in results.live:
        counts = live.counts
        label = live.load.label
        assert counts.jobs == live.load.concurrency, label
        assert counts.failures == [], label
        problems = (counts.lost, counts.duplicated, counts.reordered, counts.failed)
        assert problems == (0, 0, 0, 0), label
        assert counts.restarts == 0, label
        assert counts.foreign == 0, label
        assert counts.tokens == counts.jobs * live.load.tokens, label
        assert live.latency.count == counts.tokens, label
        assert live.rate is not None and live.rate > 0, label
        assert 1 <= live.peak_streams <= live.load.concurrency, label
        steady = live.steady_latency
        if live.load.closed:
            assert steady is None, label
        elif steady is not None:  # a short wave may have no window where every job streamed
            assert 0 < steady.count <= live.latency.count, label
    assert results.late and all(r.counts.clean for r in results.late)
    for fanout in results.fanout:
        assert fanout.connected == fanout.spec.readers
        assert fanout.problems == 0, fanout.failures
        assert fanout.frames == fanout.spec.readers * fanout.spec.tokens
        # The pub/sub tap saw every token once, and every frame is matched to its token there.
        assert fanout.to_redis.count == fanout.spec.jobs * fanout.spec.tokens
        assert fanout.gateway_latency.count == fanout.frames
        assert 0 < fanout.redis_connections_max <= 9
    # The pub/sub hop: every message reached the subscriber process, none before it was sent.
    hop = results.limits.pubsub_hop
    assert hop is not None and hop.count == config.pubsub_hop_messages
    assert hop.p50 is not None and 0 < hop.p50 <= (hop.max or 0)
    assert results.clean

    text = render(results)
    assert _header_cells(text, "scenario")[: len(LIVE_COLUMNS)] == list(LIVE_COLUMNS)
    assert _header_cells(text, "target") == ["target", "measured", "verdict"]
    assert "## Machine" in text and "## Limits" in text
    assert _header_cells(text, "leg") == ["leg", "p50 ms", "p99 ms"]
    assert "| both legs (sum of the p50s)" in text
    assert "| tokenrelay's tok lat at 5 x 20 ms (live scenarios)" in text


def _wave(received: dict[str, list[tuple[float, float]]]) -> Tally:
    """A tally of jobs whose tokens arrived at (seconds, latency ms), in that order."""
    tally = Tally()
    for job, tokens in received.items():
        check = JobCheck(len(tokens))
        for index, (at_s, latency_ms) in enumerate(tokens):
            now = int((1_000 + at_s) * 1e9)  # time_ns() is never near 0
            tally.stamped(check, index, now - int(latency_ms * 1e6), now)
        tally.end_job(job, check, "done")
    return tally


def test_a_waves_steady_latency_leaves_out_its_starts_and_ends() -> None:
    """The report gives the per-token latency while every job of a wave streamed, apart from
    the backlog of its starts: only tokens from the last job's first to the first job's last."""
    tally = _wave(
        {
            "a": [(0.0, 50.0), (0.4, 2.0), (0.8, 2.0)],
            "b": [(0.1, 2.0), (0.5, 3.0), (1.0, 40.0)],
        }
    )
    assert sorted(tally.latency_ms) == [2.0, 2.0, 2.0, 3.0, 40.0, 50.0]
    assert sorted(tally.steady_latency() or []) == [2.0, 2.0, 2.0, 3.0]
    # Every job streaming for less than the shortest window measured: no figure, not a guess.
    short = _wave({"a": [(0.0, 1.0), (0.8, 1.0)], "b": [(0.7, 1.0), (1.0, 1.0)]})
    assert short.steady_window() is None and short.steady_latency() is None


def test_the_worker_profile_runs_on_the_flusher_as_it_is(tmp_path: Path) -> None:
    """``make bench`` profiles the worker by wrapping the flusher's send (the quick run skips the
    profiles): a small run here, so a change to the flusher cannot break it unnoticed."""
    with BenchFleet(tmp_path, mock_processes=1) as fleet:
        profile = profile_worker(fleet, Load(1, 0, 5), jobs=3)
    assert profile.tokens == 15
    assert profile.us_per_token > 0 and (profile.us_without_publish or 0) > 0
    functions = [spot.function for spot in profile.own_code + profile.hotspots]
    assert any(name.startswith("worker/flusher.py") for name in functions), functions

"""Readers built on the producer library (``AsyncClient``): they submit and follow jobs, or read
finished ones late, and check every token against the upstream's stamp.

The mock upstream, asked with ``stamp=1``, makes token ``i``'s text ``|i:T`` where ``T`` is
``time.time_ns()`` taken right before it writes the token. The reader runs on the same machine,
so ``time.time_ns()`` at receipt minus ``T`` is the latency the pipeline (worker, Redis, reader
library) adds to that token, and the indices must be exactly ``0..n-1`` in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from producer.aio import AsyncClient, AsyncJob
from producer.protocol import EventType

PROMPT = "bench"


def model_for(delay_ms: float) -> str:
    return f"mock?stamp=1&delay_ms={delay_ms:g}"


def parse_stamp(text: str) -> tuple[int, int] | None:
    """``(index, ns)`` of a stamped token text ``|index:ns``; ``None`` if it is not one."""
    if not text.startswith("|"):
        return None
    index, _, ns = text[1:].partition(":")
    try:
        return int(index), int(ns)
    except ValueError:
        return None


class JobCheck:
    """One job's tokens: each index 0..expected-1 exactly once, in rising order."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen: set[int] = set()
        self.high = -1
        self.first_ns = 0
        self.last_ns = 0
        self.duplicated = 0
        self.reordered = 0
        self.foreign = 0  # unstamped or out of range

    def add(self, index: int) -> bool:
        """Record ``index``; True if it is a new token."""
        if not 0 <= index < self.expected:
            self.foreign += 1
            return False
        if index in self.seen:
            self.duplicated += 1
            return False
        self.seen.add(index)
        if index < self.high:
            self.reordered += 1
        self.high = max(self.high, index)
        return True

    def restart(self) -> None:
        """A ``restart`` event: the job starts over, so its tokens come again from 0."""
        self.seen.clear()
        self.high = -1

    @property
    def lost(self) -> int:
        return self.expected - len(self.seen)


#: What counts against a run: jobs that failed, tokens lost, duplicated, reordered or of another
#: job, and restarts (``Tally.problems``, ``Counts.clean``).
PROBLEMS: Final = ("failed", "lost", "duplicated", "reordered", "foreign", "restarts")


@dataclass
class Tally:
    """What the readers of one run saw. Times are ``time.time_ns()`` values."""

    jobs: int = 0
    failed: int = 0  # ended other than ``done``, or timed out
    tokens: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    foreign: int = 0
    restarts: int = 0  # restart events: an attempt died and the job started over
    latency_ms: list[float] = field(default_factory=list)
    received_ns: list[int] = field(default_factory=list)
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # first, last, tokens
    ttft_ms: list[float] = field(default_factory=list)
    queued_ms: list[float] = field(default_factory=list)  # job created -> claimed by a worker
    job_ids: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    started_ns: int = 0  # when the load began

    @property
    def active_s(self) -> float:
        """From the start of the load to the last token received."""
        if not self.spans or not self.started_ns:
            return 0.0
        return (max(span[1] for span in self.spans) - self.started_ns) / 1e9

    def token(self, check: JobCheck, text: str, now: int) -> None:
        stamp = parse_stamp(text)
        if stamp is None:
            check.foreign += 1
            return
        self.stamped(check, stamp[0], stamp[1], now)

    def stamped(self, check: JobCheck, index: int, stamp: int, now: int) -> None:
        if not check.add(index):
            return
        self.tokens += 1
        self.latency_ms.append((now - stamp) / 1e6)
        self.received_ns.append(now)
        check.first_ns = check.first_ns or now
        check.last_ns = now

    def end_job(self, job_id: str, check: JobCheck, ending: str) -> None:
        self.jobs += 1
        self.job_ids.append(job_id)
        self.duplicated += check.duplicated
        self.reordered += check.reordered
        self.foreign += check.foreign
        if ending != "done":
            self.failed += 1
            if len(self.failures) < 5:
                self.failures.append(f"{job_id}: {ending}")
        self.lost += check.lost
        if check.first_ns:
            self.spans.append((check.first_ns, check.last_ns, len(check.seen)))

    def rate_between(self, start: int, end: int) -> float | None:
        """Tokens/s received between two ``time_ns`` values."""
        if end <= start:
            return None
        return sum(1 for t in self.received_ns if start <= t <= end) / ((end - start) / 1e9)

    def latency_between(self, start: int, end: int) -> list[float]:
        """Per-token latencies (ms) of the tokens received between two ``time_ns`` values."""
        return [
            latency
            for latency, received in zip(self.latency_ms, self.received_ns, strict=True)
            if start <= received <= end
        ]

    def steady_latency(self) -> list[float] | None:
        """Per-token latencies while every job of a wave was streaming (see ``steady_window``),
        without its starts and ends; ``None`` when that window is too short to say."""
        window = self.steady_window()
        return None if window is None else self.latency_between(*window)

    def steady_window(self) -> tuple[int, int] | None:
        """From the moment the last job's first token arrived to the moment the first job's
        last token did: while every job of a wave was streaming; ``None`` if that lasted less
        than ``MIN_WINDOW_S``."""
        if not self.spans:
            return None
        start = max(first for first, _, _ in self.spans)
        end = min(last for _, last, _ in self.spans)
        return (start, end) if end - start >= MIN_WINDOW_S * 1e9 else None

    def peak_streams(self) -> int:
        """The most jobs streaming at once, as the reader saw them (first to last token)."""
        edges = sorted(
            [(first, 1) for first, _, _ in self.spans] + [(last, -1) for _, last, _ in self.spans]
        )
        peak = now = 0
        for _, step in edges:
            now += step
            peak = max(peak, now)
        return peak

    def stream_rates(self) -> list[float]:
        """Each job's own rate, tokens/s between its first and last token."""
        return [
            (count - 1) / ((last - first) / 1e9)
            for first, last, count in self.spans
            if last > first
        ]

    @property
    def problems(self) -> int:
        return sum(getattr(self, name) for name in PROBLEMS)


async def _read(job: AsyncJob, tally: Tally, check: JobCheck, timeout: float) -> tuple[str, int]:
    """Read ``job`` to its end; return how it ended and when its first token arrived."""
    first = 0
    ending = "no terminal event"
    try:
        async for event in job.events(timeout=timeout):
            now = time.time_ns()
            if event.type is EventType.TOKEN:
                first = first or now
                tally.token(check, event.text, now)
            elif event.type is EventType.RESTART:
                check.restart()
                tally.restarts += 1
            elif event.terminal:
                ending = str(event.type)
                if event.type is EventType.ERROR:
                    ending += f" {event.fields.get('code')}: {event.fields.get('message')}"
    except TimeoutError:
        ending = f"timed out after {timeout:g} s"
    return ending, first


async def follow_one(
    client: AsyncClient, tally: Tally, delay_ms: float, tokens: int, timeout: float
) -> None:
    """Submit one job and follow it live, as an application would."""
    check = JobCheck(tokens)
    submitted = time.time_ns()
    job = await client.submit(PROMPT, model=model_for(delay_ms), max_tokens=tokens, follow=True)
    ending, first = await _read(job, tally, check, timeout)
    if first:
        # What the pipeline adds before the first token: the upstream itself waits delay_ms.
        tally.ttft_ms.append((first - submitted) / 1e6 - delay_ms)
        # Of which the wait in the queue: the state's created and started stamps (ms).
        state = await client.status(job.id)
        if state.created is not None and state.started is not None:
            tally.queued_ms.append((state.started - state.created) * 1000)
    tally.end_job(job.id, check, ending)


async def read_late(
    client: AsyncClient, tally: Tally, job_id: str, tokens: int, timeout: float
) -> None:
    """Read a finished job from its log, as a reader that joins after the end would."""
    check = JobCheck(tokens)
    job = await client.subscribe(job_id, wait=5)
    ending, _ = await _read(job, tally, check, timeout)
    tally.end_job(job_id, check, ending)


async def run_lanes(
    lanes: int,
    step: Callable[[int], Awaitable[None]],
    *,
    until: float | None,
    limit_s: float,
) -> int:
    """Run ``lanes`` loops of ``step(lane)`` at once: each repeats until monotonic time ``until``
    (once if ``until`` is None). Everything is cancelled after ``limit_s``; return the number of
    lanes still running then."""

    async def lane(number: int) -> None:
        await step(number)
        while until is not None and time.monotonic() < until:
            await step(number)

    tasks = [asyncio.ensure_future(lane(n)) for n in range(lanes)]
    done, pending = await asyncio.wait(tasks, timeout=limit_s)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    for task in done:
        task.result()  # a reader that crashed is a bench bug: surface it
    return len(pending)


async def late_reads(
    client: AsyncClient,
    job_ids: Sequence[str],
    readers: int,
    tokens: int,
    limit_s: float,
) -> tuple[Tally, float]:
    """``readers`` concurrent late readers, reader ``i`` reading ``job_ids[i % len]``."""
    tally = Tally()
    began = time.monotonic()

    async def step(lane: int) -> None:
        await read_late(client, tally, job_ids[lane % len(job_ids)], tokens, limit_s)

    stuck = await run_lanes(readers, step, until=None, limit_s=limit_s)
    tally.failed += stuck
    return tally, time.monotonic() - began


@dataclass(frozen=True)
class Load:
    """How many streams at once, paced how, for how long.

    With ``duration_s`` the load is a closed loop: every lane starts a new job as soon as its
    last one ended, until ``duration_s``; the rate counts tokens received after ``warmup_s``.
    Without it the load is one wave of ``concurrency`` jobs submitted at once; the rate counts
    tokens received while every job of the wave was streaming (see ``Tally.steady_window``).
    """

    concurrency: int
    delay_ms: float
    tokens: int
    duration_s: float = 0.0
    warmup_s: float = 0.0
    #: The worker's publish script without its XADD (no log): what the log costs end to end.
    without_log: bool = False
    #: Worker processes sharing the load (scale-out on this machine).
    workers: int = 1
    #: The worker's slots (its ``-c``) if not the bench's own: fewer than the lanes, every job
    #: that ends frees a slot that a waiting job takes (a worker run at capacity).
    slots: int = 0

    @property
    def closed(self) -> bool:
        return self.duration_s > 0

    @property
    def ideal(self) -> float | None:
        """Tokens/s if every stream ran at the upstream's pace with no gaps (paced loads)."""
        return self.concurrency * 1000 / self.delay_ms if self.delay_ms > 0 else None

    @property
    def job_timeout(self) -> float:
        return self.tokens * self.delay_ms / 1000 * 3 + 30

    @property
    def label(self) -> str:
        suffix = ", no log" if self.without_log else ""
        if self.workers > 1:
            suffix += f", {self.workers} workers"
        if self.slots:
            suffix += f", {self.slots} slots"
        return f"{self.concurrency} x {self.delay_ms:g} ms{suffix}"

    @property
    def key(self) -> str:
        """The scenario's name on the command line: ``500x20``, ``100x0-nolog``, ``500x20-2w``."""
        key = f"{self.concurrency}x{self.delay_ms:g}"
        if self.without_log:
            key += "-nolog"
        if self.workers > 1:
            key += f"-{self.workers}w"
        if self.slots:
            key += f"-{self.slots}slots"
        return key


MIN_WINDOW_S: Final = 0.3


def rate_of(tally: Tally, load: Load, start_ns: int) -> float | None:
    """Tokens/s delivered under ``load`` (see ``Load``)."""
    if load.closed:
        return tally.rate_between(
            start_ns + int(load.warmup_s * 1e9), start_ns + int(load.duration_s * 1e9)
        )
    window = tally.steady_window()
    if window is not None:
        return tally.rate_between(*window)
    if not tally.spans:
        return None
    first = min(span[0] for span in tally.spans)
    last = max(span[1] for span in tally.spans)
    return tally.rate_between(first, last)


async def drive(load: Load, step: Callable[[Tally], Awaitable[None]]) -> tuple[Tally, float | None]:
    """Run ``load`` with ``step(tally)`` doing one job; return the tally and the rate."""
    tally = Tally()
    start_ns, now = time.time_ns(), time.monotonic()
    tally.started_ns = start_ns
    until = now + load.duration_s if load.closed else None

    async def lane(_: int) -> None:
        await step(tally)

    stuck = await run_lanes(
        load.concurrency, lane, until=until, limit_s=load.duration_s + load.job_timeout
    )
    tally.failed += stuck
    return tally, rate_of(tally, load, start_ns)

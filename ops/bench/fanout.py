"""The gateway's fan-out: many SSE readers of a few live jobs, through one gateway process.

The jobs are created first and enqueued only once every reader is connected, so every token a
reader gets is live (stamped by the upstream, read off the reader's socket). The readers are a
minimal asyncio HTTP/1.1 client (chunked SSE), so that a thousand of them cost this process
little next to the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from ops.bench.fleet import BenchFleet
from ops.bench.procstat import CpuMeter, RssSampler, rss_kib
from ops.bench.readers import PROMPT, JobCheck, Tally, model_for, parse_stamp
from ops.bench.stats import Summary
from ops.bench.tap import Tap
from producer import scripts
from producer.client import create_call, prepare
from producer.enqueue import Enqueuer
from producer.protocol import EventType

GATEWAY_CLIENT_NAME = "tokenrelay-gateway"
CONNECT_LIMIT_S = 60.0


@dataclass(frozen=True)
class FanoutSpec:
    readers: int
    jobs: int
    delay_ms: float
    tokens: int
    #: Start the jobs evenly over one token interval instead of all at once, so their tokens
    #: do not arrive in the same millisecond (as independent jobs' tokens do not).
    spread: bool = False

    @property
    def label(self) -> str:
        label = f"{self.readers} SSE readers of {self.jobs} jobs x {self.delay_ms:g} ms"
        return label + (", starts spread" if self.spread else "")

    @property
    def ideal(self) -> float:
        """Frames/s the readers get if every job streams at the upstream's pace."""
        return self.readers * 1000 / self.delay_ms

    @property
    def timeout(self) -> float:
        return self.tokens * self.delay_ms / 1000 * 3 + 60


@dataclass
class FanoutResult:
    spec: FanoutSpec
    connected: int
    frames: int  # token frames received by all readers together
    rate: float | None  # of them per second
    latency: Summary  # ms, upstream stamp to a reader's socket read
    to_redis: Summary  # ms, upstream stamp to the pub/sub tap: the worker and Redis
    gateway_latency: Summary  # ms, the tap to a reader's socket read: the gateway (per frame)
    problems: int
    failures: list[str]
    redis_connections_max: int  # the gateway's, named tokenrelay-gateway, sampled
    gateway_cpu: float  # share of one core while the jobs streamed
    gateway_rss_kib: int  # peak
    gateway_rss_idle_kib: int
    cpu_ms_per_1k: dict[str, float]


class _SSEReader(asyncio.Protocol):
    """One reader of ``GET /v1/jobs/{id}/events``: a minimal HTTP/1.1 client for a chunked SSE
    response. Every token is stamped the moment its bytes come off the socket
    (``data_received``), before any parsing, so the latency is the pipeline's and not this
    process's scheduling of a thousand readers."""

    def __init__(
        self, request: bytes, tally: Tally, check: JobCheck, receipts: list[tuple[str, int]]
    ) -> None:
        self.request = request
        self.tally = tally
        self.receipts = receipts  # (token text, ns): the tap's times are subtracted later
        self.check = check
        self.connected = asyncio.get_running_loop().create_future()
        self.ended = asyncio.get_running_loop().create_future()
        self.ending = "no terminal event"
        self.head = True
        self.raw = b""  # received, not yet de-chunked
        self.sse = b""  # de-chunked, not yet a whole frame
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        self.raw += data
        try:
            if self.head and not self._read_head():
                return
            self._read_chunks(now)
        except (ValueError, RuntimeError) as exc:
            self._end(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or ConnectionError("the gateway closed the connection"))

    def _read_head(self) -> bool:
        head, sep, rest = self.raw.partition(b"\r\n\r\n")
        if not sep:
            return False
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status:
            raise RuntimeError(f"gateway answered {status.decode(errors='replace').strip()!r}")
        self.head, self.raw = False, rest
        self.connected.set_result(None)
        return True

    def _read_chunks(self, now: int) -> None:
        raw, at, last = self.raw, 0, False
        while not last:
            line_end = raw.find(b"\r\n", at)
            if line_end < 0:
                break
            size = int(raw[at:line_end].split(b";")[0].strip() or b"0", 16)
            if len(raw) < line_end + 2 + size + 2:
                break
            self.sse += raw[line_end + 2 : line_end + 2 + size]
            at = line_end + 2 + size + 2
            last = size == 0  # the terminating chunk, whole
        self.raw = raw[at:]
        *frames, self.sse = self.sse.split(b"\n\n")
        for frame in frames:
            for line in frame.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("type") == EventType.TOKEN:
                    text = str(event.get("text", ""))
                    self.tally.token(self.check, text, now)
                    self.receipts.append((text, now))
                elif event.get("type") in ("done", "error", "cancelled"):
                    self.ending = str(event["type"])
        if last:
            self._end(None)

    def _end(self, exc: Exception | None) -> None:
        for future in (self.connected, self.ended):
            if not future.done():
                if exc is None:
                    future.set_result(None)
                else:
                    future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


async def _reader(
    host: str,
    port: int,
    job_id: str,
    spec: FanoutSpec,
    tally: Tally,
    connected: list[int],
    receipts: list[tuple[str, int]],
) -> None:
    check = JobCheck(spec.tokens)
    request = (
        f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    protocol = _SSEReader(request, tally, check, receipts)
    reached = False
    try:
        async with asyncio.timeout(spec.timeout + CONNECT_LIMIT_S):
            await asyncio.get_running_loop().create_connection(lambda: protocol, host, port)
            await protocol.connected
            connected.append(1)
            reached = True
            await protocol.ended
        ending = protocol.ending
    except (TimeoutError, OSError, RuntimeError, ValueError) as exc:
        where = protocol.ending if reached else "could not connect"
        ending = f"{where}: {type(exc).__name__} {exc}"[:200]
    finally:
        if protocol.transport is not None:
            protocol.transport.close()
    tally.end_job(job_id, check, ending)


def _gateway_connections(client: redis.Redis) -> int:
    return sum(1 for c in client.client_list() if c.get("name") == GATEWAY_CLIENT_NAME)


async def _watch_connections(client: redis.Redis, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak.append(await asyncio.to_thread(_gateway_connections, client))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


@dataclass
class _Run:
    tally: Tally
    connected: int
    rate: float | None
    cpu_s: dict[str, float]
    elapsed: float
    peak_connections: int
    receipts: list[tuple[str, int]]


async def _fan_out(
    fleet: BenchFleet,
    spec: FanoutSpec,
    jobs: list[tuple[str, Any]],
    client: redis.Redis,
    enqueuer: Enqueuer,
) -> _Run:
    parts = urlsplit(fleet.gateway_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    tally, peak = Tally(), [0]
    connected: list[int] = []
    receipts: list[tuple[str, int]] = []
    stop = asyncio.Event()
    watcher = asyncio.ensure_future(_watch_connections(client, peak, stop))
    tasks = [
        asyncio.ensure_future(
            _reader(host, port, jobs[i % spec.jobs][0], spec, tally, connected, receipts)
        )
        for i in range(spec.readers)
    ]
    deadline = time.monotonic() + CONNECT_LIMIT_S
    while len(connected) < spec.readers and time.monotonic() < deadline:
        if all(task.done() for task in tasks):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # let the gateway's subscriptions settle
    # This process is the measuring instrument, not the system under test: a collection of its
    # heap (a thousand readers' objects) would hold every reader's stamp back by tens of ms.
    gc.collect()
    gc.disable()
    try:
        meter = CpuMeter(fleet.pids())
        started = time.time_ns()
        await _start_and_wait(spec, jobs, enqueuer, tasks, tally, started)
        used = meter.used()
        elapsed = (time.time_ns() - started) / 1e9
    finally:
        gc.enable()
        stop.set()
        await watcher
    rate = None
    if tally.spans:
        rate = tally.rate_between(started, max(span[1] for span in tally.spans))
    return _Run(tally, len(connected), rate, used, elapsed, max(peak), receipts)


async def _start_and_wait(
    spec: FanoutSpec,
    jobs: list[tuple[str, Any]],
    enqueuer: Enqueuer,
    tasks: Sequence[asyncio.Future[None]],
    tally: Tally,
    started: int,
) -> None:
    """Enqueue the jobs (together or spread over one token interval), then wait for every
    reader to finish; a reader still going at the deadline counts as failed."""
    gap = spec.delay_ms / 1000 / len(jobs) if spec.spread else 0.0
    for index, (job_id, job_spec) in enumerate(jobs):
        if gap:
            await asyncio.sleep(max(0.0, started / 1e9 + index * gap - time.time()))
        await asyncio.to_thread(enqueuer.send, job_id, job_spec)
    _, pending = await asyncio.wait(tasks, timeout=spec.timeout + CONNECT_LIMIT_S)
    tally.failed += len(pending)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run_fanout(
    fleet: BenchFleet, spec: FanoutSpec, concurrency: int, profile_to: Path | None = None
) -> FanoutResult:
    """Start a fresh worker and the gateway, connect the readers, then start the jobs."""
    fleet.start_worker(concurrency)
    fleet.start_gateway(profile_to)
    assert fleet.gateway is not None
    gateway_pid = fleet.gateway.pid
    settings = fleet.settings
    client = fleet.redis()
    enqueuer = Enqueuer(settings)
    try:
        create = client.register_script(scripts.CREATE)
        request = {"prompt": PROMPT, "model": model_for(spec.delay_ms), "max_tokens": spec.tokens}
        jobs: list[tuple[str, Any]] = [prepare(settings, request, None) for _ in range(spec.jobs)]
        for job_id, job_spec in jobs:
            # Created first, queued once every reader is connected.
            keys, args = create_call(settings, fleet.keys, job_id, job_spec, None, sharded=False)
            create(keys=keys, args=args)
        idle = rss_kib(gateway_pid)
        tap = Tap(fleet.redis_url, fleet.prefix, fleet.workdir / "tap.txt").start()
        try:
            with RssSampler(gateway_pid) as rss:
                run = asyncio.run(_fan_out(fleet, spec, jobs, client, enqueuer))
        finally:
            tapped = tap.stop()
    finally:
        enqueuer.close()
        client.close()
        fleet.stop_gateway()
    tokens = run.tally.tokens
    stamps = {text: stamp[1] for text in tapped if (stamp := parse_stamp(text))}
    to_redis = [(tapped[text] - ns) / 1e6 for text, ns in stamps.items()]
    through_gateway = [(now - tapped[text]) / 1e6 for text, now in run.receipts if text in tapped]
    return FanoutResult(
        spec=spec,
        connected=run.connected,
        frames=tokens,
        rate=run.rate,
        latency=Summary.of(run.tally.latency_ms),
        to_redis=Summary.of(to_redis),
        gateway_latency=Summary.of(through_gateway),
        problems=run.tally.problems,
        failures=run.tally.failures,
        redis_connections_max=run.peak_connections,
        gateway_cpu=run.cpu_s.get("gateway", 0.0) / run.elapsed,
        gateway_rss_kib=rss.peak,
        gateway_rss_idle_kib=idle,
        cpu_ms_per_1k={name: s * 1e6 / tokens for name, s in run.cpu_s.items() if tokens},
    )

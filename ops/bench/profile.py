"""Where the CPU of one token goes, by function, under cProfile with a CPU-time clock.

Two harnesses, each on the real code:

* the worker's: ``worker.runner.run_job`` in this process (no Celery, no gevent) on a real
  ``Runtime``, against the run's Redis and mock upstream, jobs one after another (the flusher,
  a greenlet in a worker, is a thread here: its CPU and its profile are added in);
* the reader's: the producer library (``AsyncClient``) following live jobs of the run's worker.

The profiler's clock is this thread's CPU time, so waiting costs nothing and the figures are
CPU microseconds per token (inflated by the profiler's own overhead, which is measured too: the
same harness without the profiler).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import logging
import os
import pstats
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ops.bench.fanout import FanoutSpec, run_fanout
from ops.bench.fleet import BenchFleet
from ops.bench.readers import Load, Tally, drive, follow_one, model_for
from producer import scripts
from producer.aio import AsyncClient
from producer.client import create_call
from producer.protocol import Keys
from producer.settings import Settings
from producer.spec import JobSpec
from worker.flusher import Flusher, Outbox
from worker.runner import run_job
from worker.runtime import Runtime

TOP: Final = 14
OWN_TOP: Final = 10

# Areas, by the first pattern found in a function's file name (or built-in's name).
_AREAS: Final = (
    ("worker/", "tokenrelay worker"),
    ("producer/", "tokenrelay producer"),
    ("ops/bench", "bench harness"),
    ("sseclient", "sseclient-py"),
    ("urllib3/", "urllib3"),
    ("requests/", "requests"),
    ("http/client", "http.client"),
    ("redis/", "redis-py"),
    ("prometheus_client", "prometheus_client"),
    ("gevent", "gevent"),
    ("h11/", "h11 (HTTP/1.1)"),
    ("uvicorn/", "uvicorn"),
    ("starlette/", "starlette"),
    ("anyio/", "anyio"),
    ("asyncio/", "asyncio"),
    ("json/", "json"),
    ("logging/", "logging"),
    ("socket", "sockets"),
    ("select", "sockets"),
    ("recv", "sockets"),
    ("send", "sockets"),
    ("threading", "threading"),
)


@dataclass(frozen=True)
class Hotspot:
    function: str
    calls_per_token: float
    self_us: float  # CPU µs per token in the function itself
    total_us: float  # including what it calls


@dataclass(frozen=True)
class Profile:
    name: str
    tokens: int
    us_per_token: float  # without the profiler
    profiled_us_per_token: float  # with it
    us_without_publish: float | None  # the worker's, with its Redis publish call a no-op
    hotspots: list[Hotspot]  # by self time
    own_code: list[Hotspot]  # tokenrelay's functions, by total time
    areas: list[tuple[str, float]]  # CPU µs per token by library, self time


def _short(path: str) -> str:
    """A file name without the machine's directories."""
    for marker in ("site-packages/", "lib/python3."):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker.startswith("lib/") else tail
    root = os.getcwd() + os.sep
    return path[len(root) :] if path.startswith(root) else os.path.basename(path)


def _label(key: tuple[str, int, str]) -> str:
    path, line, name = key
    if path == "~":
        return name.replace("<built-in method ", "<").replace("<method ", "<")
    return f"{_short(path)}:{line}({name})"


def _area(label: str) -> str:
    for pattern, area in _AREAS:
        if pattern in label:
            return area
    return "other (C built-ins, Python runtime)"


def _digest(
    name: str,
    source: cProfile.Profile | pstats.Stats | Path,
    tokens: int,
    plain_us: float,
    cpu: float,
    without_publish: float | None = None,
) -> Profile:
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    if isinstance(source, pstats.Stats):
        stats = source.stats  # type: ignore[attr-defined]
    else:
        stats = pstats.Stats(source if isinstance(source, cProfile.Profile) else str(source)).stats  # type: ignore[attr-defined]
    per = 1e6 / max(tokens, 1)
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)
    hotspots = [
        Hotspot(_label(key), calls / max(tokens, 1), own * per, total * per)
        for key, (_, calls, own, total, _) in rows[:TOP]
    ]
    by_total = sorted(stats.items(), key=lambda item: item[1][3], reverse=True)
    own_code = [
        Hotspot(label, calls / max(tokens, 1), own * per, total * per)
        for key, (_, calls, own, total, _) in by_total
        if (label := _label(key)).startswith(("worker/", "producer/"))
    ][:OWN_TOP]
    areas: dict[str, float] = {}
    for key, (_, _, own, _, _) in stats.items():
        area = _area(_label(key))
        areas[area] = areas.get(area, 0.0) + own * per
    ordered = sorted(areas.items(), key=lambda item: item[1], reverse=True)
    return Profile(name, tokens, plain_us, cpu * per, without_publish, hotspots, own_code, ordered)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """The tokenrelay logger writes to stderr in this process: send it nowhere meanwhile."""
    logger = logging.getLogger(logger_name)
    with open(os.devnull, "w") as sink:
        streams = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]
        old = [h.setStream(sink) for h in streams]
        try:
            yield
        finally:
            for handler, stream in zip(streams, old, strict=True):
                if stream is not None:
                    handler.setStream(stream)


def _thread_cpu(threads: list[threading.Thread]) -> float:
    """CPU seconds of this thread and of ``threads`` (the worker's flusher) so far."""
    spent = time.thread_time()
    for thread in threads:
        if thread.ident is not None and thread.is_alive():
            spent += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return spent


def _timed(
    profiler: cProfile.Profile | None,
    work: Callable[[], int],
    threads: list[threading.Thread] | None = None,
) -> tuple[int, float]:
    """Run ``work``; return its token count and the CPU seconds of this thread and ``threads``."""
    began = _thread_cpu(threads or [])
    if profiler is not None:
        profiler.enable()
    try:
        tokens = work()
    finally:
        if profiler is not None:
            profiler.disable()
    return tokens, _thread_cpu(threads or []) - began


@contextlib.contextmanager
def _profiled_flusher(flusher: Flusher, profiler: cProfile.Profile) -> Iterator[None]:
    """Profile the flusher's sends (its own thread) into ``profiler`` meanwhile."""
    send = flusher._send

    def profiled(conn: Any, batch: list[Outbox]) -> None:
        profiler.enable()
        try:
            send(conn, batch)
        finally:
            profiler.disable()

    flusher._send = profiled  # type: ignore[method-assign]
    try:
        yield
    finally:
        flusher._send = send  # type: ignore[method-assign]


@contextlib.contextmanager
def _redis_free_flusher(flusher: Flusher) -> Iterator[None]:
    """The flusher confirms every batch without sending it: the worker's cost without Redis."""
    send = flusher._send

    def confirm(conn: Any, batch: list[Outbox]) -> None:
        began = time.monotonic()
        flusher._pack(batch)  # the packing is the worker's work; the round trip is not
        for box in batch:
            flusher._confirm(box, 0, began)

    flusher._send = confirm  # type: ignore[method-assign]
    try:
        yield
    finally:
        flusher._send = send  # type: ignore[method-assign]


def profile_worker(fleet: BenchFleet, load: Load, jobs: int) -> Profile:
    """``run_job`` on ``jobs`` jobs of ``load.tokens`` tokens at ``load.delay_ms``, in turn."""
    env = {**fleet.env, "TOKENRELAY_PREFIX": fleet.prefix + "prof"}
    settings = Settings.from_env(env)
    keys = Keys(settings.prefix)
    spec = JobSpec.from_dict(
        {"prompt": "bench", "model": model_for(load.delay_ms), "max_tokens": load.tokens},
        default_model="mock",
        default_dialect=settings.upstream_dialect,
        max_prompt_bytes=settings.max_prompt_bytes,
    )
    with _quiet("tokenrelay"):
        runtime = Runtime(settings)
        create = runtime.redis.register_script(scripts.CREATE)
        try:

            def work() -> int:
                for _ in range(jobs):
                    job_id = uuid.uuid4().hex
                    call_keys, args = create_call(settings, keys, job_id, spec, None, sharded=False)
                    create(keys=call_keys, args=args)
                    outcome = run_job(runtime, job_id, spec.to_dict())
                    if outcome != "done":
                        raise RuntimeError(f"profiled job {job_id} ended {outcome}")
                return jobs * load.tokens

            flusher = runtime.flusher
            assert flusher is not None, "the bench's Redis is a single Redis"
            threads = [t for t in threading.enumerate() if t.name == "tokenrelay-flusher"]
            work()  # warm: connections, imports
            tokens, plain = _timed(None, work, threads)
            # The flusher is a thread of its own here (a greenlet in a worker): its sends are
            # profiled with a second profiler, merged below.
            profiler = cProfile.Profile(time.thread_time)
            flusher_profiler = cProfile.Profile(time.thread_time)
            with _profiled_flusher(flusher, flusher_profiler):
                profiled_tokens, cpu = _timed(profiler, work, threads)
            # Ablation: the same jobs with every batch confirmed without a Redis round trip.
            with _redis_free_flusher(flusher):
                bare_tokens, bare = _timed(None, work, threads)
        finally:
            runtime.stop()
            # Its control listener and keeper threads end within a second of stop(); closing
            # the client under them first would make them fail.
            for thread in getattr(runtime, "_threads", ()):
                thread.join(5)
            runtime.upstream.close()
            runtime.redis.close()
    name = f"worker: run_job, {load.delay_ms:g} ms between tokens"
    bare_us = bare * 1e6 / bare_tokens
    profiler.create_stats()
    flusher_profiler.create_stats()
    merged = pstats.Stats(profiler)
    merged.add(flusher_profiler)
    return _digest(name, merged, profiled_tokens, plain * 1e6 / tokens, cpu, bare_us)


def profile_reader(fleet: BenchFleet, load: Load) -> Profile:
    """The producer library following ``load`` (the run's worker must be up)."""

    async def run(profiler: cProfile.Profile | None) -> tuple[int, float]:
        async with AsyncClient(settings=fleet.settings, max_connections=32) as client:

            async def step(tally: Tally) -> None:
                await follow_one(client, tally, load.delay_ms, load.tokens, load.job_timeout)

            await drive(Load(1, 0, 10), step)  # warm
            began = time.thread_time()
            if profiler is not None:
                profiler.enable()
            try:
                tally, _ = await drive(load, step)
            finally:
                if profiler is not None:
                    profiler.disable()
            if tally.problems:
                raise RuntimeError(f"profiled reads went wrong: {tally.failures}")
            return tally.tokens, time.thread_time() - began

    tokens, plain = asyncio.run(run(None))
    profiler = cProfile.Profile(time.thread_time)
    profiled_tokens, cpu = asyncio.run(run(profiler))
    name = f"reader: AsyncClient following {load.concurrency} jobs at {load.delay_ms:g} ms"
    return _digest(name, profiler, profiled_tokens, plain * 1e6 / max(tokens, 1), cpu)


def profile_gateway(fleet: BenchFleet, spec: FanoutSpec, concurrency: int) -> Profile:
    """The gateway process under cProfile while it fans ``spec`` out. ``us_per_token`` is its CPU
    per frame delivered without the profiler, from /proc, in a run of the same spec."""
    plain = run_fanout(fleet, spec, concurrency)
    path = fleet.workdir / "gateway.prof"
    profiled = run_fanout(fleet, spec, concurrency, profile_to=path)
    frames = max(profiled.frames, 1)
    cpu = sum(row[2] for row in pstats.Stats(str(path)).stats.values())  # type: ignore[attr-defined]
    name = f"gateway: {spec.label}"
    plain_us = plain.cpu_ms_per_1k.get("gateway", 0.0)
    return _digest(name, path, frames, plain_us, cpu)

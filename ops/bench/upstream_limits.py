"""The upstream side's limits: how fast the mock upstream streams to a bare client (no worker,
no Redis), and how fast the worker's own code parses SSE, in memory, with no I/O at all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import requests
import sseclient

from ops.bench.readers import JobCheck, Load, Tally, drive, model_for
from ops.bench.stats import Summary, median
from producer.protocol import Keys
from worker import dialects
from worker.publisher import JobPublisher
from worker.upstream import READ_SIZE, parse_stream

# Together's token event carries the text twice; the choices entry is the one right after "{".
_TOKEN: Final = re.compile(rb'\{"text":"\|(\d+):(\d+)"\}')


@dataclass(frozen=True)
class RawUpstream:
    """A bare asyncio client reading the mock's SSE directly, under the scenario's load."""

    load: Load
    rate: float | None  # tokens/s, as the scenario measures it
    latency: Summary  # ms from the mock's stamp to this client's read
    ttft: Summary  # ms from sending the request to the first token, minus delay_ms
    stream_rate: float | None  # median tokens/s of one stream
    problems: int


async def _raw_stream(host: str, port: int, load: Load, tally: Tally) -> None:
    request = {
        "model": model_for(load.delay_ms),
        "prompt": "bench",
        "max_tokens": load.tokens,
        "stream_tokens": True,
    }
    body = json.dumps(request).encode()
    head = (
        f"POST /inference HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
    ).encode()
    check = JobCheck(load.tokens)
    ending = "no [DONE]"
    sent = time.time_ns()
    try:
        async with asyncio.timeout(load.job_timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(head + body)
                buffer = b""
                while data := await reader.read(READ_SIZE):
                    now = time.time_ns()
                    buffer += data
                    cut = buffer.rfind(b"\n\n") + 2
                    if cut < 2:
                        continue
                    complete, buffer = buffer[:cut], buffer[cut:]
                    for match in _TOKEN.finditer(complete):
                        tally.stamped(check, int(match[1]), int(match[2]), now)
                    if b"[DONE]" in complete:
                        ending = "done"
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        ending = f"timed out after {load.job_timeout:g} s"
    if check.first_ns:
        tally.ttft_ms.append((check.first_ns - sent) / 1e6 - load.delay_ms)
    tally.end_job("raw", check, ending)


def raw_upstream(url: str, load: Load, repeats: int = 1) -> RawUpstream:
    """The mock's rate to a bare client under ``load``; medians of ``repeats`` runs."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80

    async def step(tally: Tally) -> None:
        await _raw_stream(host, port, load, tally)

    runs = [asyncio.run(drive(load, step)) for _ in range(repeats)]
    return RawUpstream(
        load,
        median(rate for _, rate in runs),
        Summary.median_of([Summary.of(t.latency_ms) for t, _ in runs]),
        Summary.median_of([Summary.of(t.ttft_ms) for t, _ in runs]),
        median(median(t.stream_rates()) for t, _ in runs),
        sum(t.problems for t, _ in runs),
    )


# --- parsing in memory -------------------------------------------------------------------------


def sample_body(url: str, tokens: int = 200) -> bytes:
    """One real response body of the mock (Together dialect, stamped tokens)."""
    request = {"model": model_for(0), "prompt": "bench", "max_tokens": tokens, "stream_tokens": 1}
    response = requests.post(url + "/inference", json=request, timeout=30)
    response.raise_for_status()
    return response.content


def per_event(body: bytes) -> list[bytes]:
    """The body as one chunk per event: what each network read returns when tokens are paced."""
    events = body.split(b"\n\n")
    return [event + b"\n\n" for event in events[:-1]] + ([events[-1]] if events[-1] else [])


def per_read(body: bytes) -> list[bytes]:
    """The body in ``READ_SIZE`` chunks: what reads return when the upstream bursts."""
    return [body[i : i + READ_SIZE] for i in range(0, len(body), READ_SIZE)]


class NullScript:
    """Stands in for the Redis script: the worker's Python cost without the round trip."""

    def __call__(self, keys: list[str], args: list[Any]) -> int:
        return 0


class _NullScripts:
    publish = NullScript()


def _count_sseclient(chunks: list[bytes]) -> int:
    return sum(1 for _ in sseclient.SSEClient(iter(chunks)).events())


def _count_parse_stream(chunks: list[bytes]) -> int:
    return sum(1 for _ in parse_stream(iter(chunks), dialects.get("together")))


def _count_worker_python(chunks: list[bytes]) -> int:
    """parse_stream + JobPublisher (encode, batch, metrics), flushing before every read."""
    publisher = JobPublisher(
        _NullScripts(),  # type: ignore[arg-type]
        Keys("bench"),
        "0" * 32,
        "owner",
        next_seq=0,
        lease_ms=10_000,
        ttl=600,
    )

    def reads() -> Iterator[bytes]:
        for chunk in chunks:
            publisher.flush()
            yield chunk

    count = 0
    for delta in parse_stream(reads(), dialects.get("together")):
        if delta.text:
            publisher.token(delta.text)
            count += 1
    publisher.flush()
    return count


COUNTERS: Final[dict[str, Callable[[list[bytes]], int]]] = {
    "sseclient-py events": _count_sseclient,
    "parse_stream deltas": _count_parse_stream,
    "parse_stream + JobPublisher (no Redis)": _count_worker_python,
}


def parse_rates(body: bytes, bodies: int, repeats: int) -> dict[tuple[str, str], float]:
    """Events (or tokens) per second of each counter, for each way the body arrives."""
    chunkings: dict[str, list[bytes]] = {
        "1 event/read": per_event(body),
        "64 KiB reads": per_read(body),
    }
    rates: dict[tuple[str, str], float] = {}
    for chunking, chunks in chunkings.items():
        for name, counter in COUNTERS.items():
            runs = []
            for _ in range(repeats):
                began = time.perf_counter()
                count = sum(counter(chunks) for _ in range(bodies))
                runs.append(count / (time.perf_counter() - began))
            rates[(name, chunking)] = statistics.median(runs)
    return rates

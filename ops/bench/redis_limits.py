"""Redis's limits, measured on a private redis-server: its own ``redis-benchmark`` PUBLISH rate,
redis-py's pipelined PUBLISH rate, and what the log costs: the worker's real publish scripts
(XADD + PUBLISH per event) against PUBLISH alone, at the same batch sizes."""

from __future__ import annotations

import contextlib
import csv
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import redis

from ops.bench.stats import Summary
from ops.bench.tap import Tap
from producer import scripts
from producer.protocol import Keys, encode_token
from worker.flusher import JOBS_PER_CALL

PAYLOAD_TEXT: Final = "|123:1700000000000000000"  # a stamped token's text, as in the scenarios
TOKENS_PER_JOB: Final = 200


def without_log(script: str) -> str:
    """A publish script with its XADD line removed: fencing, state and PUBLISH as they are."""
    lines = script.splitlines()
    kept = [line for line in lines if "'XADD'" not in line]
    if len(kept) != len(lines) - 1:
        raise ValueError("the publish script's XADD is no longer on a line of its own")
    return "\n".join(kept)


PUBLISH_ONLY_SCRIPT: Final = without_log(scripts.PUBLISH)
PUBLISH_MANY_ONLY_SCRIPT: Final = without_log(scripts.PUBLISH_MANY)


def _resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Subscriber:
    """A raw connection subscribed to some channels, drained on a thread: the reader the
    channels have in the real system, at almost no CPU cost of its own."""

    def __init__(self, port: int, channels: Sequence[str]) -> None:
        self.received = 0  # bytes
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        for start in range(0, len(channels), 500):
            self.sock.sendall(_resp("SUBSCRIBE", *channels[start : start + 500]))
        self._thread = threading.Thread(target=self._drain, name="bench-drain", daemon=True)
        self._thread.start()
        self._wait_confirmed(port, channels[-1])

    @staticmethod
    def _wait_confirmed(port: int, channel: str) -> None:
        client = redis.Redis(port=port, socket_timeout=10)
        try:
            deadline = time.monotonic() + 10
            while client.pubsub_numsub(channel)[0][1] < 1:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"subscription to {channel} not confirmed")
                time.sleep(0.01)
        finally:
            client.close()

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.sock.recv(1 << 20):
                self.received += len(data)

    def wait_for(self, count: int, limit: float = 10.0) -> bool:
        """Wait until at least ``count`` bytes arrived; False if they did not in time."""
        deadline = time.monotonic() + limit
        while self.received < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.received >= count

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.sock.close()


def unlimited_pubsub_buffers(port: int) -> None:
    """Let a subscriber fall behind without being disconnected (the default cuts it off past
    32 MB): the limits measure Redis, not how fast this process drains."""
    client = redis.Redis(port=port, socket_timeout=10)
    try:
        client.config_set("client-output-buffer-limit", "pubsub 0 0 0")
    finally:
        client.close()


def redis_benchmark_publish(
    port: int, *, pipeline: int, requests: int, clients: int = 50, subscribed: bool = False
) -> float | None:
    """``redis-benchmark``'s PUBLISH rate (messages/s) with a ~100-byte payload; ``None`` if
    the tool is missing, or if the subscriber did not get every message (Redis would have cut
    it off, see ``unlimited_pubsub_buffers``)."""
    tool = shutil.which("redis-benchmark")
    if tool is None:
        return None
    # As long as a token event; without quotes, which redis-benchmark's CSV does not escape.
    payload = "x" * len(encode_token("0" * 32, 123, PAYLOAD_TEXT))
    subscriber = Subscriber(port, ["bench-ch"]) if subscribed else None
    try:
        args = [tool, "-p", str(port), "-c", str(clients), "-n", str(requests)]
        args += ["-P", str(pipeline), "--csv", "PUBLISH", "bench-ch", payload]
        out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
        if subscriber is not None and not subscriber.wait_for(requests * len(payload)):
            return None
    finally:
        if subscriber is not None:
            subscriber.close()
    rows = list(csv.reader(out.stdout.splitlines()))
    if len(rows) < 2 or "rps" not in rows[0]:
        return None
    return float(rows[1][rows[0].index("rps")])


def pipelined_publish(client: redis.Redis, *, batch: int, total: int) -> float:
    """redis-py, one connection: PUBLISH in pipelines of ``batch``; messages/s."""
    payload = encode_token("0" * 32, 123, PAYLOAD_TEXT)
    began = time.perf_counter()
    for _ in range(max(1, total // batch)):
        pipe = client.pipeline(transaction=False)
        for _ in range(batch):
            pipe.publish("bench-ch", payload)
        pipe.execute()
    return (total // batch) * batch / (time.perf_counter() - began)


@dataclass(frozen=True)
class LogCost:
    """One way of publishing tokens, at one batch size (tokens per round trip)."""

    method: str  # publish | lua-publish | lua-xadd-publish
    batch: int
    client_rate: float  # tokens/s one redis-py connection achieves
    server_us_per_token: float  # Redis CPU per token (INFO used_cpu: I/O included)
    command_us_per_token: float  # Redis's time in the commands themselves (INFO commandstats)
    depth: int = 1  # jobs per round trip: >1 is the worker's flusher (PUBLISH_MANY calls)

    @property
    def label(self) -> str:
        if self.depth == 1:
            return str(self.batch)
        return f"{self.batch} per job, {self.depth} jobs per round trip"

    @property
    def server_capacity(self) -> float:
        """Tokens/s one Redis core could take at this cost."""
        return 1e6 / self.server_us_per_token if self.server_us_per_token > 0 else float("inf")


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class _Jobs:
    """Fresh jobs, each owned by ``owner`` with nothing published, as the script expects."""

    def __init__(self, client: redis.Redis, prefix: str, count: int) -> None:
        self.keys = Keys(prefix)
        self.ids = [f"j{index}" for index in range(count)]
        pipe = client.pipeline(transaction=False)
        for job_id in self.ids:
            pipe.hset(self.keys.state(job_id), mapping={"owner": "bench", "seq": -1})
        pipe.execute()

    def channels(self) -> list[str]:
        return [self.keys.channel(job_id) for job_id in self.ids]


def _publish_tokens(
    client: redis.Redis, jobs: _Jobs, method: str, batch: int, depth: int = 1
) -> Callable[[], int]:
    """A function that publishes every job's tokens ``batch`` per call, or with ``depth`` > 1
    ``depth`` jobs per round trip as the flusher does; returns the tokens sent."""
    if depth > 1:
        return _pipelined(client, jobs, method, batch, depth)
    lua = client.register_script(
        scripts.PUBLISH if method == "lua-xadd-publish" else PUBLISH_ONLY_SCRIPT
    )

    def run() -> int:
        sent = 0
        for job_id in jobs.ids:
            keys = list(jobs.keys.job_keys(job_id))
            for start in range(0, TOKENS_PER_JOB, batch):
                seqs = range(start, min(start + batch, TOKENS_PER_JOB))
                payloads = [(seq, encode_token(job_id, seq, PAYLOAD_TEXT)) for seq in seqs]
                if method == "publish":
                    pipe = client.pipeline(transaction=False)
                    for _, payload in payloads:
                        pipe.publish(keys[2], payload)
                    pipe.execute()
                else:
                    args: list[Any] = ["bench", 10_000, "PUBLISH", 600, len(payloads), 0]
                    for seq, payload in payloads:
                        args += (seq, payload)
                    lua(keys=keys, args=args)
                sent += len(payloads)
        return sent

    return run


def _pipelined(
    client: redis.Redis, jobs: _Jobs, method: str, batch: int, depth: int
) -> Callable[[], int]:
    """As the worker's flusher sends: each round trip carries ``depth`` jobs' next ``batch``
    tokens, in ``PUBLISH_MANY`` calls of ``JOBS_PER_CALL`` jobs (``depth`` x ``batch``
    PUBLISHes for PUBLISH alone)."""
    many = scripts.PUBLISH_MANY if method == "lua-xadd-publish" else PUBLISH_MANY_ONLY_SCRIPT
    sha = "" if method == "publish" else client.script_load(many)

    def run() -> int:
        sent = 0
        for first in range(0, len(jobs.ids), depth):
            ids = jobs.ids[first : first + depth]
            group = [(job_id, list(jobs.keys.job_keys(job_id))) for job_id in ids]
            for start in range(0, TOKENS_PER_JOB, batch):
                seqs = range(start, min(start + batch, TOKENS_PER_JOB))
                pipe = client.pipeline(transaction=False)
                for call in range(0, len(group), JOBS_PER_CALL):
                    keys: list[str] = []
                    args: list[Any] = []
                    for job_id, job_keys in group[call : call + JOBS_PER_CALL]:
                        payloads = [(seq, encode_token(job_id, seq, PAYLOAD_TEXT)) for seq in seqs]
                        sent += len(payloads)
                        if method == "publish":
                            for _, payload in payloads:
                                pipe.publish(job_keys[2], payload)
                            continue
                        job_args: list[Any] = ["bench", 10_000, "PUBLISH", 600, len(payloads), 0]
                        for seq, payload in payloads:
                            job_args += (seq, payload)
                        keys += job_keys
                        args += [len(job_keys), len(job_args), *job_args]
                    if keys:
                        pipe.evalsha(sha, len(keys), *keys, *args)
                pipe.execute()
        return sent

    return run


ROUNDS: Final = 4
_COMMAND: Final = {"publish": "cmdstat_publish"}


def _command_usec(client: redis.Redis, method: str) -> float:
    """Redis's own time executing the method's commands (INFO commandstats), in µs."""
    stats = client.info("commandstats")
    entry = stats.get(_COMMAND.get(method, "cmdstat_evalsha"), {})
    return float(entry.get("usec", 0)) if isinstance(entry, dict) else 0.0


def log_costs(
    port: int,
    batches: Sequence[int],
    tokens: int,
    methods: Sequence[str],
    pipelined: int = 0,
) -> list[LogCost]:
    """Each method at each batch size, over ``tokens`` tokens (ten times as many for batches of
    10 and more) in 200-token jobs, with one subscriber on every job channel, as in real use;
    with ``pipelined``, also one token per call and that many calls (jobs) per round trip, the
    worker's flusher's way. The methods take turns in ``ROUNDS`` rounds, so a noisy moment does
    not hit one alone."""
    client = redis.Redis(port=port, socket_timeout=30)
    results = []
    setups = [(batch, 1) for batch in batches] + ([(1, pipelined)] if pipelined > 1 else [])
    try:
        for batch, depth in setups:
            # Cheaper setups per token: more tokens keep the timing precise.
            jobs_per_round = max(
                depth, tokens * min(max(batch, depth), 10) // TOKENS_PER_JOB // ROUNDS
            )
            sums = {method: [0.0, 0.0, 0.0, 0.0] for method in methods}
            for round_ in range(ROUNDS):
                for index, method in enumerate(methods):
                    jobs = _Jobs(client, f"lc{index}b{batch}d{depth}r{round_}", jobs_per_round)
                    subscriber = Subscriber(port, jobs.channels())
                    try:
                        run = _publish_tokens(client, jobs, method, batch, depth)
                        client.config_resetstat()
                        cpu = _redis_cpu(client)
                        began = time.perf_counter()
                        sent = run()
                        elapsed = time.perf_counter() - began
                        used = _redis_cpu(client) - cpu
                        usec = _command_usec(client, method)
                    finally:
                        subscriber.close()
                    for i, value in enumerate((sent, elapsed, used, usec)):
                        sums[method][i] += value
                    client.flushdb()
            for method, (total, seconds, cpu_s, command_us) in sums.items():
                results.append(
                    LogCost(
                        method,
                        batch,
                        total / seconds,
                        cpu_s / total * 1e6,
                        command_us / total,
                        depth,
                    )
                )
    finally:
        client.close()
    return results


def pubsub_hop(port: int, workdir: Path, messages: int, interval_s: float) -> Summary:
    """ms from a redis-py ``PUBLISH`` to a subscriber in a process of its own (the tap), one
    message every ``interval_s``: the Redis leg of a token's path at an idle pace, with no
    tokenrelay code on either side (the publisher stamps right before it sends)."""
    prefix = "hop"
    tap = Tap(f"redis://127.0.0.1:{port}", prefix, workdir / "hop-tap.txt").start()
    client = redis.Redis(port=port, socket_timeout=10)
    sent: list[tuple[str, int]] = []
    try:
        channel = Keys(prefix).channel("0" * 32)
        for index in range(messages):
            time.sleep(interval_s)
            stamp = time.time_ns()
            text = f"|{index}:{stamp}"
            client.publish(channel, b'{"text":"%s"}' % text.encode())
            sent.append((text, stamp))
        time.sleep(0.2)  # the last message's way to the tap
    finally:
        client.close()
        seen = tap.stop()
    return Summary.of([(seen[text] - stamp) / 1e6 for text, stamp in sent if text in seen])

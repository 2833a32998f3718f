"""One flusher per worker process: every stream's buffered events go to Redis in one pipeline.

Streams never talk to Redis for their tokens. A stream appends each event to its publisher's
buffer and marks the publisher dirty; the flusher (a thread, a greenlet under gevent) wakes, lets
whatever else is ready run first, then sends one ``EVALSHA`` of the ``PUBLISH`` script per dirty
job, all of them in one write, and reads the replies. Nothing waits for a batch to fill: a lone
token goes out on the next turn of the loop, and what arrives while a round trip is in flight
goes out on the one after. One round trip is shared by every stream with something to send,
and the commands are packed here from pre-encoded pieces instead of by redis-py's generic
packer, which was the largest part of a token's CPU.

A job has at most one batch in flight (the flusher is single), so its events reach Redis in
order. A batch that fails on a dropped connection is sent again (the script skips seqs already
in the log) with the client's retry policy; when that gives up, the batch's jobs get the error.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final

import redis
from redis.exceptions import NoScriptError, ResponseError

from producer import scripts
from worker import metrics
from worker.errors import Fenced

log = logging.getLogger("tokenrelay.worker")

#: A stream that has this many events unsent waits for the flusher (Redis is slow or away).
MAX_BUFFERED: Final = 10_000
#: Bytes per write: a larger backlog is sent as several pipelines.
MAX_WRITE: Final = 1 << 20


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _utf8(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class Outbox:
    """The events of one job attempt that are waiting for the flusher, and what came back.

    The stream appends; the flusher takes. ``deque`` appends and pops are atomic, so this also
    holds when the flusher is a real thread (the benchmark's in-process profile).
    """

    def __init__(self, flusher: Flusher, keys: Iterable[str], head: Iterable[object]) -> None:
        self.flusher = flusher
        # EVALSHA's fixed arguments after the command name and SHA: numkeys, keys, the head.
        key_list = [_utf8(k) for k in keys]
        fixed = [b"%d" % len(key_list), *key_list, *(_utf8(a) for a in head)]
        self.fixed = b"".join(bulk(a) for a in fixed)
        self.fixed_count = len(fixed)
        self.events: deque[tuple[int, bytes, int]] = deque()
        self.final: list[bytes] | None = None
        self.inflight: list[tuple[int, bytes, int]] = []
        self.acked_seq = -1  # the last seq Redis has confirmed
        self.result = 0  # the script's last answer: 1 = cancel requested
        self.sending_final = False
        self.error: BaseException | None = None
        self.closed = False  # the final batch was confirmed (or failed)
        #: Called by the flusher with ``fenced`` or ``cancelled`` when the script says so.
        self.on_signal: Callable[[str], None] | None = None
        #: Called by the flusher with the tokens Redis confirmed and when their batch was sent.
        self.on_confirmed: Callable[[int, float], None] | None = None
        self.changed = threading.Event()

    def put(self, seq: int, payload: bytes, tokens: int) -> None:
        self.events.append((seq, payload, tokens))

    def submit(self) -> None:
        self.flusher.submit(self)

    def wait_for(self, seq: int, timeout: float) -> None:
        """Block until Redis confirmed ``seq`` (or the batch failed); raise its error."""
        deadline = time.monotonic() + timeout
        while True:
            self.changed.clear()
            if self.error is not None:
                raise self.error
            if self.acked_seq >= seq:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise redis.TimeoutError(f"events not confirmed by Redis within {timeout:g} s")
            self.submit()
            self.changed.wait(left)


class Flusher:
    """Sends the dirty outboxes of one worker process, one pipeline per loop turn."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._script = client.register_script(scripts.PUBLISH)  # loaded on the first NOSCRIPT
        self._evalsha = b"$7\r\nEVALSHA\r\n" + bulk(self._script.sha.encode())
        self._dirty: dict[Outbox, None] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tokenrelay-flusher", daemon=True)
        self._thread.start()

    def outbox(self, keys: Iterable[str], head: Iterable[object]) -> Outbox:
        return Outbox(self, keys, head)

    def submit(self, box: Outbox) -> None:
        self._dirty[box] = None
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def _run(self) -> None:
        # A connection of its own, outside the streams' pool; it connects on first use, under
        # the client's retry policy like every later reconnect.
        pool = self._client.connection_pool
        conn = pool.connection_class(**pool.connection_kwargs)
        try:
            while not self._stopping:
                self._wake.wait(1.0)
                self._wake.clear()
                # Let every stream that is ready run first: what they buffer joins this turn.
                time.sleep(0)
                while self._dirty:
                    boxes = list(self._dirty)
                    self._dirty.clear()
                    try:
                        self._send_all(conn, boxes)
                    except Exception as exc:  # a bug, not Redis: fail the jobs, keep flushing
                        log.exception("the flusher failed")
                        for box in boxes:
                            self._fail(box, exc)
        finally:
            conn.disconnect()

    def _send_all(self, conn: Any, boxes: list[Outbox]) -> None:
        batch: list[Outbox] = []
        size = 0
        for box in boxes:
            if box.closed:
                continue
            size += self._take(box)
            batch.append(box)
            if size >= MAX_WRITE:
                self._send(conn, batch)
                batch, size = [], 0
        if batch:
            self._send(conn, batch)

    @staticmethod
    def _take(box: Outbox) -> int:
        """Move the box's new events into its in-flight batch; the batch's size in bytes."""
        events, inflight = box.events, box.inflight
        for _ in range(len(events)):
            inflight.append(events.popleft())
        return sum(len(payload) for _, payload, _ in inflight) + 64 * len(inflight)

    def _pack(self, box: Outbox) -> bytes:
        final = box.final if box.final is not None and not box.events else None
        inflight = box.inflight
        tokens = sum(t for _, _, t in inflight)
        count = 2 + box.fixed_count + 2 + (len(final) if final else 0) + 2 * len(inflight)
        parts = [
            b"*%d\r\n" % count,
            self._evalsha,
            box.fixed,
            bulk(b"%d" % tokens),
            bulk(b"%d" % (len(final) if final else 0)),
        ]
        if final:
            parts += [bulk(v) for v in final]
        for seq, payload, _ in inflight:
            s = b"%d" % seq
            parts.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(s), s, len(payload), payload))
        box.sending_final = final is not None
        return b"".join(parts)

    def _send(self, conn: Any, batch: list[Outbox]) -> None:
        data = b"".join([self._pack(box) for box in batch])

        def roundtrip() -> list[Any]:
            conn.send_packed_command([data], check_health=False)
            replies: list[Any] = []
            for _ in batch:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:  # this command failed; the connection is fine
                    replies.append(exc)
            return replies

        began = time.monotonic()
        try:
            replies = conn.retry.call_with_retry(roundtrip, lambda _error: conn.disconnect())
        except Exception as exc:  # the retry policy gave up: the jobs see the error
            log.warning("publishing to Redis failed: %s", type(exc).__name__)
            for box in batch:
                self._fail(box, exc)
            return
        now = time.monotonic()
        metrics.PUBLISH.observe(now - began)
        tokens = 0
        reload = False
        for box, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                reload = True  # Redis restarted without its script cache: load, send again
                self._dirty[box] = None
                continue
            if isinstance(reply, Exception):
                self._fail(box, reply)
                continue
            tokens += self._confirm(box, int(reply), began)
        if tokens:
            metrics.TOKENS.inc(tokens)
        if reload:  # the boxes are dirty again: the run loop sends them after this
            with contextlib.suppress(redis.RedisError):
                self._client.script_load(scripts.PUBLISH)

    @staticmethod
    def _confirm(box: Outbox, reply: int, began: float) -> int:
        """Apply one script reply to its box; return the tokens Redis took."""
        inflight = box.inflight
        tokens = 0 if reply == -1 else sum(t for _, _, t in inflight)
        if inflight:
            box.acked_seq = inflight[-1][0]
        box.inflight = []
        if tokens and box.on_confirmed is not None:
            box.on_confirmed(tokens, began)
        signal = None
        if reply == -1:
            box.error = Fenced("another attempt owns the job")
            box.closed = True
            signal = "fenced"
        elif box.sending_final:
            box.closed = True
        elif reply == 1 and box.result != 1:
            signal = "cancelled"
        box.result = reply
        box.changed.set()
        if signal and box.on_signal is not None:
            box.on_signal(signal)
        return tokens

    @staticmethod
    def _fail(box: Outbox, exc: BaseException) -> None:
        box.inflight = []
        box.error = exc
        box.closed = True
        box.changed.set()

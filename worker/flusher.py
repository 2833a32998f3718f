"""One flusher per worker process: every stream's buffered events go to Redis in one pipeline.

Streams never talk to Redis for their tokens. A stream appends each event to its publisher's buffer
and marks the publisher dirty; the flusher (a thread, a greenlet under gevent) wakes and sends one
``EVALSHA`` of the ``PUBLISH_MANY`` script per ``JOBS_PER_CALL`` dirty jobs, all of them in one
write, and reads the replies (one per job in each call's reply). Nothing waits for a batch to fill:
a lone token goes out on the next turn of the loop, and what arrives while a round trip is in
flight goes out on the one after. One round trip is shared by every stream with something to send,
and the commands are packed here from pre-encoded pieces instead of by redis-py's generic packer,
which was the largest part of a token's CPU.

One call for many jobs instead of one per job: Redis's cost per call (parsing it, finding the
script, setting up Lua) and the flusher's cost per reply are shared by the call's jobs; calls are
kept to ``JOBS_PER_CALL`` jobs so that no single script holds Redis for long. The flusher runs on
a single Redis only (on a cluster a call's keys would span slots; there each stream calls
``PUBLISH`` itself).

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
#: Jobs per PUBLISH_MANY call: 64 jobs with one token each hold Redis for about half a ms.
JOBS_PER_CALL: Final = 64


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
        # The job's keys and its fixed arguments, encoded once.
        key_list = [_utf8(k) for k in keys]
        head_list = [_utf8(a) for a in head]
        self.keys = b"".join(bulk(k) for k in key_list)
        self.key_count = len(key_list)
        self.head = b"".join(bulk(a) for a in head_list)
        self.head_count = len(head_list)
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
        self._script = client.register_script(scripts.PUBLISH_MANY)  # loaded on the first NOSCRIPT
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

    def _pack(self, call: list[Outbox]) -> bytes:
        """One ``EVALSHA`` of ``PUBLISH_MANY`` for the boxes of ``call``."""
        keys: list[bytes] = []
        args: list[bytes] = []
        key_count = arg_count = 0
        for box in call:
            final = box.final if box.final is not None and not box.events else None
            inflight = box.inflight
            finals = len(final) if final else 0
            count = box.head_count + 2 + finals + 2 * len(inflight)
            keys.append(box.keys)
            key_count += box.key_count
            args += [
                bulk(b"%d" % box.key_count),
                bulk(b"%d" % count),
                box.head,
                bulk(b"%d" % sum(t for _, _, t in inflight)),
                bulk(b"%d" % finals),
            ]
            if final:
                args += [bulk(v) for v in final]
            for seq, payload, _ in inflight:
                s = b"%d" % seq
                args.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(s), s, len(payload), payload))
            arg_count += 2 + count
            box.sending_final = final is not None
        head = [b"*%d\r\n" % (3 + key_count + arg_count), self._evalsha, bulk(b"%d" % key_count)]
        return b"".join(head + keys + args)

    def _send(self, conn: Any, batch: list[Outbox]) -> None:
        calls = [batch[i : i + JOBS_PER_CALL] for i in range(0, len(batch), JOBS_PER_CALL)]
        data = b"".join([self._pack(call) for call in calls])

        def roundtrip() -> list[Any]:
            conn.send_packed_command([data], check_health=False)
            replies: list[Any] = []
            for _ in calls:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:  # this call failed; the connection is fine
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
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, NoScriptError):
                reload = True  # Redis restarted without its script cache: load, send again
                for box in call:
                    self._dirty[box] = None
                continue
            for box, answer in zip(call, _per_job(reply, len(call)), strict=True):
                if isinstance(answer, Exception):
                    self._fail(box, answer)
                else:
                    tokens += self._confirm(box, int(answer), began)
        if tokens:
            metrics.TOKENS.inc(tokens)
        if reload:  # the boxes are dirty again: the run loop sends them after this
            with contextlib.suppress(redis.RedisError):
                self._client.script_load(scripts.PUBLISH_MANY)

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


def _per_job(reply: Any, jobs: int) -> list[Any]:
    """A ``PUBLISH_MANY`` reply as one answer per job: the call's error for each of its jobs if
    the whole call failed."""
    if isinstance(reply, Exception):
        return [reply] * jobs
    if not isinstance(reply, list) or len(reply) != jobs:
        return [ResponseError(f"PUBLISH_MANY answered {reply!r:.80} for {jobs} jobs")] * jobs
    return reply

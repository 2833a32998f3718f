"""The producer library on ``redis.asyncio``: the same jobs, events and guarantees as
``producer.client``, for asyncio services (the gateway uses it).

    async with AsyncClient(redis_url="redis://127.0.0.1:6379/0") as client:
        job = await client.submit(prompt="Alan Turing was", max_tokens=64, follow=True)
        async for token in job.tokens():
            print(token, end="", flush=True)

However many jobs are followed at once, one ``AsyncClient`` holds one pub/sub connection: the
``Multiplexer`` subscribes to each job's channel once and hands every message to the readers of
that job through a bounded buffer. A reader that falls too far behind loses its buffer, not its
events: it reads what it missed from the job's log, as it does after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import scripts
from producer.client import cancel_call, create_caller, override_settings, prepare
from producer.connection import async_redis, is_cluster
from producer.enqueue import Enqueuer
from producer.protocol import Event, EventType, Keys, encode_cancel, validate_job_id
from producer.reading import (
    JobFailedError,
    JobNotFound,
    JobState,
    Published,
    Sequencer,
    Transcript,
    Verdict,
    published_from_log,
    published_live,
)
from producer.settings import Settings

log = logging.getLogger("tokenrelay.producer")

LOG_BATCH: Final = 1000
#: How often a reader without a confirmed subscription reads the log.
POLL_INTERVAL: Final = 1.0
#: With a confirmed subscription live messages cannot be missed (a reconnect or a resubscribe
#: makes every reader catch up from the log once the subscription is back): the log is read
#: after this long without a live message only as a backstop.
IDLE_POLL: Final = 5.0
BUFFER: Final = 1024  # live messages held per reader before it falls back to the log


class _Live:
    """A live message as the multiplexer hands it to every reader of its job: decoded the first
    time a reader needs it, and once however many readers do (a reader that already has the
    event from the log never does)."""

    __slots__ = ("_data", "_decoded", "_published")

    def __init__(self, data: Any) -> None:
        self._data = data
        self._decoded = False
        self._published: Published | None = None

    @property
    def published(self) -> Published | None:
        """The event with its bytes, or ``None`` if the message is not an event."""
        if not self._decoded:
            self._published = published_live(self._data)
            self._decoded = True
        return self._published


async def _as_received(message: Any) -> Any:
    """redis-py's pub/sub push handler, minus its per-message debug log line (which formats the
    whole message whether or not debug logging is on)."""
    return message


class _Listener:
    """One reader's end of the multiplexer: a bounded buffer of live messages (``None`` marks a
    gap: read the log), and a wait for the next one that keeps at most one timer armed,
    moved on only when it fires, instead of a timer and a task per event."""

    def __init__(self, size: int, stats: dict[str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.overflowed = False
        self.live = False  # the channel's subscription is confirmed on the current connection
        self._items: list[_Live | None] = []
        self._size = size
        self._stats = stats
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = 0.0  # when the current wait ends
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def offer(self, item: _Live) -> None:
        if self.overflowed:
            return
        if len(self._items) >= self._size:
            self._stats["overflows"] += 1
            # Too slow to keep up live: drop the buffer, the reader catches up from the log.
            self.gap()
            return
        self._items.append(item)
        self._wake()

    def gap(self) -> None:
        self.overflowed = True
        self._items = [None]
        self._wake()

    def drain(self) -> list[_Live | None]:
        """Everything buffered, oldest first; live messages are buffered again from here on."""
        items, self._items = self._items, []
        self.overflowed = False
        return items

    async def wait(self, seconds: float) -> bool:
        """Wait until something is buffered, at most ``seconds``; whether something is."""
        if self._items:
            return True
        if seconds <= 0:
            return False
        self._wake_at = self._loop.time() + seconds
        if self._timer is None or self._timer_at > self._wake_at:
            self._arm(self._wake_at)
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        return bool(self._items)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None:
            return  # nobody waits: the next wait arms a timer again
        if self._wake_at > self._timer_at:
            self._arm(self._wake_at)  # this wait began after the timer was set: move it on
        else:
            self._wake()


class Multiplexer:
    """One pub/sub connection shared by every reader of one client.

    ``subscribe`` returns once Redis has confirmed the subscription, so a reader that reads the
    log afterwards cannot miss an event between the two. If the connection drops, it reconnects
    with backoff, subscribes again, and tells every reader to fill the gap from the log.
    """

    def __init__(
        self, redis_client: redis.asyncio.Redis, buffer: int = BUFFER, *, sharded: bool = False
    ) -> None:
        self._redis = redis_client
        self._sharded = sharded
        self._buffer = buffer
        self._listeners: dict[str, set[_Listener]] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._pubsub: Any = None  # a PubSub, or a ClusterPubSub when sharded
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._wake = asyncio.Event()
        self.stats = {"overflows": 0, "reconnects": 0, "resubscribes": 0}

    @property
    def channels(self) -> int:
        return len(self._listeners)

    async def subscribe(self, channel: str) -> _Listener:
        listener = _Listener(self._buffer, self.stats, asyncio.get_running_loop())
        async with self._lock:
            self._ensure_running()
            first = channel not in self._listeners
            self._listeners.setdefault(channel, set()).add(listener)
            if first:
                self._confirmed[channel] = asyncio.get_running_loop().create_future()
                await self._send_subscribe([channel])
                self._wake.set()
            confirmed = self._confirmed.get(channel)
        if confirmed is not None:
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(confirmed)
                listener.live = True
            except TimeoutError:
                listener.gap()  # unconfirmed: poll the log until live messages flow
        return listener

    async def unsubscribe(self, channel: str, listener: _Listener) -> None:
        listener.close()
        async with self._lock:
            listeners = self._listeners.get(channel)
            if listeners is None:
                return
            listeners.discard(listener)
            if listeners:
                return
            del self._listeners[channel]
            self._confirmed.pop(channel, None)
            # After ``close`` the connection is gone: a reader finalized late (an ``events()``
            # left suspended by a ``break``) must not open it again.
            if self._pubsub is not None and not self._closed:
                with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
                    if self._sharded:
                        await self._pubsub.sunsubscribe(channel)
                    else:
                        await self._pubsub.unsubscribe(channel)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        async with self._lock:  # not under an unsubscribe that is sending
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _send_subscribe(self, channels: Sequence[str]) -> None:
        if self._pubsub is None:
            if self._sharded:
                await self._redis.initialize()  # learn the slot map before subscribing by slot
            self._pubsub = self._redis.pubsub(push_handler_func=_as_received)
        # On failure the reader task reconnects and subscribes again; meanwhile readers poll.
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
            if self._sharded:
                await self._pubsub.ssubscribe(*channels)
            else:
                await self._pubsub.subscribe(*channels)

    async def _run(self) -> None:
        delay = 0.05
        while not self._closed:
            try:
                await self._pump()
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); reconnecting", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            await self._reconnect()

    async def _pump(self) -> None:
        while True:
            pubsub = self._pubsub
            idle = pubsub is None or not self._listeners
            if not idle and not self._sharded and not pubsub.subscribed:
                idle = True
            if idle:
                # Nothing to read yet: wait for the next subscribe rather than polling.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            if self._sharded:
                message = await pubsub.get_sharded_message(timeout=1.0)
            else:
                message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            self._handle(message)
            if not self._sharded:
                await self._drain(pubsub)

    async def _drain(self, pubsub: Any) -> None:
        """Hand on every reply already read off the socket, without ``get_message``'s wrapping
        of each one (retry and health-check layers, a dict per message: 11 µs of CPU per message
        against 7 µs here). A live message goes straight to its readers; any other reply
        (subscribe confirmations, a health check's pong) goes through redis-py's
        ``handle_message``, which keeps the subscription's own bookkeeping."""
        connection = pubsub.connection
        while connection is not None:
            # A zero timeout returns None at once when nothing is buffered.
            response = await connection.read_response(
                timeout=0, disconnect_on_error=False, push_request=True
            )
            if response is None:
                return
            if isinstance(response, list) and len(response) == 3 and response[0] == b"message":
                self._offer(response[1], response[2])
                continue
            message = await pubsub.handle_message(response)
            if message is not None:
                self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message.get("channel")
        if channel is None:  # a pong or another reply with no channel
            return
        if kind in ("message", "smessage"):
            self._offer(channel, message["data"])
        elif kind in ("subscribe", "ssubscribe"):
            name = channel.decode() if isinstance(channel, bytes) else channel
            future = self._confirmed.get(name)
            listeners = self._listeners.get(name, set())
            if future is not None and not future.done():
                future.set_result(None)
            else:
                # Subscribed again (after a reconnect, ours or redis-py's): whatever was
                # published meanwhile is only in the log.
                self.stats["resubscribes"] += 1
                for listener in listeners:
                    listener.gap()
            for listener in listeners:
                listener.live = True

    def _offer(self, channel: bytes | str, data: Any) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        listeners = self._listeners.get(name)
        if listeners:
            item = _Live(data)
            for listener in listeners:
                listener.offer(item)

    async def _reconnect(self) -> None:
        self.stats["reconnects"] += 1
        async with self._lock:
            old, self._pubsub = self._pubsub, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.aclose()
            channels = list(self._listeners)
            for channel in channels:
                for listener in self._listeners[channel]:
                    listener.live = False
                    listener.gap()
            if channels:
                await self._send_subscribe(channels)


class AsyncClient:
    """The asyncio twin of ``producer.Client``."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        broker_url: str | None = None,
        prefix: str | None = None,
        settings: Settings | None = None,
        max_connections: int = 16,
        buffer: int = BUFFER,
        client_name: str | None = None,
    ) -> None:
        base = settings or Settings.from_env()
        self.settings = override_settings(base, redis_url, broker_url, prefix)
        self.keys = Keys(self.settings.prefix)
        # A bounded pool: commands wait for a free connection rather than opening more.
        self.redis = async_redis(
            self.settings.redis_url, max_connections=max_connections, client_name=client_name
        )
        self.sharded = is_cluster(self.settings.redis_url)
        self.multiplexer = Multiplexer(self.redis, buffer, sharded=self.sharded)
        self._create = self.redis.register_script(scripts.CREATE)
        self._cancel = self.redis.register_script(scripts.CANCEL)
        self._enqueuer = Enqueuer(self.settings)
        self._create_call = create_caller(self.settings, self._enqueuer, sharded=self.sharded)

    async def close(self) -> None:
        await self.multiplexer.close()
        await asyncio.to_thread(self._enqueuer.close)
        if isinstance(self.redis, redis.asyncio.Redis):
            await self.redis.aclose(close_connection_pool=True)
        else:  # a RedisCluster closes its nodes' pools itself
            await self.redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def submit(
        self,
        prompt: str | None = None,
        *,
        job_id: str | None = None,
        follow: bool = False,
        tenant: str | None = None,
        **request: Any,
    ) -> AsyncJob:
        """Validate and enqueue a job (the keyword arguments of ``Client.submit``)."""
        return await self.submit_request(
            {"prompt": prompt, **request}, job_id=job_id, follow=follow, tenant=tenant
        )

    async def submit_request(
        self,
        request: dict[str, Any],
        *,
        job_id: str | None = None,
        follow: bool = False,
        tenant: str | None = None,
    ) -> AsyncJob:
        """``submit`` with the job's fields as one mapping, e.g. an HTTP request's body; a field
        that is not a job field is refused by name."""
        job_id, spec = prepare(self.settings, request, job_id)
        job = AsyncJob(self, job_id)
        if follow:
            await job.open()
        if self.sharded:  # the queued set is on another slot: join it first (see CREATE)
            await self.redis.zadd(self.keys.queued, {job_id: int(time.time() * 1000)}, nx=True)
        keys, args = self._create_call(job_id, spec, tenant)
        created = await self._create(keys=keys, args=args)
        if created and not self._enqueuer.in_script:
            try:
                # kombu's producer blocks; keep it off the event loop.
                await asyncio.to_thread(self._enqueuer.send, job_id, spec)
            except Exception:
                # Not accepted: leave no queued job behind that no worker will ever run.
                await self.redis.delete(self.keys.state(job_id))
                await self.redis.zrem(self.keys.queued, job_id)
                await job.close()
                raise
        return job

    async def subscribe(self, job_id: str, *, after: int = -1, wait: float = 0.0) -> AsyncJob:
        """A job to read from event ``after + 1`` on; ``JobNotFound`` if it does not exist."""
        validate_job_id(job_id)
        deadline = time.monotonic() + wait
        while not await self.redis.exists(self.keys.state(job_id), self.keys.log(job_id)):
            if time.monotonic() >= deadline:
                raise JobNotFound(job_id)
            await asyncio.sleep(0.05)
        return AsyncJob(self, job_id, after=after)

    async def status(self, job_id: str) -> JobState:
        validate_job_id(job_id)
        raw = await self.redis.hgetall(self.keys.state(job_id))
        if not raw:
            raise JobNotFound(job_id)
        return JobState.from_hash(job_id, raw)

    async def cancel(self, job_id: str) -> JobState:
        validate_job_id(job_id)
        keys, args = cancel_call(self.settings, self.keys, job_id)
        status = await self._cancel(keys=keys, args=args)
        if status is None:
            raise JobNotFound(job_id)
        if status == b"running":
            await self.redis.publish(self.keys.control, encode_cancel(job_id))
        return await self.status(job_id)


class AsyncJob:
    """One job's events, once and in order, whenever the reader joined."""

    def __init__(
        self, client: AsyncClient, job_id: str, after: int = -1, *, keep_text: bool = True
    ) -> None:
        self.client = client
        self.id = job_id
        self.sequencer = Sequencer(last=after)
        self.transcript = Transcript(keep_text=keep_text)
        self._listener: _Listener | None = None
        self._started = False  # the log has been read to its end once
        self._behind = False  # the last log read filled a batch: read on before live events
        self._ended = False  # resumed after the last event of a job that has ended

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    @property
    def channel(self) -> str:
        return self.client.keys.channel(self.id)

    @property
    def done(self) -> bool:
        """Whether this reader has had the job's terminal event (or resumed past it)."""
        return self._ended or self.sequencer.done

    async def open(self) -> None:
        if self._listener is None:
            self._listener = await self.client.multiplexer.subscribe(self.channel)

    async def close(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await self.client.multiplexer.unsubscribe(self.channel, listener)

    async def events(self, timeout: float | None = None) -> AsyncIterator[Event]:
        """Yield events up to the terminal one; ``TimeoutError`` past ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.done:
                wait = IDLE_POLL
                if deadline is not None and self._started:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError(f"job {self.id}: no terminal event in {timeout} s")
                for item in await self.next_events(wait):
                    yield item.event
        finally:
            await self.close()

    async def next_events(self, wait: float = IDLE_POLL) -> list[Published]:
        """The next events, in order and each once, with the bytes they were published as: all
        that are ready, else those that come within ``wait`` seconds; ``[]`` if none came or
        the job is ``done``. Waits at most ``IDLE_POLL`` (``POLL_INTERVAL`` while the
        subscription is not confirmed), then reads the log in case a live message was lost.
        The sequencer and the transcript count an event when it is returned.
        The caller closes the job (``events`` does it itself)."""
        await self.open()
        assert self._listener is not None
        if not self._started:
            return await self._start()
        if self.done:
            return []
        if self._behind:
            return await self._catch_up()
        listener = self._listener
        if not await listener.wait(min(wait, IDLE_POLL if listener.live else POLL_INTERVAL)):
            return await self._catch_up()
        out: list[Published] = []
        sequencer = self.sequencer
        for live in listener.drain():
            item = None if live is None else live.published
            verdict = Verdict.GAP if item is None else sequencer.judge(item.event)
            if verdict is Verdict.NEXT:
                assert item is not None
                out.append(self._deliver(item))
                if sequencer.done:
                    break
            elif verdict is Verdict.GAP:
                # The log holds every event published before now, so it holds the rest of
                # these too: what follows them is still in the buffer.
                out += await self._catch_up()
                break
        return out

    async def _start(self) -> list[Published]:
        """The log from the reader's position; subscribed before, so nothing falls between."""
        out = await self._catch_up()
        if not self._behind:
            self._started = True
            if not self.sequencer.done and self.sequencer.last >= 0:
                # Resuming after the last event of a job that has ended: nothing more to come.
                state = await self.client.status(self.id)
                if state.terminal and state.last_seq <= self.sequencer.last:
                    self._ended = True
        return out

    async def _catch_up(self) -> list[Published]:
        """The next batch of events from the log."""
        entries = await self.client.redis.xrange(
            self.client.keys.log(self.id), min=self.sequencer.log_start, count=LOG_BATCH
        )
        entries = entries or []
        self._behind = len(entries) >= LOG_BATCH
        out = []
        for item in published_from_log(entries):
            if self.sequencer.judge(item.event) is Verdict.NEXT:
                out.append(self._deliver(item))
        if self.sequencer.done:
            self._behind = False
        return out

    def _deliver(self, item: Published) -> Published:
        self.transcript.add(self.sequencer.deliver(item.event))
        return item

    async def tokens(self, timeout: float | None = None) -> AsyncIterator[str]:
        """Token texts as they arrive; ``JobFailedError`` if the job errs or is cancelled."""
        async for event in self.events(timeout):
            if event.type is EventType.TOKEN:
                yield event.text
            elif event.type in (EventType.ERROR, EventType.CANCELLED):
                error = JobFailedError(event)
                error.partial_text = self.transcript.text
                raise error

    async def text(self, timeout: float | None = 300.0) -> str:
        async for _ in self.tokens(timeout):
            pass
        return self.transcript.text

    @property
    def restarts(self) -> int:
        return self.transcript.restarts

    async def status(self) -> JobState:
        return await self.client.status(self.id)

    async def cancel(self) -> JobState:
        return await self.client.cancel(self.id)

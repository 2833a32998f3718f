"""One read of a job's events for all its SSE readers in this gateway.

Every ``GET /v1/jobs/{id}/events`` reader of a job shares one ``JobFeed``: one ``AsyncJob``
(one subscription, one log read, one sequencer) turns the job's events into SSE frames once,
and each reader only keeps its position in the feed's list of frames. Without it each reader
ran the reader library's whole per-event path of its own (its buffer, its sequencer, its
transcript, its frame) for every event: about 40% of the gateway's CPU per frame with 50 readers
per job.

A frame's position in the feed is its event's ``seq`` (the protocol's seqs rise by one from 0),
so a reader resuming after ``Last-Event-ID: N`` starts at ``N + 1``. The feed reads the job from
its start but holds only the frames some reader has still to send: once it holds ``TRIM_FRAMES``
it drops those every reader is past (when that is at least half of them), so a long job costs
the gateway the distance between its slowest and fastest reader, not its length. That distance
is capped too: a reader that stops reading (a stalled client, whose connection may take minutes
to time out) would otherwise hold every frame after it, so once the feed holds ``LAG_FRAMES`` it
keeps only the newest ``TRIM_FRAMES``, whoever is behind them. A reader whose position is before
the oldest frame held (it fell that far behind, started late, or resumed from an old
``Last-Event-ID``) reads those events from the job's log, and then goes on in the feed. The
feed stops, unsubscribes and is forgotten when its last reader leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Final

from producer.aio import AsyncClient, AsyncJob
from producer.gateway.sse import KEEPALIVE_FRAME, frame
from producer.protocol import encode, log_entry_id
from producer.reading import Published, published_from_log

#: Frames sent in one chunk at most: a reader that joins a long job late gets its backlog in
#: pieces of about 100 KB, not in one write of the whole job.
CHUNK_FRAMES: Final = 1000
#: A feed holding this many frames drops those every reader has sent.
TRIM_FRAMES: Final = 512
#: A feed holding this many frames keeps only the newest ``TRIM_FRAMES``: the readers behind
#: them read from the log. About 250 KB of frames per job at most, however its readers read.
LAG_FRAMES: Final = 4 * TRIM_FRAMES


class LogGone(Exception):
    """Events a reader needs are neither held by the feed nor in the job's log any more."""


def event_frame(item: Published) -> bytes:
    """A protocol event as SSE: ``id:`` its seq, ``data:`` the bytes it was published as (what
    ``encode`` makes of it: the worker publishes with ``encode``)."""
    data = item.data
    if b"\n" in data or b"\r" in data:
        data = encode(item.event)  # not compact JSON; its compact form keeps the frame one event
    return frame(data, item.event.seq)


class _Cursor:
    """One reader's position in a feed: the seq of the next frame it sends."""

    __slots__ = ("position",)

    def __init__(self, position: int) -> None:
        self.position = position


class JobFeed:
    """A job's SSE frames from seq ``base`` on, and a wake-up for the readers waiting on more."""

    def __init__(
        self,
        client: AsyncClient,
        job_id: str,
        keepalive: float,
        trim: int = TRIM_FRAMES,
        lag: int = LAG_FRAMES,
    ) -> None:
        self.job_id = job_id
        self.frames: list[bytes] = []
        self.base = 0  # the seq of ``frames[0]``: the frames before it were dropped
        self.done = False
        self.failure: BaseException | None = None
        #: Bumped when ``keepalive`` seconds passed without a frame: readers send a comment.
        self.keepalives = 0
        self.cursors: set[_Cursor] = set()
        self._client = client
        self._job = AsyncJob(client, job_id, keep_text=False)  # frames only: no transcript
        self._keepalive = keepalive
        self._trim = trim
        self._lag = max(lag, trim)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def wait(self) -> None:
        """Until the feed has changed: new frames, a keepalive, its end."""
        await self._changed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._job.close()

    async def from_log(self, position: int) -> tuple[bytes, int]:
        """Frames from seq ``position`` up to the oldest held, read from the job's log: at most
        ``CHUNK_FRAMES`` of them, and the position after them. ``LogGone`` if the log no longer
        has them all (it expired): a reader never skips an event."""
        end = min(self.base, position + CHUNK_FRAMES)
        entries = await self._client.redis.xrange(
            self._client.keys.log(self.job_id),
            min=log_entry_id(position),
            max=log_entry_id(end - 1),
        )
        items = published_from_log(entries or [])
        if [item.event.seq for item in items] != list(range(position, end)):
            raise LogGone(f"job {self.job_id}: events {position} to {end - 1} are gone")
        return b"".join([event_frame(item) for item in items]), end

    def _notify(self) -> None:
        self._changed.set()  # wakes every reader waiting now
        self._changed.clear()

    def _drop(self) -> None:
        """Drop the frames every reader has sent, if that is at least half of those held; past
        ``lag`` frames held, all but the newest ``trim`` (the readers behind go to the log)."""
        held = len(self.frames)
        if held < self._trim:
            return
        slowest = min((cursor.position for cursor in self.cursors), default=self.base + held)
        drop = min(slowest - self.base, held)
        if drop * 2 < held:
            if held < self._lag:
                return
            drop = held - self._trim
        del self.frames[:drop]
        self.base += drop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        quiet_until = loop.time() + self._keepalive
        try:
            while not self._job.done:
                batch = await self._job.next_events(quiet_until - loop.time())
                if batch:
                    self._drop()
                    self.frames += [event_frame(item) for item in batch]
                elif loop.time() >= quiet_until:
                    self.keepalives += 1
                else:
                    continue
                quiet_until = loop.time() + self._keepalive
                self._notify()
        except Exception as exc:  # the readers end their responses with it
            self.failure = exc
        finally:
            self.done = True
            self._notify()


class Feeds:
    """The gateway's feeds by job id, created by a job's first reader, dropped after its last."""

    def __init__(
        self,
        client: AsyncClient,
        keepalive: float,
        trim: int = TRIM_FRAMES,
        lag: int = LAG_FRAMES,
    ) -> None:
        self._client = client
        self._keepalive = keepalive
        self._trim = trim
        self._lag = lag
        self._feeds: dict[str, JobFeed] = {}

    def __len__(self) -> int:
        return len(self._feeds)

    @property
    def held(self) -> int:
        """Frames held by all feeds."""
        return sum(len(feed.frames) for feed in self._feeds.values())

    def frames(self, job_id: str, after: int) -> AsyncIterator[bytes]:
        """The job's frames from seq ``after + 1``: those ready together in one chunk, and a
        comment whenever the job is quiet for the keepalive interval. The reader joins the
        job's feed when it is first iterated, so a response that never starts (its client left
        first) holds no feed open."""
        return self._read(job_id, after + 1)

    def _join(self, job_id: str, cursor: _Cursor) -> JobFeed:
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = JobFeed(self._client, job_id, self._keepalive, self._trim, self._lag)
            self._feeds[job_id] = feed
            feed.start()
        feed.cursors.add(cursor)
        return feed

    async def _leave(self, feed: JobFeed, cursor: _Cursor) -> None:
        feed.cursors.discard(cursor)
        if not feed.cursors and self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
            await feed.stop()

    async def _read(self, job_id: str, position: int) -> AsyncIterator[bytes]:
        cursor = _Cursor(position)  # moved on before each chunk is sent: the feed may drop it
        feed = self._join(job_id, cursor)
        keepalives = feed.keepalives
        try:
            while True:
                if cursor.position < feed.base:
                    chunk, cursor.position = await feed.from_log(cursor.position)
                    yield chunk
                    continue
                frames, index = feed.frames, cursor.position - feed.base
                if index < len(frames):
                    end = min(len(frames), index + CHUNK_FRAMES)
                    chunk = b"".join(frames[index:end])
                    cursor.position = feed.base + end
                    yield chunk
                elif feed.done:
                    if feed.failure is not None:
                        raise feed.failure
                    return
                elif feed.keepalives != keepalives:
                    keepalives = feed.keepalives
                    yield KEEPALIVE_FRAME
                else:
                    await feed.wait()
        finally:
            await self._leave(feed, cursor)

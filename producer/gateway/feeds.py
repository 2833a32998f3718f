"""One read of a job's events for all its SSE readers in this gateway.

Every ``GET /v1/jobs/{id}/events`` reader of a job shares one ``JobFeed``: one ``AsyncJob``
(one subscription, one log read, one sequencer) turns the job's events into SSE frames once,
and each reader only keeps its position in the feed's list of frames. Without it each reader
ran the reader library's whole per-event path of its own (its buffer, its sequencer, its
transcript, its frame) for every event: about 40% of the gateway's CPU per frame with 50 readers
per job.

A frame's index in the feed is its event's ``seq`` (the protocol's seqs rise by one from 0), so
a reader resuming after ``Last-Event-ID: N`` starts at index ``N + 1``. The feed reads the job
from its start and keeps its frames while it has readers; it stops, unsubscribes and is
forgotten when its last reader leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Final

from producer.aio import AsyncClient, AsyncJob
from producer.gateway.sse import KEEPALIVE_FRAME, frame
from producer.protocol import encode
from producer.reading import Published

#: Frames sent in one chunk at most: a reader that joins a long job late gets its backlog in
#: pieces of about 100 KB, not in one write of the whole job.
CHUNK_FRAMES: Final = 1000


def event_frame(item: Published) -> bytes:
    """A protocol event as SSE: ``id:`` its seq, ``data:`` the bytes it was published as (what
    ``encode`` makes of it: the worker publishes with ``encode``)."""
    data = item.data
    if b"\n" in data or b"\r" in data:
        data = encode(item.event)  # not compact JSON; its compact form keeps the frame one event
    return frame(data, item.event.seq)


class JobFeed:
    """A job's SSE frames, in seq order, and a wake-up for the readers waiting on more."""

    def __init__(self, client: AsyncClient, job_id: str, keepalive: float) -> None:
        self.job_id = job_id
        self.frames: list[bytes] = []
        self.done = False
        self.failure: BaseException | None = None
        #: Bumped when ``keepalive`` seconds passed without a frame: readers send a comment.
        self.keepalives = 0
        self.readers = 0
        self._job = AsyncJob(client, job_id)
        self._keepalive = keepalive
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

    def _notify(self) -> None:
        self._changed.set()  # wakes every reader waiting now
        self._changed.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        quiet_until = loop.time() + self._keepalive
        try:
            while not self._job.done:
                batch = await self._job.next_events(quiet_until - loop.time())
                if batch:
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

    def __init__(self, client: AsyncClient, keepalive: float) -> None:
        self._client = client
        self._keepalive = keepalive
        self._feeds: dict[str, JobFeed] = {}

    def __len__(self) -> int:
        return len(self._feeds)

    def frames(self, job_id: str, after: int) -> AsyncIterator[bytes]:
        """The job's frames from seq ``after + 1``: those ready together in one chunk, and a
        comment whenever the job is quiet for the keepalive interval. The reader joins the
        job's feed when it is first iterated, so a response that never starts (its client left
        first) holds no feed open."""
        return self._read(job_id, after + 1)

    def _join(self, job_id: str) -> JobFeed:
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = JobFeed(self._client, job_id, self._keepalive)
            feed.start()
        feed.readers += 1
        return feed

    async def _leave(self, feed: JobFeed) -> None:
        feed.readers -= 1
        if feed.readers == 0 and self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
            await feed.stop()

    async def _read(self, job_id: str, position: int) -> AsyncIterator[bytes]:
        feed = self._join(job_id)
        keepalives = feed.keepalives
        try:
            while True:
                frames = feed.frames
                if position < len(frames):
                    end = min(len(frames), position + CHUNK_FRAMES)
                    chunk = b"".join(frames[position:end])
                    position = end
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
            await self._leave(feed)

"""Server-Sent Events out of the gateway: frame encoding and an ASGI response that notices a
client leaving even while the stream is idle.

Frames are sent the moment they are ready, as HTTP chunks of whole frames (chunked transfer
encoding, never gzip; frames ready at the same moment share a chunk), so clients built on
requests + sseclient-py see each event the moment it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from producer.gateway.metrics import STREAMS

log = logging.getLogger("tokenrelay.gateway")

DONE_FRAME: Final = b"data: [DONE]\n\n"
KEEPALIVE_FRAME: Final = b": keep-alive\n\n"
SSE_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell reverse proxies not to buffer the stream
    "Connection": "keep-alive",
}


def frame(data: bytes | str, event_id: int | None = None) -> bytes:
    """One SSE event: ``id:`` (optional) and one ``data:`` line (``data`` holds no newline)."""
    payload = data.encode() if isinstance(data, str) else data
    if event_id is None:
        return b"data: %s\n\n" % payload
    return b"id: %d\ndata: %s\n\n" % (event_id, payload)


class EventStream(Response):
    """Streams ``frames`` as ``text/event-stream``; calls ``on_disconnect`` if the client leaves
    before the stream ends (whether or not a frame was being sent at that moment)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.frames = frames
        self.on_disconnect = on_disconnect
        self.status_code = status_code
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        STREAMS.inc()
        try:
            await self._stream(receive, send)
        finally:
            STREAMS.dec()

    async def _stream(self, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left = watch.done() and not pump.done()
            for task in (pump, watch):
                task.cancel()
            for task in (pump, watch):
                with contextlib.suppress(asyncio.CancelledError, OSError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await self.frames.aclose()  # type: ignore[attr-defined]
        failure = pump.exception() if pump.done() and not pump.cancelled() else None
        if failure is not None:
            if not isinstance(failure, OSError):  # not the client going away mid-write
                log.warning("an event stream ended before its job: %s", failure)
            left = True
        if left and self.on_disconnect is not None:
            await self.on_disconnect()

    async def _pump(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for chunk in self.frames:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return

"""The gateway's Prometheus metrics, served at ``GET /metrics``.

Queue depth and running jobs are read from Redis, and the frames the feeds hold counted, at scrape
time; open SSE responses and requests by route and status are counted as they happen.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

QUEUE_DEPTH: Final = Gauge("tokenrelay_queue_depth", "Jobs waiting in the broker's queue")
RUNNING: Final = Gauge("tokenrelay_running_jobs", "Jobs claimed by workers and not yet ended")
STREAMS: Final = Gauge("tokenrelay_gateway_streams", "Open Server-Sent Events responses")
FEED_FRAMES: Final = Gauge(
    "tokenrelay_gateway_feed_frames", "SSE frames the job feeds hold for their slowest readers"
)
REQUESTS: Final = Counter(
    "tokenrelay_gateway_requests_total", "HTTP requests by route and status", ["route", "status"]
)


async def render(request: Request) -> Response:
    """The metrics page, with the Redis-side gauges refreshed first."""
    gateway = request.app.state.gateway
    RUNNING.set(await gateway.client.redis.zcard(gateway.keys.running))
    FEED_FRAMES.set(gateway.feeds.held)
    depth = await gateway.queue_depth()
    if depth is not None:
        QUEUE_DEPTH.set(depth)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class CountRequests:
    """ASGI middleware: count each HTTP request by its route template and status code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            REQUESTS.labels(path, str(status[0])).inc()

"""The HTTP gateway: every request becomes a queued job; the gateway forwards its events.

Routes (see ``openapi.py`` for the jobs API):

* ``POST /inference`` - Together's legacy API; ``stream_tokens`` streams SSE ending in ``[DONE]``.
* ``POST /v1/completions``, ``POST /v1/chat/completions`` - OpenAI-compatible, streamed or not.
* ``POST /v1/jobs``, ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events``,
  ``POST /v1/jobs/{id}/cancel`` - the jobs API; events resume from ``Last-Event-ID``.
* ``GET /`` the live page, ``GET /healthz``, ``GET /openapi.json``.

The gateway never calls the LLM. One ``AsyncClient`` serves every request, so the process holds
a fixed number of Redis connections: a bounded command pool and one multiplexed pub/sub.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import redis.exceptions
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from producer.aio import AsyncClient, AsyncJob
from producer.gateway import compat, metrics
from producer.gateway.auth import Auth, Unauthorized
from producer.gateway.feeds import Feeds
from producer.gateway.openapi import OPENAPI
from producer.gateway.sse import DONE_FRAME, KEEPALIVE_FRAME, EventStream, frame
from producer.protocol import Event, EventType, Keys, ProtocolError, validate_job_id
from producer.reading import JobNotFound, JobState, Transcript
from producer.settings import Settings
from producer.spec import InvalidJob

log = logging.getLogger("tokenrelay.gateway")

STATIC = Path(__file__).resolve().parent / "static"
REDIS_CONNECTIONS = 8
T = TypeVar("T")


class HTTPError(Exception):
    """Answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        body = compat.error_body(self.message, self.kind, param=self.param)
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, self.status, headers=headers)


def invalid(exc: InvalidJob, status: int = 400) -> HTTPError:
    return HTTPError(status, str(exc), param=exc.field)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = Auth(settings.api_keys)
        self.keys = Keys(settings.prefix)
        self.client = AsyncClient(
            settings=settings, max_connections=REDIS_CONNECTIONS, client_name="tokenrelay-gateway"
        )
        self.feeds = Feeds(self.client, settings.keepalive_seconds)

    # --- plumbing ---------------------------------------------------------------------------

    async def body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, refused with 413 past the size limit, 400 if malformed."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"request body larger than the limit of {limit} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise HTTPError(413, f"request body larger than the limit of {limit} bytes")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise HTTPError(400, f"malformed JSON body: {exc}") from None
        except RecursionError:
            raise HTTPError(400, "malformed JSON body: nested too deeply") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return data

    async def owned(self, job_id: str, tenant: str | None) -> JobState:
        """The job's state if this tenant may see it; 404 otherwise (never saying whose it is)."""
        try:
            validate_job_id(job_id)
            state = await self.client.status(job_id)
        except (ProtocolError, JobNotFound):
            raise HTTPError(404, f"no job {job_id!r}", "not_found") from None
        if tenant is not None and state.tenant != tenant:
            raise HTTPError(404, f"no job {job_id!r}", "not_found")
        return state

    async def queue_depth(self) -> int | None:
        """Messages waiting in the broker's queue, when the broker is this Redis (else None)."""
        if self.settings.broker_url != self.settings.redis_url:
            return None
        return int(await self.client.redis.llen(self.keys.queue))

    async def cancel_quietly(self, job_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.client.cancel(job_id)

    # --- compatibility routes ---------------------------------------------------------------

    async def together(self, request: Request) -> Response:
        return await self.compatible(request, compat.together_request, compat.TogetherFormat)

    async def completions(self, request: Request) -> Response:
        return await self.compatible(request, compat.completions_request, compat.CompletionsFormat)

    async def chat(self, request: Request) -> Response:
        return await self.compatible(request, compat.chat_request, compat.ChatFormat)

    async def compatible(
        self,
        request: Request,
        translate: Callable[[dict[str, Any]], tuple[dict[str, Any], bool]],
        format_class: type[compat.Format],
    ) -> Response:
        tenant = self.auth.tenant(request)
        body = await self.body(request)
        try:
            job_request, stream = translate(body)
            job = await self.client.submit_request(job_request, follow=True, tenant=tenant)
        except InvalidJob as exc:
            raise invalid(exc) from None
        model = str(job_request.get("model") or self.settings.default_model)
        form = format_class(job.id, model, usage_chunk=compat.include_usage(body))
        cancel_on_leave = self.settings.cancel_on_disconnect

        async def leave() -> None:
            await job.close()
            if cancel_on_leave:
                await self.cancel_quietly(job.id)

        # Wait for the first token (or the end) before answering, so an upstream refusal is an
        # HTTP error status, as the real APIs give it, not an event in a 200 stream.
        try:
            head = await self.until_disconnect(request, _first_events(job, everything=not stream))
        except BaseException:
            await job.close()
            raise
        if head is None:
            await leave()
            return Response(status_code=499)
        refused = bool(head) and _refused(head)
        if stream and head and not refused:
            frames = _compat_frames(form, head, job, self, self.settings.keepalive_seconds)
            return EventStream(frames, on_disconnect=leave if cancel_on_leave else None)
        await job.close()
        if not head:
            return HTTPError(504, "the job ended without events", "server_error").response()
        if refused:
            failed = head[-1]
            status = compat.http_status_of(failed)
            return Response(compat.error_payload(failed), status, media_type="application/json")
        return self.answer(form, head)

    def answer(self, form: compat.Format, events: list[Event]) -> Response:
        transcript = Transcript()  # restart-aware, as every reader reassembles
        for event in events:
            transcript.add(event)
        text, tokens = transcript.text, len(transcript.parts)
        end = events[-1]
        if end.type is not EventType.DONE:
            return Response(
                compat.error_payload(end), compat.http_status_of(end), media_type="application/json"
            )
        return JSONResponse(form.answer(compat.Outcome.of(text, end, tokens)))

    async def until_disconnect(self, request: Request, work: Awaitable[T]) -> T | None:
        """``work``'s result, or ``None`` if the client left first."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            return None
        return task.result()

    # --- jobs API -----------------------------------------------------------------------------

    async def create_job(self, request: Request) -> Response:
        tenant = self.auth.tenant(request)
        body = await self.body(request)
        job_id = body.pop("job_id", None)
        try:
            job = await self.client.submit_request(body, job_id=job_id, tenant=tenant)
        except InvalidJob as exc:
            raise invalid(exc, 422) from None
        state = await self.client.status(job.id)
        if tenant is not None and state.tenant != tenant:
            raise HTTPError(409, f"job_id: {job.id!r} is taken", param="job_id")
        url = f"/v1/jobs/{job.id}"
        body = {**state.as_dict(), "id": job.id, "url": url, "events_url": url + "/events"}
        return JSONResponse(body, 202, headers={"Location": url})

    async def get_job(self, request: Request) -> Response:
        tenant = self.auth.tenant(request)
        state = await self.owned(request.path_params["job_id"], tenant)
        url = f"/v1/jobs/{state.job_id}"
        return JSONResponse({**state.as_dict(), "id": state.job_id, "events_url": url + "/events"})

    async def cancel_job(self, request: Request) -> Response:
        tenant = self.auth.tenant(request)
        state = await self.owned(request.path_params["job_id"], tenant)
        state = await self.client.cancel(state.job_id)
        return JSONResponse({**state.as_dict(), "id": state.job_id})

    async def job_events(self, request: Request) -> Response:
        tenant = self.auth.tenant(request, allow_query=True)
        state = await self.owned(request.path_params["job_id"], tenant)
        after = _last_event_id(request)
        # A reader that leaves only detaches: the job runs on for its other readers.
        return EventStream(self.feeds.frames(state.job_id, after))

    # --- the rest -----------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def healthz(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self.client.redis.ping(), 2)
            workers = 0
            async for _ in self.client.redis.scan_iter(match=self.keys.worker_pattern, count=100):
                workers += 1
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            return JSONResponse({"ok": False, "redis": f"unreachable: {exc}"}, 503)
        return JSONResponse({"ok": True, "redis": "ok", "workers": workers})

    def routes(self) -> list[Route]:
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/metrics", metrics.render, methods=["GET"]),
            Route("/inference", self.together, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/jobs", self.create_job, methods=["POST"]),
            Route("/v1/jobs/{job_id}", self.get_job, methods=["GET"]),
            Route("/v1/jobs/{job_id}/events", self.job_events, methods=["GET"]),
            Route("/v1/jobs/{job_id}/cancel", self.cancel_job, methods=["POST"]),
        ]


def create_app(settings: Settings | None = None) -> Starlette:
    """The gateway's ASGI app, configured from ``TOKENRELAY_*`` unless ``settings`` is given."""
    gateway = Gateway(settings or Settings.from_env())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if gateway.auth.open:
            log.warning("no TOKENRELAY_API_KEYS set: the gateway is open to anyone who reaches it")
        yield
        await gateway.client.close()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        return exc.response()

    async def unauthorized(request: Request, exc: Exception) -> Response:
        return HTTPError(401, str(exc), "authentication_error").response()

    app = Starlette(
        routes=gateway.routes(),
        lifespan=lifespan,
        exception_handlers={HTTPError: http_error, Unauthorized: unauthorized},
        middleware=[Middleware(metrics.CountRequests)],
    )
    app.state.gateway = gateway
    return app


# --- helpers ------------------------------------------------------------------------------------


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _first_events(job: AsyncJob, *, everything: bool) -> list[Event]:
    """Events up to the first token's (or all of them with ``everything``), or to the end."""
    head: list[Event] = []
    while not job.done:
        batch = [item.event for item in await job.next_events()]
        head += batch
        if not everything and _has_token(batch):
            break
    return head


def _has_token(events: list[Event]) -> bool:
    return any(event.type is EventType.TOKEN for event in events)


def _refused(head: list[Event]) -> bool:
    """Whether the job failed before its first token."""
    return head[-1].terminal and not _has_token(head) and head[-1].type is not EventType.DONE


async def _compat_frames(
    form: compat.Format,
    head: list[Event],
    job: AsyncJob,
    gateway: Gateway,
    keepalive: float,
) -> AsyncIterator[bytes]:
    """A job's events as one compatibility API's SSE frames, ending with ``[DONE]``; frames
    ready together go in one chunk, and a comment whenever ``keepalive`` seconds pass without
    one."""
    sent = ""  # the text this client has
    count = 0  # token events of the current attempt
    # After a restart: the new attempt's text so far, while it repeats what the client has.
    again: str | None = None
    out = [frame(payload) for payload in form.first()]

    async def render(events: list[Event]) -> bool:
        """Add the events' frames to ``out``; whether the stream ends with them."""
        nonlocal sent, count, again
        for event in events:
            if event.type is EventType.TOKEN:
                count += 1
                text = event.text
                if again is not None:
                    # Tokens already sent cannot be taken back from this client: the new
                    # attempt goes on here only while it says the same (a deterministic
                    # upstream does); from the first difference the request ends.
                    again += text
                    if sent.startswith(again):
                        continue
                    if not again.startswith(sent):
                        return await restarted(event)
                    text, again = again[len(sent) :], None
                sent += text
                out.append(frame(form.token(text)))
            elif event.type is EventType.RESTART:
                count = 0  # the new attempt's tokens are counted from its start
                if sent:
                    again = ""
            elif event.type is EventType.DONE:
                if again is not None and again != sent:
                    return await restarted(event)  # the new attempt ended before the old
                outcome = compat.Outcome.of(sent, event, count)
                out.extend(frame(payload) for payload in form.finish(outcome))
                return True
            elif event.terminal:
                out.append(frame(compat.error_payload(event)))
                return True
        return False

    async def restarted(event: Event) -> bool:
        await gateway.cancel_quietly(job.id)
        out.append(frame(compat.error_payload(_restarted(job.id, event.seq))))
        return True

    loop = asyncio.get_running_loop()
    quiet_until = loop.time() + keepalive
    try:
        ended = await render(head)
        while not ended:
            if out:
                yield b"".join(out)
                out.clear()
                quiet_until = loop.time() + keepalive
            batch = await job.next_events(quiet_until - loop.time())
            if batch:
                ended = await render([item.event for item in batch])
            elif job.done:
                ended = True
            elif loop.time() >= quiet_until:
                out.append(KEEPALIVE_FRAME)
        out.append(DONE_FRAME)
        yield b"".join(out)
    finally:
        await job.close()


def _restarted(job_id: str, seq: int) -> Event:
    return Event(
        job_id,
        seq,
        EventType.ERROR,
        {
            "code": "restarted",
            "message": "the job's worker was lost mid-stream and its new attempt did not repeat "
            "the text already sent; retry the request",
        },
    )


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None or raw == "":
        return -1
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(400, "Last-Event-ID: must be an event's seq (an integer)") from None
    if value < -1:
        raise HTTPError(400, "Last-Event-ID: must be -1 or more")
    return value

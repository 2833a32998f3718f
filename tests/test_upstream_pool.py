"""The worker's upstream HTTP client: connections are pooled (a stream that ended well leaves its
connection for the next job, one TLS handshake saved per job on a real API; a broken one is not
reused), a chunked body is decoded whatever pieces the network cuts it into and fails cleanly
when its framing breaks, and an event stream compressed on the way is decoded as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from producer.devservers import asgi_in_thread
from producer.spec import JobSpec
from tests.conftest import Mock
from worker import dialects
from worker.dialects import Continuation
from worker.errors import UpstreamDisconnected, UpstreamError
from worker.upstream import ChunkedBody, UpstreamClient, UpstreamStream


def _stream(client: UpstreamClient, dialect: str, model: str) -> tuple[str, str]:
    """Run one stream to its end; return its text and its prompt marker."""
    marker = f"pool-{secrets.token_hex(4)}"
    spec = JobSpec.from_dict(
        {"prompt": marker, "dialect": dialect, "model": model, "max_tokens": 5},
        default_model="mock",
        default_dialect=dialect,
        max_prompt_bytes=1000,
    )
    stream = client.open(dialects.get(dialect), spec, Continuation(), before_read=lambda: None)
    try:
        text = "".join(delta.text for delta in stream.deltas())
    finally:
        stream.close()
    return text, marker


@pytest.mark.parametrize("dialect", ["together", "openai-chat", "tgi", "ollama"])
def test_a_finished_stream_leaves_its_connection_to_the_next(
    mock: Mock, api_key: str, dialect: str
) -> None:
    client = UpstreamClient(mock.url, api_key, connect_timeout=2, read_timeout=5)
    try:
        runs = [_stream(client, dialect, "mock") for _ in range(3)]
    finally:
        client.close()
    assert all(text for text, _ in runs)
    peers = {mock.record(marker)["client"] for _, marker in runs}
    assert len(peers) == 1, peers


def _wave(client: UpstreamClient, mock: Mock, streams: int) -> set[str]:
    """Open ``streams`` streams at once (each holds its connection until closed), read them
    all, close them all; return the mock's client addresses, one per connection used."""
    markers, opened = [], []
    for _ in range(streams):
        marker = f"wave-{secrets.token_hex(4)}"
        spec = JobSpec.from_dict(
            {"prompt": marker, "dialect": "together", "model": "mock", "max_tokens": 3},
            default_model="mock",
            default_dialect="together",
            max_prompt_bytes=1000,
        )
        opened.append(
            client.open(dialects.get("together"), spec, Continuation(), before_read=lambda: None)
        )
        markers.append(marker)
    for stream in opened:
        assert "".join(delta.text for delta in stream.deltas())
        stream.close()
    return {str(mock.record(marker)["client"]) for marker in markers}


def test_a_pool_sized_to_the_streams_keeps_every_connection_between_waves(
    mock: Mock, api_key: str
) -> None:
    """12 streams at once, twice: a pool of 4 keeps 4 connections for the second wave and
    opens 8 new ones; sized to 12 (as a worker sizes it to its concurrency), it keeps all."""
    small = UpstreamClient(mock.url, api_key, connect_timeout=2, read_timeout=5, pool_size=4)
    sized = UpstreamClient(mock.url, api_key, connect_timeout=2, read_timeout=5, pool_size=4)
    sized.size_pool(12)
    try:
        first, second = _wave(small, mock, 12), _wave(small, mock, 12)
        assert len(first) == len(second) == 12
        assert len(first & second) == 4
        first, second = _wave(sized, mock, 12), _wave(sized, mock, 12)
        assert len(first) == 12
        assert second == first
    finally:
        small.close()
        sized.close()


def test_a_broken_stream_is_not_reused(mock: Mock, api_key: str) -> None:
    client = UpstreamClient(mock.url, api_key, connect_timeout=2, read_timeout=5)
    try:
        with pytest.raises(UpstreamError):
            _stream(client, "together", "mock?drop_after=2")
        broken = [r for r in mock.stats() if "drop_after" in str(r["model"])][-1]
        text, marker = _stream(client, "together", "mock")
    finally:
        client.close()
    assert text
    assert mock.record(marker)["client"] != broken["client"]


@pytest.fixture(scope="module")
def gzip_upstream() -> Iterator[str]:
    """An upstream (or a proxy in front of it) that compresses its event stream whatever the
    client asked for, flushing the compressor after every event."""

    async def inference(request: Request) -> Response:
        seen.append(request.headers.get("accept-encoding", ""))

        async def body() -> AsyncIterator[bytes]:
            gzip = zlib.compressobj(wbits=31)
            for text in ["Al", "an", " Tu", "ring"]:
                event = f'data: {{"choices":[{{"text":"{text}"}}]}}\n\n'.encode()
                yield gzip.compress(event) + gzip.flush(zlib.Z_SYNC_FLUSH)
                await asyncio.sleep(0.01)
            yield gzip.compress(b"data: [DONE]\n\n") + gzip.flush()

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Content-Encoding": "gzip"}
        )

    seen: list[str] = []
    app = Starlette(routes=[Route("/inference", inference, methods=["POST"])])
    with asgi_in_thread(app) as url:
        yield url
    assert seen and all(value == "identity" for value in seen), seen


def test_a_compressed_event_stream_is_decoded_as_it_arrives(gzip_upstream: str) -> None:
    client = UpstreamClient(gzip_upstream, None, connect_timeout=2, read_timeout=5)
    try:
        text, _ = _stream(client, "together", "mock")
    finally:
        client.close()
    assert text == "Alan Turing"


@contextlib.contextmanager
def _canned_upstream(pieces: list[bytes]) -> Iterator[str]:
    """An upstream that answers one request with ``pieces`` (a raw response, framing errors
    and all: no HTTP framework writes those), a short pause between pieces, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
            while len(body) < length:
                body += conn.recv(65536)
            for piece in pieces:
                conn.sendall(piece)
                time.sleep(0.01)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(10)
        listener.close()


_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(text: str) -> bytes:
    return f'data: {{"choices":[{{"text":"{text}"}}]}}\n\n'.encode()


def _read_all(url: str) -> tuple[str, UpstreamStream]:
    client = UpstreamClient(url, None, connect_timeout=2, read_timeout=5)
    try:
        spec = JobSpec.from_dict(
            {"prompt": "p", "dialect": "together", "model": "m", "max_tokens": 5},
            default_model="m",
            default_dialect="together",
            max_prompt_bytes=1000,
        )
        stream = client.open(
            dialects.get("together"), spec, Continuation(), before_read=lambda: None
        )
        try:
            return "".join(delta.text for delta in stream.deltas()), stream
        finally:
            stream.close()
    finally:
        client.close()


def test_a_chunked_body_split_anywhere_by_the_network_reads_whole() -> None:
    body = _chunk(_event("Al") + _event("an")) + _chunk(_event(" Tu")) + _chunk(_event("ring"))
    body += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    # Cut inside a chunk's size line, inside its CRLF, inside an event and between them.
    cuts = [3, 5, 40, 41, 42, 97, len(body) - 2]
    pieces = [_HEAD + body[: cuts[0]]]
    pieces += [body[a:b] for a, b in itertools.pairwise([*cuts, len(body)])]
    with _canned_upstream(pieces) as url:
        text, stream = _read_all(url)
    assert text == "Alan Turing"
    # httptools took the chunk framing off (not urllib3), and the body's end was read.
    assert isinstance(stream._body, ChunkedBody) and stream._body.complete


@pytest.mark.parametrize(
    ("after", "message"),
    [
        (b"zz\r\nhello\r\n", "bad chunked encoding"),
        (b"", "the body ended before its last chunk"),
    ],
)
def test_a_chunked_body_that_breaks_ends_the_stream_as_disconnected(
    after: bytes, message: str
) -> None:
    pieces = [_HEAD + _chunk(_event("Al")), after]
    with _canned_upstream(pieces) as url, pytest.raises(UpstreamDisconnected) as failed:
        _read_all(url)
    assert failed.value.code == "upstream_disconnected"
    assert message in failed.value.message

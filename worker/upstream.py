"""The HTTP side of an upstream stream: requests for the call, sseclient-py for the events.

One pooled ``requests.Session`` per worker process; a stream that ended well leaves its
connection in the pool for the next job. The response is read in the chunks the network
delivers (``read1``), never byte by byte, and a hook runs before each blocking read so the caller
can publish everything that arrived in the last one. ``UpstreamStream.abort`` may be called from
another thread or greenlet: it shuts the socket down, which wakes a blocked read at once.

A streamed body comes chunked. requests hands it over through urllib3 and ``http.client``, whose
chunked decoding is several layers of Python per network read: with one token per read (a paced
stream) that was a third of a worker's CPU per token. So once requests has the response's
headers, ``ChunkedBody`` reads the rest from the connection's buffered reader and lets httptools
(the C parser uvicorn uses) take the chunk framing off. Other bodies (compressed, with a length,
or without httptools) keep urllib3's path.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import http.cookiejar
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import requests
import sseclient
import urllib3.exceptions
from requests.adapters import HTTPAdapter

try:
    import httptools
except ImportError:  # not on every Python implementation: urllib3 decodes the body then
    httptools = None  # type: ignore[assignment]

from producer.spec import JobSpec
from worker.dialects import DONE, Continuation, Delta, Dialect
from worker.errors import (
    UpstreamDisconnected,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

READ_SIZE: Final = 64 * 1024
# After the end marker, what is left of a body is read so the connection can serve the next job
# (a TLS handshake saved per job): at most this long and this much, else the connection is shut.
DRAIN_TIMEOUT: Final = 1.0
DRAIN_LIMIT: Final = 64 * 1024
_ERROR_BODY_LIMIT: Final = 64 * 1024
_USER_AGENT: Final = "tokenrelay"


class UpstreamClient:
    """A pooled HTTP client for one upstream, shared by every stream of a worker process."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int = 256,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.session = requests.Session()
        # requests reads the environment on every request when trust_env is on (proxies by
        # walking all of os.environ: a millisecond per job in a worker's profile) and lets a
        # ~/.netrc entry replace the Authorization header. Read the proxies and the CA bundle
        # once instead; no netrc.
        self.session.trust_env = False
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self._requests: dict[str, requests.PreparedRequest] = {}
        self.session.proxies.update(requests.utils.get_environ_proxies(self.base_url))
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle:
            self.session.verify = bundle
        self.pool_size = 0
        self.size_pool(pool_size)

    def size_pool(self, connections: int) -> None:
        """Keep up to ``connections`` idle connections. A worker sizes it to the streams it runs
        at once: a smaller pool closes the connections past its size whenever a wave of jobs
        ends and opens them again for the next (a TLS handshake each on a real API). Grows
        only; call it before the first stream."""
        if connections <= self.pool_size:
            return
        self.pool_size = connections
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=connections, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def __repr__(self) -> str:  # never show the key
        return f"UpstreamClient({self.base_url!r})"

    def _prepared(self, path: str) -> requests.PreparedRequest:
        """The request to ``path`` without its body, prepared once: every job's request is a
        copy with the job's JSON body. ``Session.post`` would merge the session's settings into
        a new request each time (about 0.2 ms of CPU per job). No cookies are kept or sent: one
        job's response does not shape another job's request."""
        prepared = self._requests.get(path)
        if prepared is None:
            headers = {
                "Accept": "text/event-stream",
                # The body is read raw, in the chunks the network gives: never compressed.
                "Accept-Encoding": "identity",
                "User-Agent": _USER_AGENT,
            }
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            request = requests.Request("POST", self.base_url + path, headers=headers)
            prepared = self._requests[path] = self.session.prepare_request(request)
        return prepared

    def open(
        self,
        dialect: Dialect,
        spec: JobSpec,
        done: Continuation,
        *,
        before_read: Callable[[], None],
        read_timeout: float | None = None,
    ) -> UpstreamStream:
        """Send the job's request; raise an ``UpstreamError`` unless the stream began."""
        request = self._prepared(dialect.path).copy()
        request.prepare_body(data=None, files=None, json=dialect.build(spec, done))
        timeout = (self.connect_timeout, read_timeout or self.read_timeout)
        try:
            response = self.session.send(request, stream=True, timeout=timeout)
        except requests.exceptions.ConnectTimeout:
            raise UpstreamUnavailable("could not connect to the upstream: timed out") from None
        except requests.exceptions.Timeout:
            raise UpstreamTimeout(
                f"the upstream sent no response headers for {timeout[1]:g} s"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise UpstreamUnavailable(
                f"could not connect to the upstream at {self.base_url}: {_reason(exc)}"
            ) from None
        if response.status_code >= 400:
            raise _http_error(response, self._api_key)
        return UpstreamStream(response, dialect, before_read, timeout[1], self._api_key)

    def close(self) -> None:
        self.session.close()


class UpstreamStream:
    """One open streaming response, iterated as ``Delta``s."""

    def __init__(
        self,
        response: requests.Response,
        dialect: Dialect,
        before_read: Callable[[], None],
        read_timeout: float,
        api_key: str | None = None,
    ) -> None:
        self._api_key = api_key
        self.response = response
        self.dialect = dialect
        self._before_read = before_read
        self._read_timeout = read_timeout
        self._sock = _socket_of(response)
        self._ended = False
        # Asked for an uncompressed body; one compressed anyway is decoded as it arrives.
        response.raw.decode_content = True
        self._body = ChunkedBody.of(response)
        self._read1 = self._body.read1 if self._body is not None else response.raw.read1

    def deltas(self) -> Iterator[Delta]:
        """Every delta until the stream's end marker; raise an ``UpstreamError`` on failure."""
        try:
            yield from parse_stream(self._chunks(), self.dialect)
        except UpstreamError as exc:
            # An upstream that echoes the request (headers included) must not leak the key.
            if self._api_key and self._api_key in exc.message:
                exc.message = exc.message.replace(self._api_key, "[redacted]")
                exc.args = (exc.message,)
            raise
        self._ended = True

    def _chunks(self) -> Iterator[bytes]:
        read1 = self._read1
        while True:
            self._before_read()
            try:
                data = read1(READ_SIZE)
            except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
                raise UpstreamTimeout(
                    f"the upstream sent nothing for {self._read_timeout:g} s"
                ) from None
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                raise _broke(_reason(exc)) from None
            if not data:
                return
            yield data

    def abort(self) -> None:
        """Wake and end a read blocked in another thread or greenlet; safe to call twice."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Give the connection back to the pool if the stream ended well, else shut it."""
        if self._ended and self._read_to_end():
            self.response.raw.release_conn()
            return
        self.abort()
        self.response.close()

    def _read_to_end(self) -> bool:
        """Read what follows the end marker (the end of the chunked body, normally already on
        its way), waiting at most ``DRAIN_TIMEOUT``; True if the body ended cleanly."""
        try:
            if self._sock is not None:
                self._sock.settimeout(min(DRAIN_TIMEOUT, self._read_timeout))
            left = DRAIN_LIMIT
            while left > 0:
                data = self._read1(READ_SIZE)
                if not data:
                    return True
                left -= len(data)
        except (urllib3.exceptions.HTTPError, OSError, ValueError, UpstreamDisconnected):
            pass
        return False


# What http.client already read of the response, as httptools must see it before the body.
_CHUNKED_HEAD: Final = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


class ChunkedBody:
    """The rest of a chunked response body, read from its connection's buffered reader and
    decoded by httptools: ``read1`` gives the body bytes of one network read."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        assert httptools is not None and response.fp is not None
        self._response = response
        self._peek, self._take = response.fp.peek, response.fp.read1
        self._parts: list[bytes] = []
        self.complete = False
        self._parser = httptools.HttpResponseParser(self)
        self._parser.feed_data(_CHUNKED_HEAD)

    @classmethod
    def of(cls, response: requests.Response) -> ChunkedBody | None:
        """The body of ``response`` if this reader can take it: chunked, not compressed, not
        started; else ``None``."""
        inner = getattr(response.raw, "_fp", None)
        if (
            httptools is None
            or not isinstance(inner, http.client.HTTPResponse)
            or not inner.chunked
            or inner.chunk_left is not None
            or inner.fp is None
            or response.headers.get("content-encoding", "identity").lower() != "identity"
        ):
            return None
        return cls(inner)

    # httptools calls these from ``feed_data``.
    def on_body(self, body: bytes) -> None:
        self._parts.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    def read1(self, size: int) -> bytes:
        """Body bytes from the next read that has some (at most what the connection's reader
        buffers, ignoring ``size``); ``b""`` once the body ended. Raises
        ``UpstreamDisconnected`` if the connection closes first or the framing is not chunked
        encoding, and the socket's errors (``TimeoutError`` after the read timeout)."""
        parts = self._parts
        while not parts:
            if self.complete:
                # As http.client does at the end of a body: the connection can serve again.
                self._response.close()
                return b""
            # What the reader's own buffer holds (one socket read into it if it holds nothing),
            # then taken out of it: a read1(size) of an empty reader would allocate ``size``
            # bytes before it blocks, and a worker has hundreds of streams blocked there.
            data = self._take(len(self._peek()))
            if not data:
                raise _broke("the body ended before its last chunk")
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise _broke(f"bad chunked encoding ({exc})") from None
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        return body


def parse_stream(chunks: Iterable[bytes], dialect: Dialect) -> Iterator[Delta]:
    """Turn a response body, in whatever chunks it arrives, into deltas. Pure apart from the
    chunks' own I/O: SSE framing by sseclient-py, NDJSON by lines."""
    if dialect.framing == "ndjson":
        payloads = _lines(chunks)
    else:
        payloads = (event.data for event in sseclient.SSEClient(iter(chunks)).events())
    try:
        for data in payloads:
            delta = dialect.parse(data)
            if delta is DONE:
                return
            yield delta
    except UnicodeDecodeError:
        # sseclient-py decodes each event as strict UTF-8.
        raise UpstreamProtocolError("the upstream sent an event that is not valid UTF-8") from None
    if dialect.needs_done:
        raise UpstreamDisconnected("the upstream closed the stream before it finished")


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Newline-delimited JSON framing (Ollama): complete lines only, decoded as UTF-8."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield _decode(line)
    if buffer.strip():
        yield _decode(buffer)


def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise UpstreamProtocolError("the upstream sent a line that is not UTF-8") from None


def _socket_of(response: requests.Response) -> socket.socket | None:
    """The response's socket, to shut it down from another greenlet (urllib3 2.x)."""
    connection = getattr(response.raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is None:
        fp = getattr(getattr(response.raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _broke(reason: str) -> UpstreamDisconnected:
    return UpstreamDisconnected(f"the upstream connection broke mid-stream: {reason}")


def _reason(exc: BaseException) -> str:
    # The innermost cause names the real problem (refused, reset, name lookup) without the
    # request's headers, which could hold the key.
    while exc.__context__ is not None and not isinstance(exc, OSError):
        exc = exc.__context__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _http_error(response: requests.Response, api_key: str | None) -> UpstreamHTTPError:
    status = response.status_code
    try:
        body = response.raw.read(_ERROR_BODY_LIMIT, decode_content=True)
    except (urllib3.exceptions.HTTPError, OSError):
        body = b""
    finally:
        response.close()
    message = _error_message(body) or response.reason or "no message"
    if api_key:
        message = message.replace(api_key, "[redacted]")
    return UpstreamHTTPError(
        f"upstream answered HTTP {status}: {message[:500]}",
        status=status,
        retry_after=retry_after(response.headers),
    )


def _error_message(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        obj: Any = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(obj, dict):
        error = obj.get("error", obj)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("type") or text)[:500]
        return str(error)[:500]
    return text[:500]


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None

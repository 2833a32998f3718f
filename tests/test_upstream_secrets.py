"""An upstream that echoes the request back (headers and all) must not leak the API key into
error messages, and neither must ``repr`` of the settings or the client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from producer.devservers import asgi_in_thread
from producer.settings import Settings
from producer.spec import JobSpec
from worker import dialects
from worker.dialects import Continuation
from worker.errors import UpstreamError
from worker.upstream import UpstreamClient

KEY = "sk-echo-secret-0123456789abcdef"


async def refuse(request: Request) -> Response:
    # Like some proxies: the error names the header it did not like, value included.
    header = request.headers.get("authorization", "")
    return JSONResponse({"error": {"message": f"bad credentials: {header}"}}, 401)


async def error_mid_stream(request: Request) -> Response:
    header = request.headers.get("authorization", "")

    async def body() -> Iterator[bytes]:  # type: ignore[misc]
        yield b'data: {"choices":[{"text":"Hi"}]}\n\n'
        yield ('data: {"error":{"message":"rejected ' + header + '"}}\n\n').encode()

    return StreamingResponse(body(), media_type="text/event-stream")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/inference", refuse, methods=["POST"]),
            Route("/v1/completions", error_mid_stream, methods=["POST"]),
        ]
    )
    with asgi_in_thread(app) as url:
        yield url


def spec(dialect: str) -> JobSpec:
    return JobSpec.from_dict(
        {"prompt": "hi", "dialect": dialect},
        default_model="m",
        default_dialect=dialect,
        max_prompt_bytes=1000,
    )


def test_an_echoed_key_is_redacted_from_http_errors(echo_upstream: str) -> None:
    client = UpstreamClient(echo_upstream, KEY, connect_timeout=2, read_timeout=2)
    with pytest.raises(UpstreamError) as caught:
        client.open(
            dialects.get("together"), spec("together"), Continuation(), before_read=lambda: None
        )
    client.close()
    assert caught.value.status == 401
    assert "bad credentials: Bearer [redacted]" in caught.value.message
    assert KEY not in str(caught.value) and KEY not in repr(client)


def test_an_echoed_key_is_redacted_from_mid_stream_errors(echo_upstream: str) -> None:
    client = UpstreamClient(echo_upstream, KEY, connect_timeout=2, read_timeout=2)
    dialect = dialects.get("openai-completions")
    stream = client.open(
        dialect, spec("openai-completions"), Continuation(), before_read=lambda: None
    )
    texts = []
    with pytest.raises(UpstreamError) as caught:
        for delta in stream.deltas():
            texts.append(delta.text)
    stream.close()
    client.close()
    assert texts == ["Hi"]
    assert "[redacted]" in caught.value.message and KEY not in str(caught.value)


def test_settings_never_show_keys() -> None:
    settings = Settings.from_env(
        {"TOKENRELAY_UPSTREAM_API_KEY": KEY, "TOKENRELAY_API_KEYS": "client-key-0123456789"}
    )
    assert settings.upstream_api_key == KEY
    assert KEY not in repr(settings) and "client-key-0123456789" not in repr(settings)


def test_the_proxy_from_the_environment_is_used_and_netrc_is_not(
    echo_upstream: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The echo server stands in for a forward proxy: an unresolvable upstream host is reached
    # only through HTTP_PROXY. A ~/.netrc entry for that host must not replace the bearer key.
    monkeypatch.setenv("HTTP_PROXY", echo_upstream)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine upstream.invalid login someone password not-the-key\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    client = UpstreamClient("http://upstream.invalid", KEY, connect_timeout=2, read_timeout=2)
    stream = client.open(
        dialects.get("openai-completions"),
        spec("openai-completions"),
        Continuation(),
        before_read=lambda: None,
    )
    with pytest.raises(UpstreamError) as caught:
        list(stream.deltas())
    stream.close()
    client.close()
    # The proxy got the request, with the key as sent (and redacted from the error).
    assert caught.value.message.endswith("rejected Bearer [redacted]")


def test_no_proxy_for_the_upstream_host_goes_direct(
    echo_upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = UpstreamClient(echo_upstream, KEY, connect_timeout=2, read_timeout=2)
    with pytest.raises(UpstreamError) as caught:
        client.open(
            dialects.get("together"), spec("together"), Continuation(), before_read=lambda: None
        )
    client.close()
    assert caught.value.status == 401  # the upstream itself answered


async def echo_request(request: Request) -> Response:
    """Streams back, as one completion token, what it was sent; and sets a cookie."""
    seen = {
        "headers": {
            k: v for k, v in request.headers.items() if k not in ("host", "content-length")
        },
        "body": json.loads(await request.body()),
    }
    event = json.dumps({"choices": [{"text": json.dumps(seen)}]})
    body = f"data: {event}\n\ndata: [DONE]\n\n".encode()
    response = Response(body, media_type="text/event-stream")
    response.set_cookie("session", "from-an-earlier-job")
    return response


def test_each_job_sends_its_own_body_the_key_and_no_cookie() -> None:
    app = Starlette(routes=[Route("/v1/completions", echo_request, methods=["POST"])])
    dialect = dialects.get("openai-completions")
    jobs = [
        JobSpec.from_dict(
            {"prompt": prompt, "dialect": "openai-completions", "max_tokens": 7},
            default_model="m",
            default_dialect="openai-completions",
            max_prompt_bytes=1000,
        )
        for prompt in ("first job", "second job")
    ]
    seen = []
    with asgi_in_thread(app) as url:
        client = UpstreamClient(url, KEY, connect_timeout=2, read_timeout=2)
        for job in jobs:
            stream = client.open(dialect, job, Continuation(), before_read=lambda: None)
            seen.append(json.loads("".join(d.text for d in stream.deltas())))
            stream.close()
        client.close()
    for job, request in zip(jobs, seen, strict=True):
        assert request["body"] == dialect.build(job, Continuation())
        # The first response set a cookie: the second request does not send it back.
        assert request["headers"] == {
            "accept": "text/event-stream",
            "accept-encoding": "identity",
            "user-agent": "tokenrelay",
            "authorization": f"Bearer {KEY}",
            "connection": "keep-alive",
            "content-type": "application/json",
        }

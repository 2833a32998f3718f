"""The HTTP gateway end to end: real clients (the Together sample, the openai and together SDKs,
requests) against a gateway process in front of a real worker and the mock upstream."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import requests
import sseclient
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from producer import AsyncClient, Client, EventType, Status
from producer.devservers import asgi_in_thread
from producer.gateway import compat, create_app
from producer.gateway.feeds import Feeds, LogGone
from producer.gateway.sse import EventStream
from producer.mock_upstream import generate
from producer.protocol import LOG_FIELD, Keys, decode, encode, log_entry_id, make_event
from tests.conftest import Fleet, Gateway, Mock, marker


def expected(prompt: str, max_tokens: int) -> str:
    return "".join(generate(prompt, max_tokens)[0])


def test_the_together_sample_client_works_unchanged(
    gateway: Gateway, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    # Together's published sample, with only its URL pointed at the gateway.
    url = gateway.url + "/inference"
    headers = {"Authorization": "Bearer any-key", "Content-Type": "application/json"}
    payload = {
        "model": "mock?delay_ms=5",
        "prompt": "Alan Turing was",
        "max_tokens": 32,
        "stop": ["</s>"],
        "temperature": 0.7,
        "top_p": 0.7,
        "top_k": 50,
        "repetition_penalty": 1,
        "stream_tokens": True,
    }
    response = requests.post(url, json=payload, headers=headers, stream=True, timeout=30)
    response.raise_for_status()
    sse = sseclient.SSEClient(response)  # type: ignore[arg-type]
    ids = set()
    for event in sse.events():
        if event.data == "[DONE]":
            break
        partial_result = json.loads(event.data)
        token = partial_result["choices"][0]["text"]
        print(token, end="", flush=True)
        ids.add(partial_result["id"])

    printed = capsys.readouterr().out
    assert printed == expected("Alan Turing was", 32)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers.get("transfer-encoding") == "chunked"
    assert "content-encoding" not in response.headers
    (job_id,) = ids
    assert client.subscribe(job_id).text(timeout=10) == printed


def test_each_event_is_its_own_chunk_with_no_event_lines(gateway: Gateway) -> None:
    """A token is readable the moment it is sent, not one event late."""
    body = {
        "model": "mock?delay_ms=300",
        "prompt": marker("chunk"),
        "max_tokens": 3,
        "stream_tokens": True,
    }
    with requests.post(gateway.url + "/inference", json=body, stream=True, timeout=30) as response:
        raw = response.raw
        first = raw.read1(65536) if hasattr(raw, "read1") else raw.read(1)
        started = time.monotonic()
        rest = b""
        while chunk := raw.read1(65536):
            rest += chunk
        assert time.monotonic() - started > 0.4  # the rest came later, token by token
    assert first.startswith(b"data: {") and first.endswith(b"\n\n")
    assert first.count(b"data:") == 1
    assert b"event:" not in first + rest
    assert rest.endswith(b"data: [DONE]\n\n")


def test_together_non_streaming(gateway: Gateway) -> None:
    prompt = marker("together")
    body = {"model": "mock", "prompt": prompt, "max_tokens": 12, "top_k": None, "unknown": 1}
    response = requests.post(gateway.url + "/inference", json=body, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["output"]["choices"][0]["text"] == expected(prompt, 12)
    assert answer["output"]["usage"]["completion_tokens"] == 12
    assert answer["choices"][0]["finish_reason"] == "length"


FORMATS = (compat.TogetherFormat, compat.CompletionsFormat, compat.ChatFormat)


@settings(max_examples=300, deadline=None, database=None)
@given(text=st.text(), model=st.text(max_size=20), usage=st.booleans())
@example(text='"\\\n\r\t\x00\x7f\u2028\ud800 \U0001f600', model="mock", usage=False)
@example(text="\ue000tokenrelay-text\ue001", model="mock", usage=True)
@example(text="x", model="\ue000tokenrelay-text\ue001", usage=False)
def test_token_chunks_from_the_template_are_the_chunks_built_whole(
    text: str, model: str, usage: bool
) -> None:
    for format_class in FORMATS:
        form = format_class("job-1", model, usage_chunk=usage)
        for _ in range(2):  # the first call makes the template, the second uses it
            assert form.token(text) == form.token_chunk(text)
            assert json.loads(form.token(text).decode("utf-8", "surrogatepass")) is not None


def openai_client(gateway: Gateway, key: str = "unused") -> Any:
    from openai import OpenAI

    return OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30)


def together_client(gateway: Gateway) -> Any:
    from together import Together

    return Together(base_url=gateway.url, api_key="unused", max_retries=0, timeout=30)


@pytest.mark.parametrize("sdk", ["openai", "together"])
def test_sdk_completions_streaming_and_not(gateway: Gateway, sdk: str) -> None:
    api = openai_client(gateway) if sdk == "openai" else together_client(gateway)
    prompt = marker(sdk)
    whole = api.completions.create(model="mock", prompt=prompt, max_tokens=20)
    assert whole.choices[0].text == expected(prompt, 20)
    assert whole.usage.completion_tokens == 20

    options = {"stream_options": {"include_usage": True}} if sdk == "openai" else {}
    chunks = list(
        api.completions.create(model="mock", prompt=prompt, max_tokens=20, stream=True, **options)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].text)
    assert text == expected(prompt, 20)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    if sdk == "openai":
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


@pytest.mark.parametrize("sdk", ["openai", "together"])
def test_sdk_chat_streaming_and_not(gateway: Gateway, sdk: str) -> None:
    api = openai_client(gateway) if sdk == "openai" else together_client(gateway)
    content = marker(sdk + "-chat") + " Tell me about Alan Turing."
    messages = [{"role": "user", "content": content}]
    whole = api.chat.completions.create(model="mock", messages=messages, max_tokens=15)
    assert whole.choices[0].message.content == expected(content, 15)
    assert whole.choices[0].message.role == "assistant"

    stream = api.chat.completions.create(
        model="mock", messages=messages, max_tokens=15, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(content, 15)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_openai_sdk_sees_an_upstream_error_mid_stream(gateway: Gateway) -> None:
    import openai

    api = openai_client(gateway)
    stream = api.completions.create(
        model="mock?error_after=3", prompt=marker("e"), max_tokens=10, stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match="mock upstream error after 3 tokens"):
        for chunk in stream:
            received.append(chunk.choices[0].text)
    assert len(received) == 3


def test_an_upstream_refusal_before_the_first_token_is_an_http_error(gateway: Gateway) -> None:
    import openai

    api = openai_client(gateway)
    with pytest.raises(openai.RateLimitError):
        api.completions.create(
            model="mock?status=429&retry_after=0", prompt=marker("rl"), max_tokens=5, stream=True
        )
    with pytest.raises(openai.InternalServerError):
        api.completions.create(model="mock?status=500", prompt=marker("500"), max_tokens=5)


def test_bad_requests_name_the_field(gateway: Gateway) -> None:
    import openai

    api = openai_client(gateway)
    with pytest.raises(openai.BadRequestError, match="max_tokens: must be between 1"):
        api.completions.create(model="mock", prompt="hi", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        api.chat.completions.create(model="mock", messages=[], max_tokens=5)
    response = requests.post(gateway.url + "/v1/completions", data=b"{not json", timeout=10)
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]["message"]
    response = requests.post(gateway.url + "/v1/jobs", json={"prompt": 5}, timeout=10)
    assert response.status_code == 422
    assert response.json()["error"] == {
        "message": "prompt: must be a string, not a number",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": None,
    }


# --- jobs API -------------------------------------------------------------------------------


def read_sse(response: requests.Response) -> list[tuple[int, dict[str, Any]]]:
    events = []
    for event in sseclient.SSEClient(response).events():  # type: ignore[arg-type]
        events.append((int(event.id), json.loads(event.data)))
    return events


def create(gateway: Gateway, **body: Any) -> dict[str, Any]:
    response = requests.post(gateway.url + "/v1/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    created: dict[str, Any] = response.json()
    assert response.headers["location"] == created["url"]
    return created


def test_jobs_api_events_and_resume_with_last_event_id(gateway: Gateway) -> None:
    prompt = marker("jobs")
    job = create(gateway, prompt=prompt, model="mock?delay_ms=20", max_tokens=30)
    events_url = gateway.url + job["events_url"]

    # A reader that drops out after seq 9 and comes back with Last-Event-ID.
    first: list[tuple[int, dict[str, Any]]] = []
    with requests.get(events_url, stream=True, timeout=30) as response:
        for event in sseclient.SSEClient(response).events():  # type: ignore[arg-type]
            first.append((int(event.id), json.loads(event.data)))
            if int(event.id) == 9:
                break
    with requests.get(
        events_url, headers={"Last-Event-ID": "9"}, stream=True, timeout=30
    ) as response:
        resumed = read_sse(response)
    whole = first + resumed
    assert [seq for seq, _ in whole] == list(range(32))
    assert all(seq == event["seq"] for seq, event in whole)
    assert "".join(e["text"] for _, e in whole if e["type"] == "token") == expected(prompt, 30)
    assert whole[-1][1]["type"] == "done"

    # After the end: from the middle, from the last event (nothing), and a second full reader.
    with requests.get(
        events_url, headers={"Last-Event-ID": "29"}, stream=True, timeout=10
    ) as response:
        assert [seq for seq, _ in read_sse(response)] == [30, 31]
    with requests.get(
        events_url, headers={"Last-Event-ID": "31"}, stream=True, timeout=10
    ) as response:
        assert read_sse(response) == []
    with requests.get(events_url, stream=True, timeout=10) as response:
        assert read_sse(response) == whole

    state = requests.get(gateway.url + job["url"], timeout=10).json()
    assert state["status"] == "done" and state["tokens"] == 30


def sse_frames(raw: bytes) -> list[bytes]:
    """The events of a raw SSE body, each as its frame's bytes (comments left out)."""
    return [part + b"\n\n" for part in raw.split(b"\n\n") if part and not part.startswith(b":")]


def event_frame(data: bytes) -> bytes:
    """What the gateway sent for an event before it forwarded the bytes as published."""
    event = decode(data)
    return b"id: %d\ndata: %s\n\n" % (event.seq, encode(event))


def test_readers_joining_at_any_point_get_byte_identical_frames(
    gateway: Gateway, client: Client
) -> None:
    job = create(gateway, prompt=marker("bytes"), model="mock?delay_ms=20", max_tokens=60)
    url = gateway.url + job["events_url"]
    bodies: dict[str, bytes] = {}

    def read(name: str, headers: dict[str, str]) -> None:
        with requests.get(url, headers=headers, stream=True, timeout=30) as response:
            bodies[name] = b"".join(response.iter_content(None))

    threads = [threading.Thread(target=read, args=("early", {}))]
    threads[0].start()
    deadline = time.monotonic() + 20
    while client.status(job["id"]).tokens < 20:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for name, headers in (("late", {}), ("resumed", {"Last-Event-ID": "30"})):
        threads.append(threading.Thread(target=read, args=(name, headers)))
        threads[-1].start()
    for thread in threads:
        thread.join(30)
    entries = client.redis.xrange(client.keys.log(job["id"]))
    expected = [event_frame(values[LOG_FIELD.encode()]) for _, values in entries]
    assert len(expected) == 62
    assert sse_frames(bodies["early"]) == expected
    assert sse_frames(bodies["late"]) == expected
    assert sse_frames(bodies["resumed"]) == expected[31:]


def test_a_burst_reaches_every_reader_whole_and_in_order(gateway: Gateway) -> None:
    prompt = marker("burst")
    job = create(gateway, prompt=prompt, model="mock?delay_ms=0", max_tokens=1000)
    results: list[list[tuple[int, dict[str, Any]]]] = [[], [], []]

    def read(i: int) -> None:
        with requests.get(gateway.url + job["events_url"], stream=True, timeout=60) as response:
            results[i] = read_sse(response)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # joining at different points of the stream
    for thread in threads:
        thread.join(60)
    for events in results:
        assert [seq for seq, _ in events] == list(range(1002))
        assert "".join(e["text"] for _, e in events if e["type"] == "token") == expected(
            prompt, 1000
        )
        assert events[-1][1]["type"] == "done"


def test_an_event_written_with_line_breaks_is_sent_compact(
    gateway: Gateway, client: Client
) -> None:
    job_id = "hand-" + marker("x")[1:-1].replace("-", "")
    written = [
        make_event(job_id, 0, EventType.START, attempt=1),
        make_event(job_id, 1, EventType.TOKEN, text="two\nlines"),
        make_event(job_id, 2, EventType.DONE, finish_reason="stop"),
    ]
    log, state = client.keys.log(job_id), client.keys.state(job_id)
    for event in written:
        pretty = json.dumps(event.as_dict(), indent=1)
        client.redis.xadd(log, {LOG_FIELD: pretty}, id=log_entry_id(event.seq))
    client.redis.hset(state, mapping={"status": "done", "seq": 2})
    for key in (log, state):
        client.redis.expire(key, 60)
    raw = requests.get(gateway.url + f"/v1/jobs/{job_id}/events", timeout=10).content
    assert sse_frames(raw) == [b"id: %d\ndata: %s\n\n" % (e.seq, encode(e)) for e in written]


def test_two_readers_of_one_job_get_the_same_events(gateway: Gateway) -> None:
    job = create(gateway, prompt=marker("two"), model="mock?delay_ms=15", max_tokens=40)
    results: list[list[tuple[int, dict[str, Any]]]] = [[], []]

    def read(i: int) -> None:
        with requests.get(gateway.url + job["events_url"], stream=True, timeout=30) as response:
            results[i] = read_sse(response)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results[0] == results[1] and len(results[0]) == 42


def test_readers_of_one_job_share_one_feed_until_the_last_leaves(
    fleet: Fleet, client: Client
) -> None:
    """In process: the gateway's feeds (``producer/gateway/feeds.py``) against the session's
    Redis and worker. Readers joining at different points share one read of the job; the feed
    stops and unsubscribes when its last reader leaves, while the job runs on."""
    prompt = marker("feed")

    async def collect(frames: AsyncIterator[bytes]) -> bytes:
        return b"".join([chunk async for chunk in frames])

    async def body() -> tuple[str, bytes, bytes, bytes, str, int]:
        async with AsyncClient(settings=fleet.settings) as aclient:
            feeds = Feeds(aclient, keepalive=15)
            job = await aclient.submit(prompt, model="mock?delay_ms=20", max_tokens=40)
            # A response that never started (its client left first) holds no feed open.
            await feeds.frames(job.id, -1).aclose()  # type: ignore[attr-defined]
            assert len(feeds) == 0
            early = feeds.frames(job.id, -1)
            head = await anext(early)  # the feed has started and sent something
            late, resumed = feeds.frames(job.id, -1), feeds.frames(job.id, 20)
            assert len(feeds) == 1
            reads = await asyncio.gather(collect(early), collect(late), collect(resumed))
            assert len(feeds) == 0 and aclient.multiplexer.channels == 0
            # A reader that leaves mid-job takes the feed (and its subscription) with it.
            other = await aclient.submit(prompt, model="mock?delay_ms=20", max_tokens=40)
            lone = feeds.frames(other.id, -1)
            await anext(lone)
            await lone.aclose()  # type: ignore[attr-defined]
            channels = aclient.multiplexer.channels
            await (await aclient.subscribe(other.id)).text(timeout=30)
            return job.id, head + reads[0], reads[1], reads[2], other.id, channels

    job_id, early, late, resumed, other_id, channels = asyncio.run(asyncio.wait_for(body(), 60))
    entries = client.redis.xrange(client.keys.log(job_id))
    expected_frames = [event_frame(values[LOG_FIELD.encode()]) for _, values in entries]
    assert len(expected_frames) == 42
    assert sse_frames(early) == sse_frames(late) == expected_frames
    assert sse_frames(resumed) == expected_frames[21:]
    assert channels == 0
    assert client.status(other_id).status is Status.DONE


def test_a_feed_holds_only_what_its_slowest_reader_has_still_to_send(
    fleet: Fleet, client: Client
) -> None:
    """In process, with a small trim threshold: a reader that keeps up leaves the feed holding
    a few frames however long the job; a reader that starts later, from the job's start or
    from a ``Last-Event-ID``, gets the dropped frames from the log and the rest from the feed,
    byte for byte what the early reader got."""
    prompt = marker("trim")

    async def collect(frames: AsyncIterator[bytes]) -> bytes:
        return b"".join([chunk async for chunk in frames])

    async def body() -> tuple[str, bytes, bytes, bytes, int, int, int]:
        async with AsyncClient(settings=fleet.settings) as aclient:
            feeds = Feeds(aclient, keepalive=15, trim=8)
            job = await aclient.submit(prompt, model="mock?delay_ms=10", max_tokens=80)
            early = feeds.frames(job.id, -1)
            got, most_held = b"", 0
            while len(sse_frames(got)) < 40:
                got += await anext(early)
                most_held = max(most_held, feeds.held)
            held_at_join = feeds.held
            late, resumed = feeds.frames(job.id, -1), feeds.frames(job.id, 5)
            reads = await asyncio.gather(collect(early), collect(late), collect(resumed))
            return job.id, got + reads[0], reads[1], reads[2], most_held, held_at_join, len(feeds)

    job_id, early, late, resumed, most_held, held_at_join, open_feeds = asyncio.run(
        asyncio.wait_for(body(), 60)
    )
    entries = client.redis.xrange(client.keys.log(job_id))
    expected_frames = [event_frame(values[LOG_FIELD.encode()]) for _, values in entries]
    assert len(expected_frames) == 82
    # 40 frames sent to the early reader; the feed drops the sent ones once it holds 8 (and at
    # least half are sent), so it holds under 16 plus one batch of events (a few, unless this
    # process stalls), never all 40.
    assert most_held < 30
    assert held_at_join < 40  # so the late readers' first frames can only come from the log
    assert sse_frames(early) == sse_frames(late) == expected_frames
    assert sse_frames(resumed) == expected_frames[6:]
    assert open_feeds == 0


def test_a_reader_that_stops_reading_does_not_make_its_feed_hold_the_job(
    fleet: Fleet, client: Client
) -> None:
    """In process, with small thresholds: one reader takes a chunk and then reads nothing while
    another reads the whole job. The feed holds at most about ``lag`` frames all along, not the
    job; when the stalled reader goes on, it gets what the feed dropped from the log and the
    rest from the feed: every event once, in order, byte for byte what the other got."""
    prompt = marker("lag")

    async def collect(frames: AsyncIterator[bytes]) -> bytes:
        return b"".join([chunk async for chunk in frames])

    async def body() -> tuple[str, bytes, bytes, int, int]:
        async with AsyncClient(settings=fleet.settings) as aclient:
            feeds = Feeds(aclient, keepalive=15, trim=8, lag=24)
            job = await aclient.submit(prompt, model="mock?delay_ms=5", max_tokens=100)
            stalled, reading = feeds.frames(job.id, -1), feeds.frames(job.id, -1)
            first = await anext(stalled)
            got, most_held = b"", 0
            with contextlib.suppress(StopAsyncIteration):
                while True:
                    got += await anext(reading)
                    most_held = max(most_held, feeds.held)
            rest = await collect(stalled)
            return job.id, got, first + rest, most_held, len(feeds)

    job_id, whole, after_stall, most_held, open_feeds = asyncio.run(asyncio.wait_for(body(), 60))
    entries = client.redis.xrange(client.keys.log(job_id))
    expected_frames = [event_frame(values[LOG_FIELD.encode()]) for _, values in entries]
    assert len(expected_frames) == 102
    # Past 24 frames held the feed keeps the newest 8, so it holds under 24 plus one batch of
    # events (a few, unless this process stalls); without the cap it would hold nearly all 102.
    assert most_held < 40
    assert sse_frames(whole) == sse_frames(after_stall) == expected_frames
    assert open_feeds == 0


def test_a_reader_whose_events_left_the_log_gets_an_error_not_a_gap(client: Client) -> None:
    """Events written by hand: the feed drops what its reader sent, then the log expires under
    it; a new reader from the start fails with ``LogGone`` instead of skipping events."""
    job_id = "trim-" + marker("x")[1:-1].replace("-", "")
    keys = client.keys
    events = [make_event(job_id, 0, EventType.START, attempt=1)]
    events += [make_event(job_id, seq, EventType.TOKEN, text=f" t{seq}") for seq in range(1, 30)]

    async def write(aclient: AsyncClient, event: Any) -> None:
        data = encode(event)
        await aclient.redis.xadd(keys.log(job_id), {LOG_FIELD: data}, id=log_entry_id(event.seq))
        await aclient.redis.publish(keys.channel(job_id), data)

    async def body() -> tuple[int, str]:
        async with AsyncClient(settings=client.settings) as aclient:
            await aclient.redis.hset(keys.state(job_id), mapping={"status": "running", "seq": -1})
            await aclient.redis.expire(keys.state(job_id), 60)
            feeds = Feeds(aclient, keepalive=15, trim=4)
            early = feeds.frames(job_id, -1)

            async def read_early() -> None:
                got = b""
                while len(sse_frames(got)) < len(events):
                    got += await anext(early)

            reading = asyncio.ensure_future(read_early())
            await asyncio.sleep(0.2)  # subscribed: the events come live, a few at a time
            for event in events:
                await write(aclient, event)
                await asyncio.sleep(0.005)
            await reading
            held = feeds.held
            await aclient.redis.delete(keys.log(job_id))
            late = feeds.frames(job_id, -1)
            with pytest.raises(LogGone) as caught:
                await anext(late)
            await write(aclient, make_event(job_id, 30, EventType.DONE, finish_reason="stop"))
            await early.aclose()  # type: ignore[attr-defined]
            return held, str(caught.value)

    held, message = asyncio.run(asyncio.wait_for(body(), 30))
    assert held < 30
    assert message == f"job {job_id}: events 0 to {29 - held} are gone"


def test_a_reader_that_stops_reading_holds_up_no_other_reader(gateway: Gateway) -> None:
    """A client that opens the stream and reads nothing (a small receive window, so the
    gateway's writes to it back up) while another reads the same job to its end; then it reads
    too, and gets every event once, in order."""
    tokens = 60_000  # about 6.5 MB of frames: more than the kernel buffers between the two
    job = create(gateway, prompt=marker("stuck"), model="mock?delay_ms=0", max_tokens=tokens)
    host, port = gateway.url.removeprefix("http://").split(":")
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.settimeout(60)
    stuck.connect((host, int(port)))
    stuck.sendall(f"GET {job['events_url']} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    try:
        time.sleep(0.5)  # the stuck client has joined; its frames start backing up
        with requests.get(gateway.url + job["events_url"], stream=True, timeout=60) as response:
            events = read_sse(response)
        assert [seq for seq, _ in events] == list(range(tokens + 2))
        late = http.client.HTTPResponse(stuck)
        late.begin()
        assert late.status == 200
        frames = sse_frames(late.read())
    finally:
        stuck.close()
    assert [decode(f.split(b"data: ", 1)[1][:-2]).seq for f in frames] == list(range(tokens + 2))


def test_cancel_through_the_api(gateway: Gateway, mock: Mock) -> None:
    prompt = marker("apicancel")
    job = create(gateway, prompt=prompt, model="mock?delay_ms=50", max_tokens=400)
    seen = []
    with requests.get(gateway.url + job["events_url"], stream=True, timeout=30) as response:
        for event in sseclient.SSEClient(response).events():  # type: ignore[arg-type]
            data = json.loads(event.data)
            seen.append(data["type"])
            if data["type"] == "token" and data["seq"] == 3:
                answer = requests.post(gateway.url + job["url"] + "/cancel", timeout=10)
                assert answer.status_code == 200
    assert seen[-1] == "cancelled" and seen.count("token") < 20
    wait_for_upstream_state(mock, prompt, "disconnected")


def wait_for_upstream_state(mock: Mock, prompt: str, state: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while mock.record(prompt)["state"] != state:
        assert time.monotonic() < deadline, mock.record(prompt)
        time.sleep(0.05)


def test_a_compat_client_that_leaves_cancels_its_job(
    gateway: Gateway, client: Client, mock: Mock
) -> None:
    prompt = marker("leave")
    body = {"model": "mock?delay_ms=50", "prompt": prompt, "max_tokens": 400, "stream": True}
    response = requests.post(gateway.url + "/v1/completions", json=body, stream=True, timeout=30)
    lines = response.iter_lines()
    first = next(line for line in lines if line.startswith(b"data:"))
    job_id = json.loads(first[5:])["id"].removeprefix("cmpl-")
    response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while client.status(job_id).status is not Status.CANCELLED:
        assert time.monotonic() < deadline, client.status(job_id)
        time.sleep(0.05)
    wait_for_upstream_state(mock, prompt, "disconnected")


def test_a_jobs_reader_that_leaves_only_detaches(gateway: Gateway, client: Client) -> None:
    job = create(gateway, prompt=marker("detach"), model="mock?delay_ms=20", max_tokens=40)
    with requests.get(gateway.url + job["events_url"], stream=True, timeout=30) as response:
        for event in sseclient.SSEClient(response).events():  # type: ignore[arg-type]
            if json.loads(event.data)["type"] == "token":
                break
    events = list(client.subscribe(job["id"]).events(timeout=30))
    assert events[-1].type is EventType.DONE


def test_idle_streams_get_keepalive_comments(fleet: Any, run_dir: Any) -> None:
    from tests.conftest import _start_gateway

    quick = _start_gateway("keepalive", fleet, run_dir, {"TOKENRELAY_KEEPALIVE_SECONDS": "0.2"})
    try:
        job = create(quick, prompt=marker("idle"), model="mock?delay_ms=700", max_tokens=2)
        with requests.get(quick.url + job["events_url"], stream=True, timeout=30) as response:
            raw = b"".join(response.iter_content(None))
        assert raw.count(b": keep-alive\n\n") >= 3
        assert raw.count(b"data: ") == 4
        # The compatible routes too, between their tokens.
        body = {
            "model": "mock?delay_ms=700",
            "prompt": marker("idle-compat"),
            "max_tokens": 2,
            "stream_tokens": True,
        }
        with requests.post(quick.url + "/inference", json=body, stream=True, timeout=30) as answer:
            raw = b"".join(answer.iter_content(None))
        assert raw.count(b": keep-alive\n\n") >= 2
        assert raw.count(b'"text":') == 3 and raw.endswith(b"data: [DONE]\n\n")
    finally:
        quick.process.stop()


def test_many_concurrent_sse_clients_on_few_redis_connections(
    gateway: Gateway, redis_server: Any
) -> None:
    import redis

    admin = redis.Redis(port=redis_server.port)
    prompts = [marker(f"fan{i}") for i in range(200)]
    texts: dict[int, str] = {}
    peak = [0]

    def stream(i: int) -> None:
        body = {
            "model": "mock?delay_ms=30",
            "prompt": prompts[i],
            "max_tokens": 30,
            "stream_tokens": True,
        }
        with requests.post(
            gateway.url + "/inference", json=body, stream=True, timeout=60
        ) as response:
            parts = []
            for event in sseclient.SSEClient(response).events():  # type: ignore[arg-type]
                if event.data == "[DONE]":
                    break
                parts.append(json.loads(event.data)["choices"][0]["text"])
            texts[i] = "".join(parts)

    def gateway_connections() -> int:
        return sum(1 for c in admin.client_list() if c.get("name") == "tokenrelay-gateway")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(200)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 90
    while any(t.is_alive() for t in threads):
        assert time.monotonic() < deadline, "clients did not finish"
        peak[0] = max(peak[0], gateway_connections())
        time.sleep(0.05)
    admin.close()
    assert len(texts) == 200
    for i, prompt in enumerate(prompts):
        assert texts[i] == expected(prompt, 30), i
    assert 1 <= peak[0] <= 9, f"the gateway held {peak[0]} Redis connections"


# --- keys and tenants -------------------------------------------------------------------------


def test_keys_are_required_and_jobs_are_private_to_their_key(keyed_gateway: Gateway) -> None:
    url = keyed_gateway.url
    one, two = ({"Authorization": f"Bearer {key}"} for key in keyed_gateway.keys)
    body = {"prompt": marker("tenant"), "max_tokens": 5}

    missing = requests.post(url + "/v1/jobs", json=body, timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = requests.post(
        url + "/v1/jobs",
        json=body,
        timeout=10,
        headers={"Authorization": "Bearer not-a-key-at-all"},
    )
    assert wrong.status_code == 401 and "not-a-key" not in wrong.text
    assert requests.post(url + "/inference", json=body, timeout=10).status_code == 401

    created = requests.post(url + "/v1/jobs", json=body, headers=one, timeout=10).json()
    job_url = url + created["url"]
    assert requests.get(job_url, headers=one, timeout=10).status_code == 200
    for other in (two,):
        assert requests.get(job_url, headers=other, timeout=10).status_code == 404
        assert requests.get(job_url + "/events", headers=other, timeout=10).status_code == 404
        assert requests.post(job_url + "/cancel", headers=other, timeout=10).status_code == 404
    # A browser's EventSource sends the key in the query string.
    token = keyed_gateway.keys[0]
    with requests.get(
        job_url + "/events", params={"access_token": token}, stream=True, timeout=30
    ) as response:
        assert response.status_code == 200
        assert read_sse(response)[-1][1]["type"] == "done"
    # The other tenant cannot take the id either.
    taken = requests.post(
        url + "/v1/jobs", json={**body, "job_id": created["id"]}, headers=two, timeout=10
    )
    assert taken.status_code == 409


def test_oversized_and_malformed_bodies(keyed_gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {keyed_gateway.keys[0]}"}
    big = {"prompt": "x" * 70_000}
    response = requests.post(keyed_gateway.url + "/v1/jobs", json=big, headers=headers, timeout=10)
    assert response.status_code == 413
    assert "larger than the limit of 65536 bytes" in response.json()["error"]["message"]
    response = requests.post(
        keyed_gateway.url + "/v1/jobs", data=b"[1, 2", headers=headers, timeout=10
    )
    assert response.status_code == 400
    response = requests.post(keyed_gateway.url + "/v1/jobs", json=[1], headers=headers, timeout=10)
    assert response.status_code == 400 and "JSON object" in response.text
    assert (
        requests.get(keyed_gateway.url + "/v1/jobs/nope", headers=headers, timeout=10).status_code
        == 404
    )


def test_health_and_openapi(gateway: Gateway) -> None:
    health = requests.get(gateway.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["redis"] == "ok"
    spec = requests.get(gateway.url + "/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.")
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/cancel",
    } <= set(spec["paths"])
    assert "open to anyone" in gateway.log()


def test_the_gateway_never_leaks_the_upstream_key(gateway: Gateway, api_key: str) -> None:
    # The gateway process is not even given the key; its answers and its log never hold it.
    body = {"model": "mock?status=401", "prompt": marker("k"), "max_tokens": 3}
    answer = requests.post(gateway.url + "/v1/completions", json=body, timeout=30)
    assert answer.status_code == 502
    assert api_key[-16:] not in answer.text and api_key[-16:] not in gateway.log()


def test_socket_closed_without_reading_does_not_hurt_the_gateway(gateway: Gateway) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /inference HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    assert requests.get(gateway.url + "/healthz", timeout=10).status_code == 200


def test_hostile_bodies_are_refused_cleanly(gateway: Gateway) -> None:
    deep = requests.post(gateway.url + "/v1/jobs", data=b"[" * 100_000, timeout=10)
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]
    # A key that is a lone surrogate, escaped in JSON: refused by name, answered as valid JSON.
    odd = requests.post(
        gateway.url + "/v1/jobs",
        data=b'{"prompt": "x", "\\ud800": 1}',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert odd.status_code == 422 and "unknown field" in odd.json()["error"]["message"]
    for field in ("tenant", "follow"):
        sneaky = requests.post(
            gateway.url + "/v1/jobs", json={"prompt": "x", field: "t"}, timeout=10
        )
        assert sneaky.status_code == 422
        assert sneaky.json()["error"]["message"] == f"{field}: unknown field"


def test_an_event_stream_that_fails_ends_and_says_why_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream whose frames fail (here: its events left the log) ends after what it sent,
    and the gateway logs why instead of ending it as silently as a client that left."""

    async def frames() -> AsyncIterator[bytes]:
        yield b"id: 0\ndata: {}\n\n"
        raise LogGone("job j: events 1 to 5 are gone")

    async def events(request: Request) -> Response:
        return EventStream(frames())

    app = Starlette(routes=[Route("/events", events)])
    with caplog.at_level(logging.WARNING, "tokenrelay.gateway"), asgi_in_thread(app) as url:
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(url + "/events", timeout=10).content  # noqa: B018
        deadline = time.monotonic() + 5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [r.getMessage() for r in caplog.records] == [
        "an event stream ended before its job: job j: events 1 to 5 are gone"
    ]


@pytest.mark.parametrize(
    ("second", "text", "error"),
    [
        ([" a", " b", " c", " d"], " a b c d", None),  # says the same, and more
        ([" a b", " c"], " a b c", None),  # the same text in other pieces
        ([" a", " x", " c"], " a b", "restarted"),  # says something else
        ([" a"], " a b", "restarted"),  # ends before what the client has
    ],
)
def test_a_compat_stream_goes_on_through_a_restart_that_repeats_what_was_sent(
    client: Client, second: list[str], text: str, error: str | None
) -> None:
    """A worker lost mid-stream: the job starts again (a ``restart`` event) after the client
    got " a b". An OpenAI stream cannot take text back, so the gateway sends the new attempt's
    text past what the client has while it repeats it, as a deterministic upstream does, and
    ends the request with ``restarted`` from the first difference. Events written by hand, on a
    prefix no worker serves."""
    settings = replace(client.settings, prefix="trcompat" + secrets.token_hex(3))
    keys = Keys(settings.prefix)

    def write(job_id: str, seq: int, type_: EventType, **fields: Any) -> None:
        data = encode(make_event(job_id, seq, type_, **fields))
        client.redis.xadd(keys.log(job_id), {LOG_FIELD: data}, id=log_entry_id(seq))
        client.redis.publish(keys.channel(job_id), data)

    lines: list[bytes] = []
    with asgi_in_thread(create_app(settings)) as url:
        body = {"model": "mock", "prompt": marker("restart"), "max_tokens": 9, "stream": True}

        def read() -> None:  # the gateway answers once the first token is there
            response = requests.post(url + "/v1/completions", json=body, stream=True, timeout=15)
            lines.extend(response.iter_lines())

        reading = threading.Thread(target=read, daemon=True)
        reading.start()
        deadline = time.monotonic() + 10
        while not (queued := client.redis.zrange(keys.queued, 0, -1)):
            assert time.monotonic() < deadline, "the gateway created no job"
            time.sleep(0.02)
        job_id = queued[0].decode()
        events = [(EventType.START, {"attempt": 1})]
        events += [(EventType.TOKEN, {"text": t}) for t in (" a", " b")]
        events += [(EventType.RESTART, {"attempt": 2}), (EventType.START, {"attempt": 2})]
        events += [(EventType.TOKEN, {"text": t}) for t in second]
        events += [(EventType.DONE, {"finish_reason": "length"})]
        for seq, (type_, fields) in enumerate(events):
            write(job_id, seq, type_, **fields)
            time.sleep(0.01)
        reading.join(15)
    payloads = [line[len(b"data: ") :] for line in lines if line.startswith(b"data: ")]
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    got = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    assert got == text
    failures = [c["error"]["code"] for c in chunks if "error" in c]
    assert failures == ([error] if error else [])
    if not error:
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

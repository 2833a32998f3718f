"""The core pipeline end to end: a real redis-server, a real gevent Celery worker, the mock
upstream over HTTP, and the producer library reading what a user would read."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from typing import Any

import pytest
import requests
import sseclient

from producer import Client, EventType, JobFailedError, Status, mock_upstream
from producer.devservers import asgi_in_thread
from producer.mock_upstream import generate
from producer.protocol import Event
from tests.conftest import Fleet, Mock, marker

DIALECT_ROUTES = {
    "together": "/inference",
    "openai-completions": "/v1/completions",
    "openai-chat": "/v1/chat/completions",
    "tgi": "/generate",
    "ollama": "/api/generate",
}


def non_streamed_text(
    mock: Mock,
    api_key: str,
    dialect: str,
    prompt: str,
    max_tokens: int,
    stop: list[str] | None = None,
) -> str:
    """What the mock upstream answers for the same request without streaming."""
    body: dict[str, Any] = {"model": "mock", "max_tokens": max_tokens}
    if dialect == "openai-chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stop:
        body["stop"] = stop
    if dialect == "tgi":
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens, "stop": stop or []}}
    if dialect == "ollama":
        body = {
            "model": "mock",
            "prompt": prompt,
            "stream": False,
            "options": {"num_predict": max_tokens, "stop": stop or []},
        }
    response = requests.post(
        mock.url + DIALECT_ROUTES[dialect],
        json=body,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10,
    )
    response.raise_for_status()
    data = response.json()
    if dialect == "openai-chat":
        return str(data["choices"][0]["message"]["content"])
    if dialect == "tgi":
        return str(data["generated_text"])
    if dialect == "ollama":
        return str(data["response"])
    return str(data["choices"][0]["text"])


def assert_well_formed(events: list[Event], job_id: str) -> None:
    assert [e.seq for e in events] == list(range(len(events))), "seq must run 0..n with no gap"
    assert all(e.job == job_id for e in events)
    terminal = [e for e in events if e.terminal]
    assert len(terminal) == 1 and events[-1].terminal, "exactly one terminal event, last"
    assert events[0].type is EventType.START


def token_text(events: list[Event]) -> str:
    return "".join(e.text for e in events if e.type is EventType.TOKEN)


@pytest.mark.parametrize("dialect", list(DIALECT_ROUTES))
def test_each_dialect_reassembles_exactly_the_upstream_text(
    client: Client, mock: Mock, api_key: str, dialect: str
) -> None:
    prompt = marker(dialect) + " Alan Turing was"
    job = client.submit(prompt=prompt, dialect=dialect, max_tokens=40, follow=True)
    events = list(job.events(timeout=30))

    assert_well_formed(events, job.id)
    expected = non_streamed_text(mock, api_key, dialect, prompt, 40)
    assert token_text(events) == expected
    assert len(expected) > 40  # the mock's vocabulary includes multi-byte characters
    done = events[-1]
    assert done.type is EventType.DONE
    assert done.fields["finish_reason"] == "length"
    if dialect != "tgi":
        assert done.fields["usage"]["completion_tokens"] == 40
    state = client.status(job.id)
    assert state.status is Status.DONE
    assert state.tokens == 40


def test_stop_sequence_ends_the_job_with_finish_reason_stop(client: Client) -> None:
    prompt = marker("stop") + " The"
    tokens, _ = generate(prompt, 30)
    stop = tokens[10].strip() or tokens[11].strip()
    job = client.submit(prompt=prompt, max_tokens=30, stop=[stop], follow=True)
    events = list(job.events(timeout=30))
    expected, finish = generate(prompt, 30, [stop])
    assert token_text(events) == "".join(expected)
    assert finish == "stop" and events[-1].fields["finish_reason"] == "stop"


def test_the_mock_answers_a_repeated_request_from_its_cache_as_generated() -> None:
    """The mock keeps small requests' outputs (a benchmark sends one prompt many times); a
    repeated request gets what ``generate`` gives, even if a caller changed its last copy."""
    prompt = marker("cached") + " The"
    stop = [generate(prompt, 30)[0][12].strip() or "zzz"]
    hits = mock_upstream._cached.cache_info().hits
    first, finish = mock_upstream._generated(prompt, 30, stop)
    first.append("changed by a caller")
    again = mock_upstream._generated(prompt, 30, stop)
    assert again == (first[:-1], finish) == generate(prompt, 30, stop)
    assert mock_upstream._cached.cache_info().hits == hits + 1
    long_prompt = prompt * 1000  # too long to keep
    assert mock_upstream._generated(long_prompt, 5, []) == generate(long_prompt, 5)
    assert mock_upstream._cached.cache_info().hits == hits + 1


def test_the_mock_keeps_its_cadence_when_a_wake_up_comes_late() -> None:
    """A paced stream's token i is due (i + 1) x delay after it began: a late wake-up (here the
    server's loop blocked for 80 ms between two tokens) delays one token, not the rest. Paced
    from each write instead, every later token would come 30 ms late, and a benchmark's upstream
    would slow down whenever its own process waits for a core."""
    inner = mock_upstream.create_app()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/_block":
            time.sleep(0.08)  # holds the server's event loop, as a busy core would
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await inner(scope, receive, send)

    delay_ms, count = 50, 10
    body = {
        "model": f"mock?delay_ms={delay_ms}&stamp=1",
        "prompt": marker("cadence"),
        "max_tokens": count,
        "stream_tokens": True,
    }
    stamps: list[int] = []
    with (
        asgi_in_thread(app) as url,
        requests.Session() as http,
        http.post(url + "/inference", json=body, stream=True, timeout=10) as response,
    ):
        for event in sseclient.SSEClient(response.iter_content(None)).events():
            if event.data == "[DONE]":
                break
            text = json.loads(event.data)["choices"][0]["text"]
            if not text:  # the finish chunk
                continue
            index, stamp = re.fullmatch(r"\|(\d+):(\d+)", text).groups()  # type: ignore[union-attr]
            assert int(index) == len(stamps)
            stamps.append(int(stamp))
            if len(stamps) == 3:
                http.post(url + "/_block", timeout=10)
    gaps_ms = [(b - a) / 1e6 for a, b in itertools.pairwise(stamps)]
    assert len(stamps) == count
    assert max(gaps_ms) > delay_ms + 20, f"the loop was not blocked past a token: {gaps_ms}"
    # Token 9 is due 9 intervals after token 0: the late token's lag was not carried on.
    span_ms = (stamps[-1] - stamps[0]) / 1e6
    assert (count - 1) * delay_ms - 5 < span_ms < (count - 1) * delay_ms + 15, gaps_ms


def test_readers_that_join_early_midway_and_late_get_identical_events(client: Client) -> None:
    early = client.submit(
        prompt=marker("early"), model="mock?delay_ms=25", max_tokens=40, follow=True
    )
    other = client.submit(
        prompt=marker("other"), model="mock?delay_ms=20", max_tokens=40, follow=True
    )
    seen: dict[str, list[Event]] = {}

    def read(name: str, job: Any) -> None:
        seen[name] = list(job.events(timeout=30))

    threads = [
        threading.Thread(target=read, args=("early", early)),
        threading.Thread(target=read, args=("other", other)),
    ]
    for thread in threads:
        thread.start()
    log_key = client.keys.log(early.id)
    deadline = time.monotonic() + 20
    while client.redis.xlen(log_key) < 10:
        assert time.monotonic() < deadline, "the job never produced 10 events"
        time.sleep(0.01)
    midway = client.subscribe(early.id)
    threads.append(threading.Thread(target=read, args=("midway", midway)))
    threads[-1].start()
    for thread in threads:
        thread.join(40)
    late = list(client.subscribe(early.id).events(timeout=10))

    assert_well_formed(seen["early"], early.id)
    assert seen["early"] == seen["midway"] == late
    assert seen["early"][-1].type is EventType.DONE
    # Two jobs at once never mix: each has exactly its own prompt's tokens.
    assert token_text(seen["early"]) == "".join(generate(marker_of(early, client), 40)[0])
    assert token_text(seen["other"]) == "".join(generate(marker_of(other, client), 40)[0])
    assert_well_formed(seen["other"], other.id)


def marker_of(job: Any, client: Client) -> str:
    import json

    spec = json.loads(client.redis.hget(client.keys.state(job.id), "spec"))
    return str(spec["prompt"])


def test_fifty_jobs_at_once_complete_and_run_concurrently(client: Client) -> None:
    prompts = [marker(f"many{i}") for i in range(50)]
    jobs = [client.submit(prompt=p, model="mock?delay_ms=40", max_tokens=25) for p in prompts]
    texts = [job.text(timeout=60) for job in jobs]
    for prompt, text in zip(prompts, texts, strict=True):
        assert text == "".join(generate(prompt, 25)[0])

    intervals = []
    for job in jobs:
        state = job.status()
        assert state.status is Status.DONE
        assert state.started is not None and state.finished is not None
        intervals.append((state.started, state.finished))
    # At the moment the last job started, how many others were still running?
    last_start = max(start for start, _ in intervals)
    running_then = sum(1 for start, end in intervals if start <= last_start < end)
    assert running_then == 50, f"only {running_then} of 50 jobs overlapped"


def test_a_job_is_in_the_running_set_exactly_while_it_runs(client: Client) -> None:
    # Reapers watch the running set: a job joins it when claimed and leaves it when it ends.
    job = client.submit(marker("running"), model="mock?delay_ms=40", max_tokens=25, follow=True)
    running = lambda: job.id.encode() in client.redis.zrange(client.keys.running, 0, -1)  # noqa: E731
    events = job.events(timeout=30)
    assert next(events).type is EventType.START
    assert running()
    assert [e.type for e in events][-1] is EventType.DONE
    # The same script call that published the terminal event took the job out (not a reaper,
    # which would only do so up to a second later).
    assert not running()


def test_cancel_mid_stream_closes_the_upstream_and_nothing_follows(
    client: Client, mock: Mock
) -> None:
    prompt = marker("cancel")
    job = client.submit(prompt=prompt, model="mock?delay_ms=50", max_tokens=500, follow=True)
    events: list[Event] = []
    for event in job.events(timeout=30):
        events.append(event)
        if event.type is EventType.TOKEN and event.seq == 3:
            cancelled_at = time.monotonic()
            client.cancel(job.id)
    assert events[-1].type is EventType.CANCELLED
    assert time.monotonic() - cancelled_at < 1.0
    assert_well_formed(events, job.id)
    assert client.status(job.id).status is Status.CANCELLED

    deadline = time.monotonic() + 5
    while mock.record(prompt)["state"] != "disconnected":
        assert time.monotonic() < deadline, f"upstream still open: {mock.record(prompt)}"
        time.sleep(0.05)
    sent = mock.record(prompt)["tokens_sent"]
    assert isinstance(sent, int) and sent < 100
    time.sleep(0.3)
    # The log ends with the terminal event: no token was published after it.
    log = client.redis.xrange(client.keys.log(job.id))
    assert len(log) == len(events)


def test_cancel_of_a_queued_job_ends_it_at_once(fleet: Fleet) -> None:
    # Nobody consumes this prefix's queue, so the job stays queued.
    with Client(settings=fleet.settings, prefix="trnobody") as idle:
        job = idle.submit(prompt=marker("queued"))
        assert idle.status(job.id).status is Status.QUEUED
        state = idle.cancel(job.id)
        assert state.status is Status.CANCELLED
        events = list(job.events(timeout=5))
        assert [e.type for e in events] == [EventType.CANCELLED]
        with pytest.raises(JobFailedError, match="cancelled"):
            job.text(timeout=5)


def test_an_attempt_fenced_as_it_ends_ends_quietly_and_publishes_nothing_more(
    client: Client, fleet: Fleet
) -> None:
    # The job is taken over (another attempt owns it) and at once cancelled, while the worker
    # waits for its first token. The worker learns of the takeover only when it publishes the
    # cancelled event: the attempt must end as fenced, not as a task that raised (Celery would
    # deliver it again after the visibility timeout).
    job = client.submit(marker("fenced"), model="mock?delay_ms=3000", max_tokens=5, follow=True)
    assert next(job.events(timeout=30)).type is EventType.START
    client.redis.hset(client.keys.state(job.id), "owner", "another-attempt")
    client.cancel(job.id)
    deadline = time.monotonic() + 10
    while f"job {job.id} finished" not in fleet.log():
        assert time.monotonic() < deadline, "the attempt did not end"
        time.sleep(0.05)
    log = fleet.log()
    assert re.search(rf"job {job.id} finished: fenced\b", log), log[-2000:]
    assert not re.search(rf"raised unexpected.*{job.id}", log)
    assert len(client.redis.xrange(client.keys.log(job.id))) == 1  # the start event only
    # The job belongs to the other attempt now: end it for the session's Redis.
    client.redis.delete(client.keys.state(job.id))


@pytest.mark.parametrize(
    ("fault", "code", "in_message", "tokens_kept"),
    [
        ("status=500", "upstream_http", "500", 0),
        ("error_after=5", "upstream_error", "mock upstream error after 5 tokens", 5),
        ("malformed_after=4", "upstream_protocol", "", 4),
        ("status=401", "upstream_http", "401", 0),
    ],
)
def test_upstream_failures_end_in_one_error_event(
    client: Client, fault: str, code: str, in_message: str, tokens_kept: int
) -> None:
    prompt = marker("fail")
    job = client.submit(prompt=prompt, model=f"mock?{fault}", max_tokens=20, follow=True)
    events = list(job.events(timeout=60))
    assert_well_formed(events, job.id)
    error = events[-1]
    assert error.type is EventType.ERROR
    assert error.fields["code"] == code
    assert in_message in error.fields["message"]
    # What was delivered before the failure is kept.
    assert token_text(events) == "".join(generate(prompt, 20)[0][:tokens_kept])
    state = client.status(job.id)
    assert state.status is Status.ERROR
    assert state.error is not None and state.error["code"] == code

    # The worker stays healthy for the next job.
    assert client.submit(prompt=marker("after"), max_tokens=5).text(timeout=30)


def test_unreachable_upstream_ends_in_error_and_keys_expire_after_the_ttl(
    unreachable_fleet: Fleet,
) -> None:
    from tests.conftest import SHORT_TTL

    with unreachable_fleet.client() as down:
        job = down.submit(prompt=marker("down"), follow=True)
        events = list(job.events(timeout=60))
        assert [e.type for e in events] == [EventType.START, EventType.ERROR]
        assert events[-1].fields["code"] == "upstream_unreachable"
        assert "could not connect" in events[-1].fields["message"]
        keys = down.keys.job_keys(job.id)[:2]  # state and log
        for key in keys:
            ttl = down.redis.ttl(key)
            assert 0 < ttl <= SHORT_TTL, (key, ttl)
        deadline = time.monotonic() + SHORT_TTL + 5
        while down.redis.exists(*keys):
            assert time.monotonic() < deadline, "the job's keys outlived the TTL"
            time.sleep(0.1)
        from producer import JobNotFound

        with pytest.raises(JobNotFound):
            down.status(job.id)


def test_same_job_id_twice_returns_the_existing_job(client: Client) -> None:
    job_id = "retry-safe-" + marker("x")[1:-1]
    first = client.submit(prompt=marker("idem"), max_tokens=8, job_id=job_id)
    second = client.submit(prompt="something else", max_tokens=8, job_id=job_id)
    assert second.id == first.id
    events = list(second.events(timeout=30))
    assert sum(1 for e in events if e.type is EventType.START) == 1
    assert events[-1].type is EventType.DONE

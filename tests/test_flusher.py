"""The worker's flusher: many streams' events pipelined into one round trip, against a real Redis.

These drive ``JobPublisher`` with a real ``Flusher`` (a thread here, a greenlet in a worker) and
read the jobs back with the producer library, as a user would.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from producer import Client, scripts
from producer.devservers import RedisServer
from producer.protocol import EventType, Keys
from producer.settings import Settings
from worker.errors import Fenced
from worker.flusher import Flusher
from worker.publisher import JobPublisher, Scripts, claim


@pytest.fixture()
def prefix() -> str:
    return f"flush{secrets.token_hex(3)}"


@pytest.fixture()
def setup(redis_server: RedisServer, prefix: str) -> Iterator[tuple[redis.Redis, Flusher, Client]]:
    client = redis.Redis.from_url(redis_server.url)
    flusher = Flusher(client)
    reader = Client(settings=Settings.from_env({"TOKENRELAY_REDIS_URL": redis_server.url,
                                                "TOKENRELAY_PREFIX": prefix}))  # fmt: skip
    yield client, flusher, reader
    flusher.stop()
    reader.close()
    # The session's Redis is shared: leave no key of this test's namespace behind.
    for key in client.scan_iter(f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


def _claimed(client: redis.Redis, prefix: str, job_id: str, **kwargs: object) -> JobPublisher:
    keys, scripts = Keys(prefix), Scripts(client)
    client.hset(keys.state(job_id), mapping={"status": "queued", "attempt": 0, "seq": -1})
    owner = f"test:{job_id}"
    taken = claim(scripts, keys, job_id, owner, 60_000)
    assert taken.outcome == "claimed"
    return JobPublisher(
        scripts,
        keys,
        job_id,
        owner,
        next_seq=0,
        lease_ms=60_000,
        ttl=60,
        **kwargs,  # type: ignore[arg-type]
    )


def test_streams_flushing_together_each_get_every_token_once_in_order(
    setup: tuple[redis.Redis, Flusher, Client], prefix: str
) -> None:
    client, flusher, reader = setup
    jobs = {f"job{i}": [f"t{i}.{n} " for n in range(300)] for i in range(20)}
    publishers = {job: _claimed(client, prefix, job, flusher=flusher) for job in jobs}

    def stream(job: str) -> None:
        publisher = publishers[job]
        publisher.event(EventType.START, attempt=1)
        for n, text in enumerate(jobs[job]):
            publisher.token(text)
            if n % 7 == 0:  # like one upstream read bringing several tokens
                publisher.flush()
        publisher.finish(EventType.DONE, finish_reason="length")

    threads = [threading.Thread(target=stream, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for job, texts in jobs.items():
        followed = reader.subscribe(job)
        events = list(followed.events(timeout=10))
        assert [e.seq for e in events] == list(range(len(texts) + 2))
        assert [e.type for e in events] == ["start", *["token"] * len(texts), "done"]
        assert "".join(e.fields["text"] for e in events if e.type == "token") == "".join(texts)
        state = reader.status(job)
        assert (state.status, state.tokens) == ("done", len(texts))
        assert publishers[job].tokens == len(texts)


def test_a_redis_that_lost_its_scripts_gets_them_again_mid_stream(
    setup: tuple[redis.Redis, Flusher, Client], prefix: str
) -> None:
    client, flusher, reader = setup
    publisher = _claimed(client, prefix, "noscript", flusher=flusher)
    for n in range(50):
        publisher.token(f"{n} ")
    publisher.sync()
    client.script_flush()  # what a Redis restart does to the script cache
    for n in range(50, 100):
        publisher.token(f"{n} ")
    publisher.finish(EventType.DONE)
    assert reader.subscribe("noscript").text(timeout=10) == "".join(f"{n} " for n in range(100))


def test_a_stream_whose_job_was_taken_over_is_fenced_and_told(
    setup: tuple[redis.Redis, Flusher, Client], prefix: str
) -> None:
    client, flusher, _ = setup
    signals: list[str] = []
    publisher = _claimed(client, prefix, "fenced", flusher=flusher, on_signal=signals.append)
    publisher.token("mine ")
    publisher.sync()
    client.hset(Keys(prefix).state("fenced"), "owner", "someone-else")  # another attempt
    publisher.token("not published")
    publisher.flush()
    deadline = time.monotonic() + 10
    while not signals and time.monotonic() < deadline:
        time.sleep(0.01)
    assert signals == ["fenced"]
    with pytest.raises(Fenced):
        publisher.flush()
    log = client.xrange(Keys(prefix).log("fenced"))
    assert [fields[b"e"].count(b'"text"') for _, fields in log] == [1]
    assert publisher.tokens == 1  # the refused batch is not counted as published


def test_a_cancel_request_reaches_the_stream_through_the_publish_reply(
    setup: tuple[redis.Redis, Flusher, Client], prefix: str
) -> None:
    client, flusher, reader = setup
    signals: list[str] = []
    publisher = _claimed(client, prefix, "cancel", flusher=flusher, on_signal=signals.append)
    publisher.token("a ")
    publisher.sync()
    assert not publisher.cancel_requested
    client.hset(Keys(prefix).state("cancel"), "cancel", 1)
    publisher.token("b ")
    publisher.sync()
    assert publisher.cancel_requested and signals == ["cancelled"]
    publisher.finish(EventType.CANCELLED)
    events = list(reader.subscribe("cancel").events(timeout=10))
    assert [e.type for e in events] == ["token", "token", "cancelled"]
    assert reader.status("cancel").status == "cancelled"


def test_more_dirty_jobs_than_one_call_takes_each_get_their_own_reply(
    setup: tuple[redis.Redis, Flusher, Client], prefix: str
) -> None:
    """150 jobs dirty at once go out as three ``PUBLISH_MANY`` calls in one write: Redis holds
    the flusher's first call (``CLIENT PAUSE``) while every job buffers and submits."""
    client, flusher, reader = setup
    pilot = _claimed(client, prefix, "pilot", flusher=flusher)
    jobs = {f"many{i}": [f"{i}.{n} " for n in range(3)] for i in range(150)}
    publishers = {job: _claimed(client, prefix, job, flusher=flusher) for job in jobs}
    client.client_pause(300, all=False)  # scripts wait; the test's reads don't
    pilot.token("first ")
    pilot.flush()
    time.sleep(0.05)  # the flusher waits on Redis with the pilot's call
    for job, texts in jobs.items():
        for text in texts:
            publishers[job].token(text)
        publishers[job].flush()
    for job in jobs:
        publishers[job].finish(EventType.DONE, finish_reason="length")
    pilot.finish(EventType.DONE)
    for job, texts in jobs.items():
        assert reader.subscribe(job).text(timeout=10) == "".join(texts)
        assert reader.status(job).tokens == 3
        assert publishers[job].tokens == 3


def test_a_job_whose_keys_redis_refuses_fails_alone(
    setup: tuple[redis.Redis, Flusher, Client], prefix: str
) -> None:
    """``PUBLISH_MANY`` answers each job on its own: a job whose log key holds a string (XADD
    fails) gets Redis's error, the jobs before and after it in the same call are published."""
    client, _, reader = setup
    keys = Keys(prefix)
    names = ["before", "broken", "after"]
    for name in names:
        _claimed(client, prefix, name)
    client.set(keys.log("broken"), "not a stream", ex=60)
    script = client.register_script(scripts.PUBLISH_MANY)
    args: list[object] = []
    for name in names:
        job_args = [f"test:{name}", 60_000, "PUBLISH", 60, 1, 0, 0, f'{{"seq":0,"text":"{name}"}}']
        args += [4, len(job_args), *job_args]
    replies = script(keys=[k for name in names for k in keys.job_keys(name)], args=args)
    assert replies[0] == 0 and replies[2] == 0
    assert isinstance(replies[1], redis.ResponseError) and "WRONGTYPE" in str(replies[1])
    for name in ("before", "after"):
        assert client.xlen(keys.log(name)) == 1
        assert reader.status(name).tokens == 1


def test_a_job_redis_refuses_fails_its_stream_and_no_other(
    setup: tuple[redis.Redis, Flusher, Client], prefix: str
) -> None:
    client, flusher, reader = setup
    keys = Keys(prefix)
    publishers = {name: _claimed(client, prefix, name, flusher=flusher) for name in ("ok", "bad")}
    client.set(keys.log("bad"), "not a stream", ex=60)
    for publisher in publishers.values():
        publisher.token("one ")
        publisher.flush()
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        publishers["bad"].sync()
    publishers["ok"].token("two ")
    publishers["ok"].finish(EventType.DONE)
    assert reader.subscribe("ok").text(timeout=10) == "one two "

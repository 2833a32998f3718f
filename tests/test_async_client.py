"""The asyncio client: the same guarantees as the blocking one, over one multiplexed pub/sub
connection however many jobs it reads."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from producer import AsyncClient, EventType, JobFailedError, aio
from producer.aio import _Listener, _Live
from producer.mock_upstream import generate
from producer.protocol import LOG_FIELD, Event, Keys, encode, log_entry_id, make_event
from producer.reading import Published
from tests.conftest import Fleet, marker
from tests.test_pipeline import assert_well_formed, token_text


def run(fleet: Fleet, body: Callable[[AsyncClient], Awaitable[Any]], **options: Any) -> Any:
    async def main() -> Any:
        async with AsyncClient(settings=fleet.settings, **options) as client:
            return await asyncio.wait_for(body(client), 60)

    return asyncio.run(main())


def test_submit_and_follow(fleet: Fleet) -> None:
    prompt = marker("async")

    async def body(client: AsyncClient) -> list[Event]:
        job = await client.submit(prompt, max_tokens=30, follow=True)
        events = [event async for event in job.events(timeout=30)]
        assert await job.text() == "".join(generate(prompt, 30)[0])  # a second, late read
        state = await client.status(job.id)
        assert state.tokens == 30
        return events

    events = run(fleet, body)
    assert_well_formed(events, events[0].job)
    assert token_text(events) == "".join(generate(prompt, 30)[0])


def pubsub_connections(port: int) -> int:
    r = redis.Redis(port=port)
    try:
        return len(r.client_list(_type="pubsub"))
    finally:
        r.close()


def test_many_readers_share_one_pubsub_connection(fleet: Fleet, redis_server: Any) -> None:
    before = pubsub_connections(redis_server.port)
    prompts = [marker(f"mux{i}") for i in range(8)]

    async def body(client: AsyncClient) -> list[str]:
        jobs = [await client.submit(p, model="mock?delay_ms=20", max_tokens=25) for p in prompts]
        # Four readers per job, 32 in all.
        readers = [client.subscribe(job.id) for job in jobs for _ in range(4)]
        subscribed = await asyncio.gather(*readers)
        tasks = [asyncio.create_task(job.text(timeout=30)) for job in subscribed]
        await asyncio.sleep(0.3)
        during = pubsub_connections(redis_server.port)
        assert during == before + 1, f"{during - before} pub/sub connections for 32 readers"
        assert client.multiplexer.channels == 8
        return list(await asyncio.gather(*tasks))

    texts = run(fleet, body)
    for i, prompt in enumerate(prompts):
        expected = "".join(generate(prompt, 25)[0])
        assert texts[4 * i : 4 * i + 4] == [expected] * 4


def test_a_slow_reader_falls_back_to_the_log_and_loses_nothing(fleet: Fleet) -> None:
    prompt = marker("slow")

    async def body(client: AsyncClient) -> tuple[list[Event], int]:
        job = await client.submit(prompt, model="mock?delay_ms=0", max_tokens=400, follow=True)
        events = []
        async for event in job.events(timeout=60):
            events.append(event)
            await asyncio.sleep(0.002)  # far slower than the upstream
        return events, client.multiplexer.stats["overflows"]

    events, overflows = run(fleet, body, buffer=8)
    assert overflows >= 1, "the reader should have overrun its live buffer"
    assert_well_formed(events, events[0].job)
    assert token_text(events) == "".join(generate(prompt, 400)[0])


def test_a_killed_pubsub_connection_is_healed_from_the_log(fleet: Fleet, redis_server: Any) -> None:
    prompt = marker("killed")

    async def body(client: AsyncClient) -> tuple[list[Event], int]:
        job = await client.submit(prompt, model="mock?delay_ms=20", max_tokens=60, follow=True)
        events = []
        async for event in job.events(timeout=30):
            events.append(event)
            if event.seq == 10:
                admin = redis.Redis(port=redis_server.port)
                killed = admin.client_kill_filter(_type="pubsub", skipme=True)
                admin.close()
                assert killed >= 1
        stats = client.multiplexer.stats
        return events, stats["reconnects"] + stats["resubscribes"]

    events, reconnects = run(fleet, body)
    assert reconnects >= 1
    assert_well_formed(events, events[0].job)
    assert token_text(events) == "".join(generate(prompt, 60)[0])


def test_errors_and_cancel_raise_job_failed(fleet: Fleet) -> None:
    async def body(client: AsyncClient) -> None:
        job = await client.submit(marker("aerr"), model="mock?error_after=2", follow=True)
        try:
            await job.text(timeout=30)
        except JobFailedError as exc:
            assert exc.event.fields["code"] == "upstream_error"
            assert len(exc.partial_text) > 0
        else:
            raise AssertionError("no JobFailedError")
        job = await client.submit(
            marker("acancel"), model="mock?delay_ms=50", max_tokens=200, follow=True
        )
        async for event in job.events(timeout=30):
            if event.type is EventType.TOKEN:
                await job.cancel()
        assert event.type is EventType.CANCELLED

    run(fleet, body)


def test_a_burst_reaches_every_reader_whole_in_order_with_its_bytes(fleet: Fleet) -> None:
    prompt = marker("burst")

    async def body(client: AsyncClient) -> tuple[list[Event], list[Published]]:
        job = await client.submit(prompt, model="mock?delay_ms=0", max_tokens=1000, follow=True)
        other = await client.subscribe(job.id)  # a second reader, sharing the live messages

        async def read_other() -> list[Published]:
            items: list[Published] = []
            try:
                while not other.done:
                    items += await other.next_events()
            finally:
                await other.close()
            return items

        task = asyncio.create_task(read_other())
        events = [event async for event in job.events(timeout=60)]
        return events, await task

    events, items = run(fleet, body)
    assert_well_formed(events, events[0].job)
    assert token_text(events) == "".join(generate(prompt, 1000)[0])
    assert [item.event for item in items] == events
    assert all(item.data == encode(item.event) for item in items)


def _hand_made_job(admin: redis.Redis, keys: Keys, tag: str, *texts: str) -> list[Event]:
    """A job no worker runs: its state says running; the test writes its events (returned)."""
    job_id = f"{tag}-{secrets.token_hex(4)}"
    admin.hset(keys.state(job_id), "status", "running")
    admin.expire(keys.state(job_id), 60)
    tokens = [make_event(job_id, n, EventType.TOKEN, text=text) for n, text in enumerate(texts, 1)]
    return [
        make_event(job_id, 0, EventType.START, attempt=1),
        *tokens,
        make_event(job_id, len(texts) + 1, EventType.DONE, finish_reason="stop"),
    ]


def _write(admin: redis.Redis, keys: Keys, event: Event, *, live: bool) -> None:
    """Put an event in its job's log and, when ``live``, on its channel too."""
    data = encode(event)
    admin.xadd(keys.log(event.job), {LOG_FIELD: data}, id=log_entry_id(event.seq))
    admin.expire(keys.log(event.job), 60)
    if live:
        admin.publish(keys.channel(event.job), data)


def test_events_the_channel_lost_come_from_the_log(fleet: Fleet, redis_server: Any) -> None:
    """Events only in the log reach the reader by its idle poll; a message on the channel that
    is not an event makes it read the log at once."""
    keys = Keys(fleet.settings.prefix)
    admin = redis.Redis(port=redis_server.port)
    written = _hand_made_job(admin, keys, "hand", "only in the log", " and this")
    job_id = written[0].job

    def log_only(event: Event) -> None:
        _write(admin, keys, event, live=False)

    log_only(written[0])

    async def write() -> None:
        await asyncio.sleep(0.3)
        log_only(written[1])  # found by the poll
        await asyncio.sleep(1.5)
        log_only(written[2])
        log_only(written[3])
        admin.publish(keys.channel(job_id), b"not an event")  # read the log now

    async def body(client: AsyncClient) -> list[Event]:
        job = await client.subscribe(job_id)
        writer = asyncio.create_task(write())
        events = [event async for event in job.events(timeout=20)]
        await writer
        return events

    try:
        assert run(fleet, body) == written
    finally:
        admin.close()


def test_events_published_while_the_subscription_was_down_arrive_once_it_is_back(
    fleet: Fleet, redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killing the reader's pub/sub connection loses the messages published until it has
    subscribed again; the reader catches up from the log as soon as it has, not at its next
    idle poll (made longer than the test here)."""
    monkeypatch.setattr(aio, "IDLE_POLL", 600.0)
    keys = Keys(fleet.settings.prefix)
    name = "reader-" + secrets.token_hex(3)
    admin = redis.Redis(port=redis_server.port)
    written = _hand_made_job(admin, keys, "kill", "before ", "while it was down")
    job_id = written[0].job

    def publish(event: Event) -> None:
        _write(admin, keys, event, live=True)

    publish(written[0])

    async def body(client: AsyncClient) -> list[Event]:
        job = await client.subscribe(job_id)
        events: list[Event] = []

        async def read() -> None:
            async for event in job.events():  # no deadline: its end would read the log too
                events.append(event)

        reader = asyncio.create_task(read())
        publish(written[1])
        while len(events) < 2:
            await asyncio.sleep(0.01)
        (ours,) = [
            c for c in admin.client_list() if c.get("name") == name and "P" in c.get("flags", "")
        ]
        admin.client_kill_filter(_id=ours["id"])
        for event in written[2:]:
            publish(event)  # nobody subscribed: only the log has these
        async with asyncio.timeout(20):  # far below IDLE_POLL
            await reader
        return events

    try:
        assert run(fleet, body, client_name=name) == written
    finally:
        admin.close()


def test_live_messages_that_arrive_together_all_reach_their_readers(
    fleet: Fleet, redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of messages on the channel (never logged, so only the live path has them)
    reaches the job's reader whole and in order: the multiplexer hands on every reply already
    read off the socket. A second job subscribed between two bursts is confirmed and read too.
    (The idle poll is made longer than the test.)"""
    monkeypatch.setattr(aio, "IDLE_POLL", 600.0)
    keys = Keys(fleet.settings.prefix)
    admin = redis.Redis(port=redis_server.port)
    written = _hand_made_job(admin, keys, "burst", *(f"<{n}>" for n in range(600)))
    later = _hand_made_job(admin, keys, "later", "second")
    job_id, later_id = written[0].job, later[0].job
    _write(admin, keys, written[0], live=False)
    for event in later:
        _write(admin, keys, event, live=False)

    async def body(client: AsyncClient) -> tuple[list[Event], list[Event]]:
        job = await client.subscribe(job_id)
        assert [item.event for item in await job.next_events()] == written[:1]
        pipe = admin.pipeline(transaction=False)
        for event in written[1:301]:
            pipe.publish(keys.channel(job_id), encode(event))
        pipe.execute()
        async with asyncio.timeout(5):  # subscribe waits up to 10 s for its confirmation
            second = await client.subscribe(later_id)  # confirmed behind the first 300
        pipe = admin.pipeline(transaction=False)
        for event in written[301:]:
            pipe.publish(keys.channel(job_id), encode(event))
        pipe.execute()
        async with asyncio.timeout(20):  # far below IDLE_POLL
            events = written[:1] + [event async for event in job.events()]
            return events, [event async for event in second.events()]

    try:
        events, second = run(fleet, body)
    finally:
        admin.close()
    assert events == written
    assert second == later


def test_a_listener_waits_for_an_offer_or_its_time_and_marks_overflow() -> None:
    event = make_event("j", 0, EventType.START, attempt=1)
    item = _Live(encode(event))
    assert item.published == Published(event, encode(event))
    assert _Live(b"not an event").published is None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stats = {"overflows": 0}
        listener = _Listener(2, stats, loop)
        assert not await listener.wait(0)
        assert not await listener.wait(0.05)  # nothing came
        for _ in range(50):  # each wait ends with the offer, not its time
            loop.call_soon(listener.offer, item)
            assert await listener.wait(30)
            assert listener.drain() == [item]
        # The timer armed for a short wait that an offer ended is moved on for the next, longer
        # wait: that one ends at its own time, not the earlier one.
        loop.call_soon(listener.offer, item)
        assert await listener.wait(0.05)
        listener.drain()
        began = loop.time()
        assert not await listener.wait(0.3)
        assert loop.time() - began >= 0.29
        # Past its size the buffer is dropped for one gap mark; nothing is taken until drained.
        for _ in range(3):
            listener.offer(item)
        listener.offer(item)
        assert stats["overflows"] == 1
        assert await listener.wait(1)
        assert listener.drain() == [None]
        listener.offer(item)
        assert listener.drain() == [item]
        listener.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_reader_that_stopped_iterating_closes_quietly_with_its_client(
    fleet: Fleet, redis_server: Any
) -> None:
    """``break`` at the terminal event leaves ``events()`` suspended; asyncio finalizes it later
    in a task of its own, often while the client is closing (the end of ``async with``) or after.
    Its unsubscribe must then neither fail (asyncio would log an error nobody can catch) nor
    open a connection again."""
    prompt = marker("break")
    name = "break-" + secrets.token_hex(4)

    async def main() -> tuple[list[str], int]:
        async with AsyncClient(settings=fleet.settings, client_name=name) as client:
            job = await client.submit(prompt, max_tokens=5, follow=True)
            events, late = job.events(timeout=30), (await client.submit(prompt, max_tokens=5))
            texts = []
            async for event in events:
                if event.terminal:
                    break
                texts.append(event.text)
            late_events = late.events(timeout=30)
            await anext(late_events)  # subscribed, suspended
            # What the loop's finalizer does with a dropped generator: close it in a task.
            finalizing = asyncio.ensure_future(events.aclose())  # type: ignore[attr-defined]
        await finalizing
        await late_events.aclose()  # type: ignore[attr-defined]  # after the close
        r = redis.Redis(port=redis_server.port)
        try:
            return texts, sum(1 for c in r.client_list() if c["name"] == name)
        finally:
            r.close()

    texts, connections = asyncio.run(asyncio.wait_for(main(), 60))
    assert "".join(texts) == "".join(generate(prompt, 5)[0])
    assert connections == 0

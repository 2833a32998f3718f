"""The core end-to-end test with RabbitMQ as the broker: Celery messages go through RabbitMQ,
events still through Redis.

It runs where a RabbitMQ server answers on 127.0.0.1:5672 with the default ``guest`` account
(CI's machine has one) and is skipped, saying why, only where nothing listens there or the guest
login is refused. The worker runs under a key prefix of its own, so its queue (``PREFIX.jobs``)
is its own too; the queue and its exchange are deleted at the end.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import Client, EventType, Status
from producer.devservers import RedisServer, start_worker, wait_worker_ready
from producer.mock_upstream import generate
from producer.protocol import Event, Keys
from producer.settings import Settings
from tests.conftest import Fleet, Mock, marker
from tests.test_pipeline import assert_well_formed, token_text

AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
AMQP_URL = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}//"


def rabbitmq_or_skip() -> None:
    """Skip unless RabbitMQ listens on 127.0.0.1:5672 and lets ``guest`` in."""
    try:
        socket.create_connection((AMQP_HOST, AMQP_PORT), timeout=2).close()
    except OSError as exc:
        pytest.skip(f"no RabbitMQ: nothing listens on {AMQP_HOST}:{AMQP_PORT} ({exc})")
    import amqp.exceptions
    import kombu

    with kombu.Connection(AMQP_URL, connect_timeout=5) as connection:
        try:
            connection.ensure_connection(max_retries=1)
        except amqp.exceptions.AccessRefused as exc:
            pytest.skip(f"RabbitMQ on {AMQP_HOST}:{AMQP_PORT} refused the guest login ({exc})")


def delete_queue(queue: str) -> None:
    """Remove the worker's queue and the direct exchange Celery declared for it."""
    import kombu

    with kombu.Connection(AMQP_URL, connect_timeout=5) as connection:
        channel = connection.default_channel
        channel.queue_delete(queue)
        channel.exchange_delete(queue)


def queue_depth(queue: str) -> int:
    """Messages ready in the queue (a passive declare fails if the queue does not exist)."""
    import kombu

    with kombu.Connection(AMQP_URL, connect_timeout=5) as connection:
        declared = connection.default_channel.queue_declare(queue, passive=True)
        return int(declared.message_count)


@pytest.fixture(scope="module")
def rabbit(redis_server: RedisServer, mock: Mock, api_key: str, run_dir: Path) -> Iterator[Fleet]:
    rabbitmq_or_skip()
    prefix = "trrabbit" + secrets.token_hex(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env.pop("TOGETHER_API_KEY", None)
    env.update(
        TOKENRELAY_REDIS_URL=redis_server.url,
        TOKENRELAY_BROKER_URL=AMQP_URL,
        TOKENRELAY_PREFIX=prefix,
        TOKENRELAY_UPSTREAM_URL=mock.url,
        TOKENRELAY_UPSTREAM_API_KEY=api_key,
        TOKENRELAY_UPSTREAM_DIALECT="together",
        TOKENRELAY_DEFAULT_MODEL="mock",
        TOKENRELAY_UPSTREAM_READ_TIMEOUT="5",
        TOKENRELAY_UPSTREAM_CONNECT_TIMEOUT="2",
        TOKENRELAY_METRICS_PORT="0",
    )
    process = start_worker(
        env, concurrency=20, name="rabbit@%h", log_path=run_dir / "worker-rabbit.log"
    )
    try:
        wait_worker_ready(process)
        yield Fleet("rabbit", env, process)
    finally:
        process.stop()
        delete_queue(Keys(prefix).queue)


@pytest.fixture()
def rclient(rabbit: Fleet) -> Iterator[Client]:
    with Client(settings=Settings.from_env(rabbit.env)) as client:
        yield client


def test_the_worker_takes_its_jobs_from_rabbitmq(rabbit: Fleet, rclient: Client) -> None:
    assert rclient.settings.broker_url.startswith("amqp://")
    assert "Connected to amqp://" in rabbit.log()  # Celery names the broker it joined
    assert queue_depth(rclient.keys.queue) == 0  # the worker's queue exists in RabbitMQ
    prompt = marker("rabbit-where")
    assert rclient.submit(prompt=prompt, max_tokens=5).text(timeout=30) == "".join(
        generate(prompt, 5)[0]
    )
    # Redis holds the events, not the queue: no kombu list or binding under this prefix.
    assert not rclient.redis.exists(rclient.keys.queue)
    assert not list(rclient.redis.scan_iter(match=f"_kombu.binding.{rclient.keys.queue}*"))


@pytest.mark.parametrize("dialect", ["together", "openai-completions", "openai-chat"])
def test_each_dialect_end_to_end_through_rabbitmq(rclient: Client, dialect: str) -> None:
    prompt = marker(dialect) + " Alan Turing was"
    job = rclient.submit(prompt=prompt, dialect=dialect, max_tokens=40, follow=True)
    events = list(job.events(timeout=30))

    assert_well_formed(events, job.id)
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.terminal for e in events].count(True) == 1
    assert token_text(events) == "".join(generate(prompt, 40)[0])
    assert job.text(timeout=10) == "".join(generate(prompt, 40)[0])
    done = events[-1]
    assert done.type is EventType.DONE and done.fields["finish_reason"] == "length"
    state = rclient.status(job.id)
    assert state.status is Status.DONE and state.tokens == 40 and state.attempt == 1


def test_many_jobs_at_once_through_rabbitmq(rclient: Client) -> None:
    prompts = [marker(f"rabbit-many-{i}") for i in range(30)]
    jobs = [rclient.submit(prompt=p, model="mock?delay_ms=10", max_tokens=20) for p in prompts]
    for job, prompt in zip(jobs, prompts, strict=True):
        assert job.text(timeout=60) == "".join(generate(prompt, 20)[0])
        events = list(job.events(timeout=10))
        assert_well_formed(events, job.id)
        assert events[-1].type is EventType.DONE
    assert queue_depth(rclient.keys.queue) == 0


def test_cancel_mid_stream_through_rabbitmq(rclient: Client, mock: Mock) -> None:
    prompt = marker("rabbit-cancel")
    job = rclient.submit(prompt=prompt, model="mock?delay_ms=50", max_tokens=500, follow=True)
    events: list[Event] = []
    cancelled_at = None
    for event in job.events(timeout=30):
        events.append(event)
        if event.type is EventType.TOKEN and cancelled_at is None and event.seq == 3:
            cancelled_at = time.monotonic()
            rclient.cancel(job.id)
    assert cancelled_at is not None
    assert events[-1].type is EventType.CANCELLED
    assert time.monotonic() - cancelled_at < 1.0
    assert_well_formed(events, job.id)
    tokens = [e.text for e in events if e.type is EventType.TOKEN]
    assert 3 <= len(tokens) < 500
    assert tokens == generate(prompt, 500)[0][: len(tokens)]
    assert rclient.status(job.id).status is Status.CANCELLED

    deadline = time.monotonic() + 5
    while mock.record(prompt)["state"] != "disconnected":
        assert time.monotonic() < deadline, f"upstream still open: {mock.record(prompt)}"
        time.sleep(0.05)
    time.sleep(0.3)
    # The log ends with the terminal event: nothing was published after it.
    assert len(rclient.redis.xrange(rclient.keys.log(job.id))) == len(events)

"""How a submit reaches the broker. When the broker is the jobs' own Redis, ``CREATE`` queues the
job's message in the call that creates the job: the message must be the one Celery's
``send_task`` would have queued, and a job is never created without it nor queued twice. Any
other broker gets the message through Celery.

No worker reads these tests' queues (their prefixes are their own): what a worker makes of the
message is what every end-to-end test shows, since the session's fleet shares its Redis with
its broker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer import AsyncClient, Client
from producer.client import prepare
from producer.devservers import RedisServer
from producer.settings import Settings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def settings(redis_server: RedisServer) -> Iterator[Settings]:
    prefix = f"trenq{secrets.token_hex(3)}"
    yield Settings.from_env({"TOKENRELAY_REDIS_URL": redis_server.url, "TOKENRELAY_PREFIX": prefix})
    db = redis.Redis.from_url(redis_server.url)
    for pattern in (f"{prefix}*", f"_kombu.binding*.{prefix}.jobs"):
        for key in db.scan_iter(pattern, count=1000):
            db.delete(key)
    db.close()


def _queued(db: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The messages waiting on a Redis broker's queue, oldest first."""
    return [json.loads(raw) for raw in reversed(db.lrange(queue, 0, -1))]


def _without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """A message with what differs from one send to the next taken out: the task's and the
    delivery's fresh ids, the arguments' repr (checked apart), and ``reply_to`` (Celery's
    per-thread id; results are ignored, so nothing is ever sent to it)."""
    headers = {
        k: v for k, v in message["headers"].items() if k not in ("id", "root_id", "kwargsrepr")
    }
    properties = {
        k: v
        for k, v in message["properties"].items()
        if k not in ("correlation_id", "delivery_tag", "reply_to")
    }
    return {**message, "headers": headers, "properties": properties, "body": None}


def test_the_queued_message_is_the_one_send_task_queues(settings: Settings) -> None:
    spec_fields = {"model": "mock", "max_tokens": 7, "stop": ["\n"], "temperature": 0.5}
    with Client(settings=settings) as client:
        client.submit("Grüße, Turing", job_id="enq-script", **spec_fields)
        # The same job once more, through Celery's own send_task.
        spec = json.loads(client.redis.hget(client.keys.state("enq-script"), "spec"))
        client._enqueuer.send("enq-celery", prepare(settings, spec, None)[1])
        ours, celerys = _queued(client.redis, client.keys.queue)

    assert _without_ids(ours) == _without_ids(celerys)
    # Each names its task by id, in every place Celery and kombu look for it.
    for message in (ours, celerys):
        headers, properties = message["headers"], message["properties"]
        assert headers["root_id"] == headers["id"] == properties["correlation_id"]
        assert properties["delivery_tag"] != headers["id"]
    ours_body = json.loads(base64.b64decode(ours["body"]))
    celerys_body = json.loads(base64.b64decode(celerys["body"]))
    assert ours_body == [[], {"job_id": "enq-script", "spec": spec}, celerys_body[2]]
    assert celerys_body[1] == {"job_id": "enq-celery", "spec": spec}
    assert ours["headers"]["task"] == "tokenrelay.stream"
    # The prompt stays out of the headers, which the worker logs on a failure.
    assert ours["headers"]["kwargsrepr"] == "{'job_id': 'enq-script', 'spec': ...}"
    assert celerys["headers"]["kwargsrepr"].startswith("{'job_id': 'enq-celery', 'spec': {")


def test_a_submit_creates_and_queues_in_one_call(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_celery(*_: object) -> None:
        raise AssertionError("the message went through Celery")

    with Client(settings=settings) as client:
        monkeypatch.setattr(client._enqueuer, "send", no_celery)
        job = client.submit("one call", model="mock", max_tokens=3, job_id="enq-once")
        assert client.status(job.id).status == "queued"
        assert [
            m["properties"]["delivery_info"] for m in _queued(client.redis, client.keys.queue)
        ] == [{"exchange": "", "routing_key": client.keys.queue}]
        # Submitting the id again returns the job and queues nothing more.
        assert client.submit("one call", model="mock", max_tokens=3, job_id="enq-once").id == job.id
        assert client.redis.llen(client.keys.queue) == 1

        async def submit_async() -> list[str]:
            async with AsyncClient(settings=settings) as aclient:
                monkeypatch.setattr(aclient._enqueuer, "send", no_celery)
                jobs = [
                    await aclient.submit("async", model="mock", max_tokens=3, job_id=f"enq-a{n}")
                    for n in range(3)
                ]
                await aclient.submit("async", model="mock", max_tokens=3, job_id="enq-a0")
                return [job.id for job in jobs]

        ids = asyncio.run(asyncio.wait_for(submit_async(), 30))
        queued = _queued(client.redis, client.keys.queue)
    assert [json.loads(base64.b64decode(m["body"]))[1]["job_id"] for m in queued] == [
        "enq-once",
        *ids,
    ]


def test_another_broker_gets_the_message_through_celery(
    settings: Settings, redis_server: RedisServer
) -> None:
    broker_url = redis_server.url.removesuffix("/0") + "/2"
    elsewhere = Settings.from_env(
        {
            "TOKENRELAY_REDIS_URL": settings.redis_url,
            "TOKENRELAY_PREFIX": settings.prefix,
            "TOKENRELAY_BROKER_URL": broker_url,
        }
    )
    broker = redis.Redis.from_url(broker_url)
    try:
        with Client(settings=elsewhere) as client:
            job = client.submit("elsewhere", model="mock", max_tokens=3)
            assert not client.redis.exists(client.keys.queue)
            (message,) = _queued(broker, client.keys.queue)
        assert json.loads(base64.b64decode(message["body"]))[1]["job_id"] == job.id
    finally:
        broker.flushdb()
        broker.close()

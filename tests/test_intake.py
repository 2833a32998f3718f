"""How a worker takes jobs. The broker channel (``worker/broker.py``) against a real Redis,
through kombu as Celery drives it: waiting messages are taken together, within the prefetch
limit, and each is recorded as unacknowledged in the same call, so kombu's own recovery hands
them out again; a slot that frees up on a full worker takes the next job at once. And the
task's per-job overhead in a gevent worker."""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from producer import Client
from producer.devservers import RedisServer, start_worker, wait_worker_ready, worker_env
from producer.settings import Settings
from tests.conftest import Mock
from worker.broker import COMMAND_CONNECTIONS, TAKE_AT_ONCE

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def name() -> str:
    return f"brk{secrets.token_hex(3)}"


def _options(name: str, **extra: Any) -> dict[str, Any]:
    # The session's Redis is shared with the test fleet's workers: keep kombu's keys apart.
    return {
        "unacked_key": f"{name}:unacked",
        "unacked_index_key": f"{name}:unacked_index",
        "unacked_mutex_key": f"{name}:unacked_mutex",
        **extra,
    }


def _connect(url: str, name: str, *, ours: bool = True, **extra: Any) -> Connection:
    transport = "worker.broker:Transport" if ours else "redis"
    return Connection(url, transport=transport, transport_options=_options(name, **extra))


@pytest.fixture()
def db(redis_server: RedisServer, name: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    for key in client.scan_iter(f"{name}*", count=1000):
        client.delete(key)
    client.close()


def _publish(url: str, name: str, count: int) -> Queue:
    queue = Queue(name, Exchange(name), routing_key=name)
    with _connect(url, name, ours=False) as conn:
        producer = Producer(conn.channel())
        for n in range(count):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue])
    return queue


class Taker:
    """One consumer on ``queue`` with ``prefetch`` messages at most unacknowledged."""

    def __init__(self, conn: Connection, queue: Queue, prefetch: int) -> None:
        self.conn = conn
        self.messages: list[Any] = []
        channel = conn.channel()
        channel.basic_qos(0, prefetch, False)
        self.consumer = Consumer(
            channel, [queue], callbacks=[lambda _body, m: self.messages.append(m)], accept=["json"]
        )
        self.consumer.consume()

    def read_once(self) -> list[int]:
        """One read of the broker, as one turn of Celery's loop; the new messages' numbers."""
        before = len(self.messages)
        self.conn.drain_events(timeout=5)
        return [m.payload["n"] for m in self.messages[before:]]

    def read_next(self, timeout: float) -> list[int]:
        """Turns of the loop until a message comes (a turn may end on another socket's event);
        ``socket.timeout`` if none came within ``timeout``."""
        before = len(self.messages)
        deadline = time.monotonic() + timeout
        while len(self.messages) == before:
            self.conn.drain_events(timeout=max(0.001, deadline - time.monotonic()))
        return [m.payload["n"] for m in self.messages[before:]]


def test_waiting_messages_are_taken_in_one_read_oldest_first(
    redis_server: RedisServer, db: redis.Redis, name: str
) -> None:
    queue = _publish(redis_server.url, name, 40)
    with _connect(redis_server.url, name) as conn:
        taker = Taker(conn, queue, prefetch=100)
        assert taker.read_once() == list(range(40))  # kombu's own channel: [0]
        assert db.llen(name) == 0
        # All 40 are recorded as unacknowledged until acked.
        assert db.hlen(f"{name}:unacked") == 40
        assert db.zcard(f"{name}:unacked_index") == 40
        for message in taker.messages:
            message.ack()
        assert db.hlen(f"{name}:unacked") == 0
        assert db.zcard(f"{name}:unacked_index") == 0


def test_no_more_than_the_prefetch_limit_and_the_batch_are_taken(
    redis_server: RedisServer, db: redis.Redis, name: str
) -> None:
    queue = _publish(redis_server.url, name, TAKE_AT_ONCE + 20)
    with _connect(redis_server.url, name) as conn:
        taker = Taker(conn, queue, prefetch=5)
        assert taker.read_once() == [0, 1, 2, 3, 4]
        assert db.llen(name) == TAKE_AT_ONCE + 15
        for message in taker.messages:
            message.ack()
    with _connect(redis_server.url, name) as conn:
        taker = Taker(conn, queue, prefetch=1000)
        # One from BRPOP, then at most TAKE_AT_ONCE more.
        assert taker.read_once() == list(range(5, 5 + 1 + TAKE_AT_ONCE))
        for message in taker.messages:
            message.ack()


def test_an_ack_on_a_full_channel_wakes_the_read_waiting_for_credit(
    redis_server: RedisServer, db: redis.Redis, name: str
) -> None:
    """Celery's loop without an event hub (gevent) reads with a two-second timeout; with no
    credit left kombu stops reading the queue, and the read waited out its timeout after a job
    ended. It returns the next message once the ack (here from another thread) is in."""
    queue = _publish(redis_server.url, name, 2)
    with _connect(redis_server.url, name) as conn:
        taker = Taker(conn, queue, prefetch=1)
        assert taker.read_once() == [0]
        acked = threading.Timer(0.2, taker.messages[0].ack)
        acked.start()
        try:
            assert taker.read_next(timeout=10) == [1]  # before: TimeoutError after 10 s
        except TimeoutError:
            pytest.fail("the read waited out its timeout: the ack did not wake it")
        finally:
            acked.join()
        taker.messages[1].ack()
    assert db.llen(name) == 0 and db.hlen(f"{name}:unacked") == 0


def test_a_full_worker_starts_the_next_job_as_soon_as_one_ends(
    redis_server: RedisServer, mock: Mock, api_key: str, tmp_path: Path, name: str
) -> None:
    """Two slots, eight jobs of about 0.1 s queued at once: each job waiting for a slot starts
    when one frees up, not at the end of the consumer's two-second wait."""
    env = worker_env(redis_server.url, name, upstream_url=mock.url, upstream_api_key=api_key)
    worker = start_worker(env, concurrency=2, name=f"{name}@%h", log_path=tmp_path / "w.log")
    try:
        wait_worker_ready(worker)
        with Client(settings=Settings.from_env(env)) as client:
            jobs = [
                client.submit(f"slots {n}", model="mock?delay_ms=50", max_tokens=2)
                for n in range(8)
            ]
            for job in jobs:
                job.text(timeout=30)
            states = [job.status() for job in jobs]
    finally:
        worker.stop()
    finished = sorted(state.finished for state in states)
    # Job k (from the third on) starts once job k-2 has ended: how long its slot stood free.
    idle = [state.started - finished[k] for k, state in enumerate(
        sorted(states, key=lambda state: state.started)[2:])]  # fmt: skip
    assert max(idle) < 1.0, f"a free slot waited {max(idle):.2f} s for the next job"  # was ~1.9


def test_messages_taken_by_a_worker_that_died_are_handed_out_again(
    redis_server: RedisServer, db: redis.Redis, name: str
) -> None:
    queue = _publish(redis_server.url, name, 12)
    dead = _connect(redis_server.url, name)
    try:
        taker = Taker(dead, queue, prefetch=100)
        assert taker.read_once() == list(range(12))
        # The worker dies without acking or closing. kombu's own transport (another worker)
        # finds the messages once their visibility timeout has passed and requeues them.
        time.sleep(0.05)
        with _connect(redis_server.url, name, ours=False, visibility_timeout=0.01) as conn:
            conn.channel().qos.restore_visible(num=100, interval=1)
            assert db.llen(name) == 12
            again = Taker(conn, queue, prefetch=1)
            numbers = []
            for _ in range(12):
                numbers += again.read_once()
                again.messages[-1].ack()
            assert sorted(numbers) == list(range(12))
            assert all(m.delivery_info.get("redelivered") for m in again.messages)
        assert db.hlen(f"{name}:unacked") == 0
    finally:
        dead.release()


def test_a_graceful_stop_puts_unstarted_messages_back(
    redis_server: RedisServer, db: redis.Redis, name: str
) -> None:
    queue = _publish(redis_server.url, name, 10)
    with _connect(redis_server.url, name) as conn:
        taker = Taker(conn, queue, prefetch=100)
        assert taker.read_once() == list(range(10))
        for message in taker.messages[:3]:
            message.ack()
    # Closing the channel restores what was delivered but not acked, as kombu always has.
    assert db.llen(name) == 7
    assert db.hlen(f"{name}:unacked") == 0


# Hundreds of jobs of a gevent worker that end together acknowledge at once, each from its own
# greenlet. Prints the Redis server's client count after the acks (the pool keeps what it
# opened), then what is left unacknowledged and queued.
_ACKS_AT_ONCE = """
from gevent import monkey
monkey.patch_all()
import sys
import gevent, redis
from tests.test_intake import Taker, _connect, _publish
url, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
queue = _publish(url, name, count)
db = redis.Redis.from_url(url)
# The worker's transport options allow a large pool (worker/app.py).
with _connect(url, name, max_connections=1024) as conn:
    taker = Taker(conn, queue, prefetch=count)
    for _ in range(count):
        if len(taker.messages) == count:
            break
        taker.read_once()
    gevent.joinall([gevent.spawn(message.ack) for message in taker.messages], raise_error=True)
    print(len(taker.messages), db.info("clients")["connected_clients"])
print(db.hlen(name + ":unacked"), db.llen(name))
"""


def test_acks_from_hundreds_of_greenlets_share_a_few_connections(tmp_path: Path, name: str) -> None:
    # A Redis of its own: its client count is this test's alone.
    server = RedisServer(directory=tmp_path).start()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _ACKS_AT_ONCE, server.url, name, "300"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=45,
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    (taken, clients), (unacked, queued) = (
        map(int, line.split()) for line in done.stdout.split("\n")[:2]
    )
    assert (taken, unacked, queued) == (300, 0, 0)
    # The pooled command connections, the consumer's BRPOP connection and the test's own.
    assert clients <= COMMAND_CONNECTIONS + 2


# In a gevent worker (the standard library patched first, as Celery's gevent pool does), every
# job runs in a greenlet of its own.
_BACKENDS_PER_GREENLET = """
from gevent import monkey
monkey.patch_all()
import gevent
from worker.tasks import stream
seen = []
gevent.joinall([gevent.spawn(lambda: seen.append(stream.backend)) for _ in range(5)])
print(len(seen), len({id(backend) for backend in seen}))
"""


def test_jobs_in_a_gevent_worker_share_one_result_backend(
    redis_server: RedisServer, name: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _BACKENDS_PER_GREENLET],
        env=worker_env(redis_server.url, name),
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.split() == ["5", "1"]

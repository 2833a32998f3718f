"""Connection pools against a real Redis: a worker's streams share a bounded pool and wait for a
free connection instead of failing, however many run at once."""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis

from producer.connection import sync_redis
from producer.devservers import RedisServer


def _at_once(work: Callable[[], None], count: int) -> None:
    """Run ``work`` on ``count`` threads at once; wait for them (30 s each at most)."""
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


def test_a_blocking_pool_makes_commands_wait_for_a_connection(redis_server: RedisServer) -> None:
    client = sync_redis(redis_server.url, max_connections=2, blocking=True)
    errors: list[BaseException] = []
    done: list[object] = []

    def slow_command() -> None:
        try:
            done.append(client.blpop(["tokenrelay-test-nothing"], timeout=0.2))
        except BaseException as exc:
            errors.append(exc)

    _at_once(slow_command, 12)
    client.close()
    assert errors == [] and len(done) == 12
    assert client.connection_pool.max_connections == 2


def test_redis_pys_default_pool_would_have_failed(redis_server: RedisServer) -> None:
    """The failure the blocking pool prevents: a plain pool past its limit raises."""
    client = redis.Redis.from_url(redis_server.url, max_connections=2)
    errors: list[BaseException] = []

    def slow_command() -> None:
        try:
            client.blpop(["tokenrelay-test-nothing"], timeout=0.2)
        except redis.exceptions.ConnectionError as exc:
            errors.append(exc)

    _at_once(slow_command, 12)
    client.close()
    assert errors and "Too many connections" in str(errors[0])


def test_a_small_read_buffer_still_reads_replies_larger_than_itself(
    redis_server: RedisServer,
) -> None:
    """A worker's connections read in 8 KiB; a reply many times that arrives whole."""
    client = sync_redis(redis_server.url, max_connections=2, blocking=True, read_size=8 * 1024)
    key = "tokenrelay-test-read-size"
    value = bytes(range(256)) * 800  # 200 KiB, every byte value
    try:
        client.set(key, value)
        assert client.get(key) == value
        client.delete(key)
        client.rpush(key, *(f"item {n}".encode() * 20 for n in range(2000)))
        assert client.lrange(key, 0, -1) == [f"item {n}".encode() * 20 for n in range(2000)]
        connection = client.connection_pool.get_connection()
        assert connection._parser.socket_read_size == 8 * 1024  # the size asked for is used
        client.connection_pool.release(connection)
    finally:
        client.delete(key)
        client.close()

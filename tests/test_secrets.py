"""The upstream API key reaches the upstream and nowhere else: not Redis, events or logs."""

from __future__ import annotations

from pathlib import Path

import redis

from producer import Client, EventType
from producer.devservers import RedisServer
from producer.protocol import encode
from tests.conftest import Fleet, Mock, marker


def every_redis_byte(server: RedisServer) -> bytes:
    """Every key name and value in the server, whatever its type."""
    r = redis.Redis(port=server.port)
    chunks: list[bytes] = []
    try:
        for key in r.scan_iter(count=1000):
            chunks.append(key)
            kind = r.type(key)
            if kind == b"string":
                chunks.append(r.get(key) or b"")
            elif kind == b"hash":
                for field, value in r.hgetall(key).items():
                    chunks += [field, value]
            elif kind == b"list":
                chunks += r.lrange(key, 0, -1)
            elif kind == b"set":
                chunks += list(r.smembers(key))
            elif kind == b"zset":
                chunks += [member for member, _ in r.zrange(key, 0, -1, withscores=True)]
            elif kind == b"stream":
                for _id, values in r.xrange(key):
                    for field, value in values.items():
                        chunks += [field, value]
    finally:
        r.close()
    return b"\n".join(chunks)


def test_the_api_key_never_leaves_the_worker_except_to_the_upstream(
    client: Client,
    fleet: Fleet,
    mock: Mock,
    api_key: str,
    redis_server: RedisServer,
    run_dir: Path,
) -> None:
    events = []
    # Jobs that pass through every path that writes: each dialect, an upstream refusal that
    # echoes request details, a cancel; one is still queued (its message is in the broker).
    for dialect in ("together", "openai-completions", "openai-chat", "tgi", "ollama"):
        events += client.submit(
            prompt=marker("key"), dialect=dialect, max_tokens=4, follow=True
        ).events(timeout=30)
    events += client.submit(prompt=marker("key"), model="mock?status=401", follow=True).events(30)
    cancelled = client.submit(
        prompt=marker("key"), model="mock?delay_ms=50", max_tokens=100, follow=True
    )
    for event in cancelled.events(timeout=30):
        events.append(event)
        if event.type is EventType.TOKEN:
            client.cancel(cancelled.id)
    with Client(settings=fleet.settings, prefix="trqueued") as idle:
        queued = idle.submit(prompt=marker("key"))

    # The key was really in use: the mock upstream refuses requests without it.
    requests_seen = mock.stats()
    assert requests_seen and all(r["authorized"] for r in requests_seen)

    secret = api_key.encode()
    published = b"".join(encode(e) for e in events)
    assert b"mock upstream" in published or b"401" in published
    assert secret[-16:] not in published
    stored = every_redis_byte(redis_server)
    # The scan saw the jobs' logs and states, and the message still waiting in the broker.
    assert client.keys.log(cancelled.id).encode() in stored
    assert b'"job_id": "' + queued.id.encode() in stored or queued.id.encode() in stored
    assert secret not in stored
    assert secret[-16:] not in stored, "not even a fragment of the key"
    for log in run_dir.glob("*.log"):
        assert secret[-16:] not in log.read_bytes(), f"the key leaked into {log.name}"
    assert (run_dir / "worker-main.log").stat().st_size > 0

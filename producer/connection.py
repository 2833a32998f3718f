"""Redis clients with the retry policy every tokenrelay process shares.

A dropped connection is retried with exponential backoff and jitter for about half a minute, so
a Redis restart or a killed connection costs a pause, not a job. Commands that are retried are
idempotent by construction (the scripts skip seqs already published).
"""

from __future__ import annotations

from typing import Any, Final

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

RETRIES: Final = 25
#: Connections per cluster node at most for an asyncio client (see ``async_redis``).
ASYNC_CLUSTER_CONNECTIONS: Final = 1024
_RETRY_ON: Final = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]


def _options(max_connections: int | None) -> dict[str, Any]:
    return {
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), RETRIES),
        "retry_on_error": list(_RETRY_ON),
        "health_check_interval": 30,
        "socket_keepalive": True,
        "max_connections": max_connections,
    }


def reply_text(value: Any) -> str:
    """A Redis reply (bytes from a client without decoding) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


_CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster(url: str) -> bool:
    """``redis+cluster://`` (or ``rediss+cluster://``) names a Redis Cluster."""
    return url.split("://", 1)[0] in _CLUSTER_SCHEMES


def publish_command(url: str) -> str:
    """Sharded pub/sub on a cluster (a channel lives on its slot's shard), else PUBLISH."""
    return "SPUBLISH" if is_cluster(url) else "PUBLISH"


def _plain(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{_CLUSTER_SCHEMES[scheme]}://{rest}"


#: redis-py's own default pool raises MaxConnectionsError past 100 connections at once.
DEFAULT_MAX_CONNECTIONS: Final = 10_000


def sync_redis(
    url: str,
    *,
    max_connections: int | None = None,
    blocking: bool = False,
    read_size: int | None = None,
) -> Any:
    """A blocking client (cooperative under gevent) for ``url``: ``redis.Redis`` or, for a
    ``redis+cluster://`` URL, ``redis.cluster.RedisCluster``.

    With ``blocking`` the pool holds at most ``max_connections`` and a command waits for a free
    one (a worker's hundreds of streams share a few connections); otherwise the pool grows to
    ``max_connections`` (default 10,000: one per open subscription) and fails beyond it.
    ``read_size`` is each connection's read buffer (redis-py's default is 32 KiB, allocated and
    zeroed per connection): smaller for a client whose replies are small.
    """
    sized = {"socket_read_size": read_size} if read_size else {}
    if is_cluster(url):
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(
            _plain(url), socket_keepalive=True, max_connections=max_connections or 1000, **sized
        )
    options = _options(max_connections or DEFAULT_MAX_CONNECTIONS) | sized
    if blocking:
        pool = redis.BlockingConnectionPool.from_url(url, timeout=30, **options)
        return redis.Redis(connection_pool=pool, retry=options["retry"])
    return redis.Redis.from_url(url, **options)


def async_redis(
    url: str, *, max_connections: int | None = None, client_name: str | None = None
) -> redis.asyncio.Redis:
    """An asyncio client for ``url``.

    With ``max_connections`` the pool is a blocking one: a command waits for a free connection
    instead of opening another, so a busy process holds a fixed number of connections. Not on a
    cluster: redis-py's asyncio cluster client cannot wait for a connection (past its per-node
    limit a command fails with ``MaxConnectionsError``), so there each node's pool opens what
    the commands in flight need, up to ``ASYNC_CLUSTER_CONNECTIONS``.
    """
    if is_cluster(url):
        from redis.asyncio.cluster import RedisCluster

        per_node = max(max_connections or 0, ASYNC_CLUSTER_CONNECTIONS)
        return RedisCluster.from_url(  # type: ignore[return-value]
            _plain(url), socket_keepalive=True, max_connections=per_node
        )
    options = _options(max_connections)
    options["retry"] = AsyncRetry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), RETRIES)
    if client_name:
        options["client_name"] = client_name
    if max_connections is None:
        return redis.asyncio.Redis.from_url(url, **options)
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, timeout=30, **options)
    return redis.asyncio.Redis(connection_pool=pool, retry=options["retry"])

"""kombu's Redis transport, minus a client construction per message.

kombu's Redis channel builds a new ``redis.Redis`` for every pooled command it sends: the
unacknowledged-set append when a task arrives and the ack when it ends, two per job. redis-py's
constructor registers a few hundred response callbacks each time, about 130 µs of worker CPU
per job. A ``redis.Redis`` may be shared (every command takes a connection from the pool), so
this channel builds one and keeps it. Selected in ``worker/app.py`` for ``redis://`` brokers;
everything else is kombu's own.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the BRPOP and pub/sub connections stay kombu's
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        if self._shared_client is None:
            self._shared_client = super()._create_client()  # type: ignore[no-untyped-call]
        return self._shared_client


class Transport(kombu_redis.Transport):
    Channel = Channel

"""kombu's Redis transport, with two changes for a worker that runs hundreds of jobs at once.

**Waiting messages are taken together.** kombu's channel takes one message per ``BRPOP``; a
worker whose event loop is busy with hundreds of streams then takes one job per loop turn, and
a wave of jobs waits in the queue while the worker has free slots (at 500 jobs x 20 ms, the
first jobs ended before the last were taken). After each ``BRPOP`` this channel takes up to
``TAKE_AT_ONCE`` more in one script call, never more than the prefetch limit leaves room for.
The script records each message it takes in kombu's unacknowledged hash and index, in the same
call and in the same form as kombu's own ``QoS.append``: a worker that dies right after the
call loses nothing (kombu's visibility timeout hands the messages out again), and the append's
own round trip per message is saved. (kombu's ``BRPOP`` itself pops before it records; that
one message per read keeps kombu's behaviour.)

**One client for the per-message commands, on a few connections.** kombu's channel builds a
new ``redis.Redis`` for every pooled command it sends: the unacknowledged-set append when a task
arrives and the ack when it ends, two per job. redis-py's constructor registers a few hundred
response callbacks each time, about 130 µs of worker CPU per job. A ``redis.Redis`` may be
shared (every command takes a connection from the pool), so this channel builds one and keeps
it. kombu's pool opens a connection per command in flight and fails past its limit; under gevent
hundreds of jobs that end together acknowledge at once (116 connections, ~36 KiB each, at the
end of a wave of 500). This channel's pool holds ``COMMAND_CONNECTIONS`` and a command waits for
a free one.

**A freed slot takes the next job at once.** With every slot busy (the prefetch limit reached)
kombu stops reading the queue, and a gevent worker's consumer then waits in ``poll`` for up to
two seconds (Celery's ``drain_events`` timeout) with nothing to wake it when a job ends: on a
busy worker each freed slot sat idle that long (6 jobs of 0.14 s on 2 slots took 4.1 s). Here
an ack or reject that gives credit back to a full channel wakes the waiting ``poll`` through a
pipe, and the next turn reads the queue again.

Selected in ``worker/app.py`` for ``redis://`` brokers; everything else is kombu's own. With a
``global_keyprefix`` the batched take is off (kombu prefixes one key of a script call only).
"""

# kombu has no type annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Final

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.eventio import READ
from kombu.utils.json import loads

#: Messages taken after a ``BRPOP`` at most, in one call.
TAKE_AT_ONCE: Final = 64
#: Connections for the per-message commands (acks, appends, takes); a command waits for one.
COMMAND_CONNECTIONS: Final = 16
#: How long a command waits for a free connection before it fails as a connection error.
COMMAND_CONNECTION_WAIT: Final = 30.0
#: Their read buffer: replies are small but for a take (up to ``TAKE_AT_ONCE`` messages, read
#: in several pieces); redis-py's default is 32 KiB, allocated and zeroed per connection.
COMMAND_READ_SIZE: Final = 8 * 1024

# KEYS: the queue's lists in priority order, then kombu's unacked hash and its index.
# ARGV: how many messages to take at most; the time to index them at (seconds).
# Takes the oldest messages first, as BRPOP does, and records each as kombu's QoS.append does:
# hash[delivery_tag] = [message, exchange, routing_key] (the message's own JSON text, verbatim)
# and index[delivery_tag] = time. A message without a delivery tag is returned unrecorded: the
# channel then fails on it as kombu would.
TAKE: Final = """
local unacked, index = KEYS[#KEYS - 1], KEYS[#KEYS]
local room = tonumber(ARGV[1])
local taken = {}
for i = 1, #KEYS - 2 do
    while room > 0 do
        local item = redis.call('RPOP', KEYS[i])
        if not item then break end
        room = room - 1
        taken[#taken + 1] = item
        local ok, message = pcall(cjson.decode, item)
        local properties = ok and type(message) == 'table' and message['properties']
        local tag = type(properties) == 'table' and properties['delivery_tag']
        if type(tag) == 'string' then
            local info = properties['delivery_info']
            if type(info) ~= 'table' then info = {} end
            local exchange, routing_key = info['exchange'] or '', info['routing_key'] or ''
            redis.call('ZADD', index, ARGV[2], tag)
            local entry = '[' .. item .. ',' .. cjson.encode(exchange) .. ','
                .. cjson.encode(routing_key) .. ']'
            redis.call('HSET', unacked, tag, entry)
        end
    end
end
return taken
"""


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS; a message the take script already recorded is not written again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: set[str] = set()
        # Checked and given back in one step: an ack's Redis call comes first, and other
        # deliveries may fill the channel meanwhile.
        self._quick_ack = self._acked

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # the in-memory bookkeeping only
            return
        super().append(message, delivery_tag)

    def _acked(self, delivery_tag: str) -> None:
        """kombu's ``_quick_ack`` (an ack or reject is done with: its credit comes back), which
        wakes the channel's poller when it gives credit to a full channel."""
        full = not self.can_consume()
        self._dirty.add(delivery_tag)
        if full:
            self.channel.connection.cycle.wake()


class Poller(kombu_redis.MultiChannelPoller):
    """kombu's poller, with a pipe that ends a ``get`` waiting in ``poll`` (see ``wake``).

    Only ``get`` (Celery's loop without an event hub: gevent, eventlet, threads, solo) uses it;
    an event hub (prefork) runs kombu's ``on_poll_start`` on every turn of its own loop."""

    def __init__(self) -> None:
        super().__init__()
        self._pipe: tuple[int, int] | None = None
        self._pipe_poller: Any = None  # the poller the pipe is registered with
        self._waiting = False  # a ``get`` is under way
        self._woken = False  # a byte is in the pipe

    def wake(self) -> None:
        """Credit came back: a ``get`` under way returns, so the next one reads the queue."""
        if self._waiting and self._pipe is not None and not self._woken:
            self._woken = True
            with contextlib.suppress(OSError):  # full (already woken) or closed
                os.write(self._pipe[1], b"!")

    def get(self, callback: Any, timeout: float | None = None) -> Any:
        if self._pipe is None:
            self._pipe = os.pipe()
            for fd in self._pipe:
                os.set_blocking(fd, False)
        if self._pipe_poller is not self.poller:
            self.poller.register(self._pipe[0], READ)
            self._pipe_poller = self.poller
        self._waiting = True
        try:
            return super().get(callback, timeout)
        finally:
            self._waiting = False

    @property
    def fds(self) -> dict[int, Any]:
        fds: dict[int, Any] = super().fds
        if self._waiting and self._pipe is not None:
            # So that ``get`` polls (and can be woken) rather than sleeps when a paused BRPOP
            # is the only socket it has.
            fds[self._pipe[0]] = None
        return fds

    def handle_event(self, fileno: int, event: int) -> Any:
        if self._pipe is not None and fileno == self._pipe[0]:
            with contextlib.suppress(OSError):
                while os.read(fileno, 64):
                    pass
            self._woken = False
            return None  # nothing delivered: ``get`` ends empty and the loop goes round
        return super().handle_event(fileno, event)

    def close(self) -> None:
        super().close()
        if self._pipe is not None:
            if self._pipe_poller is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._pipe_poller.unregister(self._pipe[0])
            for fd in self._pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pipe, self._pipe_poller, self._woken = None, None, False


class Channel(kombu_redis.Channel):
    QoS = QoS
    _shared_client: Any = None
    _take_script: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the BRPOP and pub/sub connections stay kombu's
            return super()._create_client(asynchronous=True)
        if self._shared_client is None:
            self._shared_client = super()._create_client()
        return self._shared_client

    def _get_pool(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._get_pool(asynchronous=True)
        params = self._connparams()
        self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])
        params["max_connections"] = min(
            params.get("max_connections") or COMMAND_CONNECTIONS, COMMAND_CONNECTIONS
        )
        params.setdefault("socket_read_size", COMMAND_READ_SIZE)
        return redis.BlockingConnectionPool(timeout=COMMAND_CONNECTION_WAIT, **params)

    def _brpop_read(self, **options: Any) -> Any:
        delivered = super()._brpop_read(**options)
        self._take_waiting()
        return delivered

    def _take_waiting(self) -> None:
        """Deliver the messages waiting behind the one ``BRPOP`` returned, as many as the
        prefetch limit allows (at most ``TAKE_AT_ONCE``)."""
        if self.global_keyprefix or not self.active_queues:
            return
        room = min(TAKE_AT_ONCE, self.qos.can_consume_max_estimate() or 0)
        if room <= 0:
            return
        qos: QoS = self.qos
        with self.conn_or_acquire() as client:
            if self._take_script is None:
                self._take_script = client.register_script(TAKE)
            for queue in list(self.active_queues):
                keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
                keys += [qos.unacked_key, qos.unacked_index_key]
                items = self._take_script(keys=keys, args=[room, time.time()], client=client)
                if items:
                    self._deliver_taken(queue, [loads(bytes_to_str(item)) for item in items])
                    room -= len(items)
                if room <= 0:
                    return

    def _deliver_taken(self, queue: str, messages: list[dict[str, Any]]) -> None:
        qos: QoS = self.qos
        tags = [message.get("properties", {}).get("delivery_tag") for message in messages]
        qos.recorded.update(tag for tag in tags if isinstance(tag, str))
        for done, message in enumerate(messages):
            try:
                self.connection._deliver(message, queue)
            except BaseException:
                # Those not handed to the consumer go back to the head of the queue (its right
                # end: the next RPOP's), in their order, instead of waiting in the unacked hash
                # for the visibility timeout.
                for tag in reversed(tags[done:]):
                    if isinstance(tag, str) and tag not in qos._delivered:
                        qos.recorded.discard(tag)
                        qos.restore_by_tag(tag)
                raise


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()  # type: ignore[assignment]  # kombu declares the base cycle

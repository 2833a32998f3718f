"""Publishing one attempt of one job: events go to the log and the channel in one round trip.

Events are buffered as they are produced and sent by ``flush``, which the runner calls before
every blocking read of the upstream: everything that arrived in one network read goes out in one
script call, and nothing waits for a batch to fill. The script only publishes while this attempt
owns the job (fencing) and skips seqs already in the log, so a retried flush after a dropped
Redis connection never duplicates an event.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final

import redis

from producer import scripts
from producer.protocol import (
    STATUS_OF_TERMINAL,
    EventType,
    Keys,
    StateField,
    encode,
    encode_token,
    make_event,
)
from worker import metrics
from worker.errors import Fenced

PUBLISH_COMMAND: Final = "PUBLISH"


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of trying to take a job for a new attempt."""

    outcome: str  # claimed | missing | finished | busy
    attempt: int
    last_seq: int
    cancel: bool


class Scripts:
    """The job scripts registered on one client (EVALSHA, reloaded after a Redis restart)."""

    def __init__(self, client: redis.Redis) -> None:
        self.claim = client.register_script(scripts.CLAIM)
        self.publish = client.register_script(scripts.PUBLISH)
        self.renew = client.register_script(scripts.RENEW)
        self.release = client.register_script(scripts.RELEASE)
        self.takeover = client.register_script(scripts.TAKEOVER)


def now_ms() -> int:
    return int(time.time() * 1000)


def claim(scripts_: Scripts, keys: Keys, job_id: str, owner: str, lease_ms: int) -> Claim:
    outcome, attempt, seq, cancel = scripts_.claim(
        keys=[keys.state(job_id), keys.lease(job_id)], args=[owner, lease_ms, now_ms()]
    )
    name = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
    return Claim(name, int(attempt), int(seq), bool(cancel))


class JobPublisher:
    """Sequences and publishes the events of one attempt."""

    def __init__(
        self,
        scripts_: Scripts,
        keys: Keys,
        job_id: str,
        owner: str,
        *,
        next_seq: int,
        lease_ms: int,
        ttl: int,
        publish_command: str = PUBLISH_COMMAND,
    ) -> None:
        self._script = scripts_.publish
        self._keys = list(keys.job_keys(job_id))
        self._head = [owner, lease_ms, publish_command, ttl]
        self.job_id = job_id
        self.next_seq = next_seq
        self.tokens = 0
        self._pending: list[Any] = []
        self._pending_tokens = 0
        self.cancel_requested = False
        self.finished = False
        self.started = time.monotonic()
        self._last_tokens_at: float | None = None
        self._first_tokens_at: float | None = None

    @property
    def first_token_after(self) -> float | None:
        """Seconds from the start of this attempt to its first published token."""
        first = self._first_tokens_at
        return None if first is None else first - self.started

    def token(self, text: str) -> None:
        self._pending += (self.next_seq, encode_token(self.job_id, self.next_seq, text))
        self.next_seq += 1
        self._pending_tokens += 1

    def event(self, type_: EventType, **fields: Any) -> None:
        event = make_event(self.job_id, self.next_seq, type_, **fields)
        self._pending += (self.next_seq, encode(event))
        self.next_seq += 1

    def flush(self) -> None:
        """Send what is buffered; raise ``Fenced`` if another attempt owns the job now."""
        if self._pending and not self.finished:
            self._call([0])

    def finish(self, type_: EventType, **fields: Any) -> None:
        """Publish the terminal event with everything still buffered, and close the job."""
        if self.finished:
            return
        self.event(type_, **fields)
        final: list[Any] = [
            StateField.STATUS,
            STATUS_OF_TERMINAL[type_],
            StateField.FINISHED,
            now_ms(),
        ]
        for name in (StateField.FINISH_REASON, StateField.USAGE, StateField.ERROR):
            value = fields.get(name) if name != StateField.ERROR else _error_of(fields)
            if value is not None:
                final += (name, value if isinstance(value, str) else json.dumps(value))
        self._call([len(final), *final])
        self.finished = True
        metrics.JOBS_FINISHED.labels(STATUS_OF_TERMINAL[type_]).inc()

    def _call(self, final: list[Any]) -> None:
        tokens = self._pending_tokens
        args = [*self._head, tokens, *final, *self._pending]
        began = time.monotonic()
        result = self._script(keys=self._keys, args=args)
        now = time.monotonic()
        metrics.PUBLISH.observe(now - began)
        if tokens:
            metrics.TOKENS.inc(tokens)
            if self._last_tokens_at is None:
                self._first_tokens_at = began
                metrics.TTFT.observe(began - self.started)
            else:
                metrics.GAP.observe(began - self._last_tokens_at)
            self._last_tokens_at = began
        self._pending, self._pending_tokens = [], 0
        if result == -1:
            self.finished = True
            raise Fenced(f"job {self.job_id}: another attempt owns it")
        self.tokens += tokens
        self.cancel_requested = self.cancel_requested or result == 1


def _error_of(fields: dict[str, Any]) -> dict[str, Any] | None:
    if "code" not in fields:
        return None
    return {"code": fields["code"], "message": fields.get("message", "")}

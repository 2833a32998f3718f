"""Publishing one attempt of one job: events go to the log and the channel in one script call.

Events are buffered as they are produced and handed on by ``flush``, which the runner calls
before every blocking read of the upstream, so everything that arrived in one network read goes
out together and nothing waits for a batch to fill. On a single Redis the process's ``Flusher``
sends them, pipelined with every other stream's (the stream goes on reading meanwhile); on a
cluster, where jobs live on different shards, ``flush`` calls the script itself. The script only
publishes while this attempt owns the job (fencing) and skips seqs already in the log, so a
retried flush after a dropped Redis connection never duplicates an event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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
from worker.flusher import MAX_BUFFERED, Flusher, Outbox

PUBLISH_COMMAND: Final = "PUBLISH"
#: Seconds ``finish`` waits for Redis to confirm the terminal event (the client's retry policy
#: gives up after about half a minute).
CONFIRM_TIMEOUT: Final = 120.0


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
        self.stranded = client.register_script(scripts.STRANDED)
        self.requeue_due = client.register_script(scripts.REQUEUE_DUE)


def now_ms() -> int:
    return int(time.time() * 1000)


def claim(
    scripts_: Scripts,
    keys: Keys,
    job_id: str,
    owner: str,
    lease_ms: int,
    *,
    track: bool = False,
) -> Claim:
    """Take the job for a new attempt; with ``track`` (a single Redis) the script keeps the
    running set too (the job joins it when claimed and leaves it when missing or finished) and
    takes the job out of the queued set."""
    script_keys = [keys.state(job_id), keys.lease(job_id)]
    args: list[Any] = [owner, lease_ms, now_ms()]
    if track:
        script_keys += (keys.running, keys.queued)
        args.append(job_id)
    outcome, attempt, seq, cancel = scripts_.claim(keys=script_keys, args=args)
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
        flusher: Flusher | None = None,
        on_signal: Callable[[str], None] | None = None,
        track_running: bool = False,
    ) -> None:
        self._script = scripts_.publish
        # With ``track_running`` (a single Redis) the final batch also takes the job out of
        # the running set, as ``claim(track=True)`` put it in.
        self._keys = [*keys.job_keys(job_id), *([keys.running] if track_running else [])]
        self._head = [owner, lease_ms, publish_command, ttl]
        self._box: Outbox | None = None
        if flusher is not None:
            self._box = flusher.outbox(self._keys, self._head)
            self._box.on_signal = on_signal
            self._box.on_confirmed = self._confirmed
        self.job_id = job_id
        self.next_seq = next_seq
        self.tokens = 0
        self._pending: list[Any] = []
        self._pending_tokens = 0
        self._cancel_requested = False
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
        seq = self.next_seq
        if self._box is not None:
            self._box.events.append((seq, encode_token(self.job_id, seq, text), 1))
        else:
            self._pending += (seq, encode_token(self.job_id, seq, text))
            self._pending_tokens += 1
        self.next_seq = seq + 1

    def event(self, type_: EventType, **fields: Any) -> None:
        seq = self.next_seq
        payload = encode(make_event(self.job_id, seq, type_, **fields))
        if self._box is not None:
            self._box.events.append((seq, payload, 0))
        else:
            self._pending += (seq, payload)
        self.next_seq = seq + 1

    def flush(self) -> None:
        """Send what is buffered (or hand it to the flusher); raise ``Fenced`` if another
        attempt owns the job now, or the Redis error that publishing it ended with."""
        box = self._box
        if box is None:
            if self._pending and not self.finished:
                self._call([0])
            return
        if box.error is not None:
            self.finished = True
            raise box.error
        if box.events:
            box.submit()
            if len(box.events) > MAX_BUFFERED:  # Redis is slow or away: wait for it
                box.wait_for(self.next_seq - 1, CONFIRM_TIMEOUT)

    def sync(self) -> None:
        """Flush and wait until Redis has everything published so far."""
        if self._box is None:
            self.flush()
        elif not self.finished:
            self._box.wait_for(self.next_seq - 1, CONFIRM_TIMEOUT)

    @property
    def cancel_requested(self) -> bool:
        box = self._box
        return self._cancel_requested or (box is not None and box.result == 1)

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
        box = self._box
        try:  # a job is finished once this was tried: nothing is published after it
            if box is None:
                self._call([len(final), *final])
            elif box.error is not None:
                raise box.error
            else:
                box.final = [str(v).encode() for v in final]
                box.wait_for(self.next_seq - 1, CONFIRM_TIMEOUT)
        finally:
            self.finished = True
        metrics.JOBS_FINISHED.labels(STATUS_OF_TERMINAL[type_]).inc()

    def _confirmed(self, tokens: int, began: float) -> None:
        """Redis confirmed a batch holding ``tokens`` tokens, sent at ``began``."""
        if tokens:
            if self._last_tokens_at is None:
                self._first_tokens_at = began
                metrics.TTFT.observe(began - self.started)
            else:
                metrics.GAP.observe(began - self._last_tokens_at)
            self._last_tokens_at = began
            self.tokens += tokens

    def _call(self, final: list[Any]) -> None:
        tokens = self._pending_tokens
        args = [*self._head, tokens, *final, *self._pending]
        began = time.monotonic()
        result = self._script(keys=self._keys, args=args)
        now = time.monotonic()
        metrics.PUBLISH.observe(now - began)
        self._pending, self._pending_tokens = [], 0
        if result == -1:
            self.finished = True
            raise Fenced(f"job {self.job_id}: another attempt owns it")
        if tokens:
            metrics.TOKENS.inc(tokens)
            self._confirmed(tokens, began)
        self._cancel_requested = self._cancel_requested or result == 1


def _error_of(fields: dict[str, Any]) -> dict[str, Any] | None:
    if "code" not in fields:
        return None
    return {"code": fields["code"], "message": fields.get("message", "")}

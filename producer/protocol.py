"""The tokenrelay wire contract: the one home of every name two processes must agree on.

Standard library only. Producers, readers, the gateway and the worker all import this module; it
imports nothing of theirs.

For job ``J`` under prefix ``P``:

- ``P:job:{J}``        pub/sub channel; every event is published here as it happens.
- ``P:job:{J}:log``    Redis Stream with the same events, in order. Entry ids are ``0-(seq+1)``
                       so that the log itself refuses a duplicate and ``XRANGE`` by seq is exact.
- ``P:job:{J}:state``  hash: status, model, dialect, attempt, times, finish_reason, usage, error.
- ``P:job:{J}:lease``  string held by the worker running the job, renewed while it runs.

The braces are a Redis Cluster hash tag: all of a job's keys live in one slot.

An event is one compact JSON object ``{"v": 1, "job": J, "seq": N, "type": T, ...}``; ``seq``
starts at 0 and rises by one per event. ``done``, ``error`` and ``cancelled`` are terminal and
exactly one ends every job.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

VERSION: Final = 1
TASK_NAME: Final = "tokenrelay.stream"
DEFAULT_PREFIX: Final = "tokenrelay"

#: Upstream dialects a job may name. Their implementations live in ``worker.dialects``.
DIALECTS: Final = ("together", "openai-completions", "openai-chat", "tgi", "ollama")

#: The one field of a log entry; its value is the encoded event.
LOG_FIELD: Final = "e"

JOB_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PREFIX_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class ProtocolError(ValueError):
    """A message that is not a valid tokenrelay event or control message."""


class EventType(StrEnum):
    START = "start"
    TOKEN = "token"
    RESTART = "restart"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


TERMINAL_TYPES: Final = frozenset({EventType.DONE, EventType.ERROR, EventType.CANCELLED})


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


TERMINAL_STATUSES: Final = frozenset({Status.DONE, Status.ERROR, Status.CANCELLED})

#: The terminal status each terminal event leaves behind.
STATUS_OF_TERMINAL: Final = {
    EventType.DONE: Status.DONE,
    EventType.ERROR: Status.ERROR,
    EventType.CANCELLED: Status.CANCELLED,
}


class StateField(StrEnum):
    """Fields of the ``P:job:{J}:state`` hash."""

    STATUS = "status"
    MODEL = "model"
    DIALECT = "dialect"
    ATTEMPT = "attempt"
    CREATED = "created"
    STARTED = "started"
    FINISHED = "finished"
    FINISH_REASON = "finish_reason"
    USAGE = "usage"
    ERROR = "error"
    SEQ = "seq"  # last seq published
    TOKENS = "tokens"  # tokens published by the current attempt
    OWNER = "owner"  # token of the worker attempt that may publish
    CANCEL = "cancel"  # set when a cancel was requested
    RESUMED = "resumed"  # times the upstream stream was reopened and continued
    SPEC = "spec"  # the validated job request, JSON; never holds a secret
    TENANT = "tenant"  # opaque owner tag set by the gateway


def validate_job_id(job_id: object) -> str:
    """Return ``job_id`` if it is a valid job id (letters, digits, ``-``, ``_``; 1 to 64)."""
    if not isinstance(job_id, str) or not _valid_job_id(job_id):
        raise ProtocolError("job_id: must be 1 to 64 characters of letters, digits, '-' and '_'")
    return job_id


def validate_prefix(prefix: str) -> str:
    if not _PREFIX_PATTERN.fullmatch(prefix):
        raise ProtocolError("prefix: must be 1 to 64 characters of letters, digits, '_.:-'")
    return prefix


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key and channel name, under one prefix. No key is built anywhere else."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{{{validate_job_id(job_id)}}}"

    def channel(self, job_id: str) -> str:
        return self._job(job_id)

    def log(self, job_id: str) -> str:
        return self._job(job_id) + ":log"

    def state(self, job_id: str) -> str:
        return self._job(job_id) + ":state"

    def lease(self, job_id: str) -> str:
        return self._job(job_id) + ":lease"

    def job_keys(self, job_id: str) -> tuple[str, str, str, str]:
        """State, log, channel and lease of one job, in that order."""
        return self.state(job_id), self.log(job_id), self.channel(job_id), self.lease(job_id)

    @property
    def queue(self) -> str:
        """The Celery queue jobs are sent to."""
        return f"{self.prefix}.jobs"

    @property
    def control(self) -> str:
        """Pub/sub channel of control messages to workers (cancel)."""
        return f"{self.prefix}:control"

    @property
    def running(self) -> str:
        """Sorted set of claimed job ids, scored by claim time (ms), watched by every reaper."""
        return f"{self.prefix}:running"

    @property
    def queued(self) -> str:
        """Sorted set of created job ids not yet claimed, scored by when they were (last) put on
        the queue (ms): a job left in it past the queued grace lost its message and is queued
        again."""
        return f"{self.prefix}:queued"

    def worker(self, worker_id: str) -> str:
        """A worker's heartbeat key, refreshed with a TTL."""
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.prefix}:worker:*"


#: The largest seq an event may carry (its log entry id must fit a Redis stream id).
MAX_SEQ: Final = 2**53


def log_entry_id(seq: int) -> str:
    """The log entry id of event ``seq``: ``0-(seq+1)``, since ``0-0`` is not a valid id."""
    return f"0-{seq + 1}"


def seq_of_entry_id(entry_id: str | bytes) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[2]) - 1


@dataclass(frozen=True, slots=True)
class Event:
    """One protocol event. ``fields`` holds the type's own fields (``text``, ``code``, ...)."""

    job: str
    seq: int
    type: EventType
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    @property
    def text(self) -> str:
        value = self.fields.get("text", "")
        return value if isinstance(value, str) else ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "job": self.job,
            "seq": self.seq,
            "type": str(self.type),
            **self.fields,
        }


_RESERVED: Final = frozenset({"v", "job", "seq", "type"})
_TYPES: Final[Mapping[str, EventType]] = {t.value: t for t in EventType}
# Fields each type must carry, with their JSON types.
_REQUIRED: Final[Mapping[EventType, Mapping[str, type | tuple[type, ...]]]] = {
    EventType.START: {"attempt": int},
    EventType.TOKEN: {"text": str},
    EventType.RESTART: {"attempt": int},
    EventType.DONE: {},
    EventType.ERROR: {"code": str, "message": str},
    EventType.CANCELLED: {},
}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _utf8(text: str) -> bytes:
    # A lone surrogate (an upstream that escapes JSON may split one emoji into two tokens) has
    # no UTF-8 form. It can only occur inside a JSON string, where backslashreplace writes its
    # JSON escape (backslash, "u", four hex digits), which decodes to the same text again.
    return text.encode("utf-8", "backslashreplace")


def _shown(value: object) -> str:
    """A received value for an error message: short, and never a deep structure's repr."""
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value)[:80]
    return type(value).__name__


def encode(event: Event) -> bytes:
    """Encode an event as compact UTF-8 JSON."""
    return _utf8(_dumps(event.as_dict()))


def encode_token(job_id: str, seq: int, text: str) -> bytes:
    """Fast path of ``encode`` for token events; identical output.

    Safe to build by hand: a validated job id needs no JSON escaping.
    """
    return _utf8(
        f'{{"v":{VERSION},"job":"{job_id}","seq":{seq},"type":"token","text":{_dumps(text)}}}'
    )


def make_event(job_id: str, seq: int, type_: EventType, **fields: Any) -> Event:
    """Build an event, dropping fields whose value is ``None``."""
    return Event(job_id, seq, type_, {k: v for k, v in fields.items() if v is not None})


def decode(data: bytes | str) -> Event:
    """Decode and validate one event; raise ``ProtocolError`` naming what is wrong."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"event is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("event is not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("event must be a JSON object")
    version = obj.get("v")
    if type(version) is not int or version != VERSION:
        raise ProtocolError(f"v: unsupported protocol version {_shown(obj.get('v'))}")
    job = obj.get("job")
    if type(job) is not str or not _valid_job_id(job):
        raise ProtocolError("job: not a valid job id")
    seq = obj.get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:  # a bool is not an int here
        raise ProtocolError(f"seq: must be an integer from 0 to {MAX_SEQ}")
    type_name = obj.get("type")
    type_ = _TYPES.get(type_name) if type(type_name) is str else None
    if type_ is None:
        raise ProtocolError(f"type: unknown event type {_shown(type_name)}")
    for name, kind in _REQUIRED[type_].items():
        value = obj.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProtocolError(f"{name}: required on a {type_} event")
    for name in _RESERVED:  # what is left is the type's own fields (``obj`` is ours alone)
        del obj[name]
    return Event(job, seq, type_, obj)


@functools.lru_cache(maxsize=4096)
def _valid_job_id(job: str) -> bool:
    """Whether ``job`` is a valid job id; a reader decodes many events of few jobs."""
    return JOB_ID_PATTERN.fullmatch(job) is not None


def encode_cancel(job_id: str) -> bytes:
    """A control message asking whichever worker runs ``job_id`` to cancel it."""
    return _dumps({"v": VERSION, "cancel": validate_job_id(job_id)}).encode()


def decode_control(data: bytes | str) -> str | None:
    """The job id a control message asks to cancel, or ``None`` if it is not one."""
    try:
        obj = json.loads(data)
        job = obj["cancel"] if isinstance(obj, dict) and obj.get("v") == VERSION else None
        return validate_job_id(job) if job is not None else None
    except (ValueError, KeyError, TypeError, RecursionError):
        return None

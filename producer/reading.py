"""How a reader puts a job's events in order: pure logic shared by the sync and async readers.

The rule (DESIGN.md): subscribe to the channel first, then read the log from the start (or from
the last seq held), then take live events, dropping any seq already held and filling a gap from
the log. ``Sequencer`` decides what to do with each event; the readers do the I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, NamedTuple

from producer.protocol import (
    LOG_FIELD,
    TERMINAL_STATUSES,
    Event,
    EventType,
    ProtocolError,
    StateField,
    Status,
    decode,
    log_entry_id,
)

_LOG_KEY: Final = LOG_FIELD.encode()


class JobNotFound(LookupError):
    """No job with that id exists (or it expired)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r} (unknown, or expired after its TTL)")
        self.job_id = job_id


class Verdict(Enum):
    NEXT = "next"  # deliver it
    DUPLICATE = "duplicate"  # already held: drop it
    GAP = "gap"  # events are missing before it: read the log


@dataclass
class Sequencer:
    """Tracks the last seq delivered and whether the job has ended."""

    last: int = -1
    terminal: Event | None = None

    def judge(self, event: Event) -> Verdict:
        if event.seq <= self.last:
            return Verdict.DUPLICATE
        return Verdict.NEXT if event.seq == self.last + 1 else Verdict.GAP

    def deliver(self, event: Event) -> Event:
        self.last = event.seq
        if event.terminal:
            self.terminal = event
        return event

    @property
    def done(self) -> bool:
        return self.terminal is not None

    @property
    def log_start(self) -> str:
        """The first log entry id not yet held (XRANGE is inclusive)."""
        return log_entry_id(self.last + 1)


def events_from_log(entries: Iterable[tuple[Any, Any]]) -> list[Event]:
    """Decode XRANGE entries; an undecodable entry is a broken log and is reported."""
    events = []
    for _entry_id, values in entries:
        values = values or {}
        data = values.get(LOG_FIELD.encode()) or values.get(LOG_FIELD)
        if data is None:
            raise ProtocolError("log entry without an event")
        events.append(decode(data))
    return events


def decode_live(data: Any) -> Event | None:
    """A live message's event, or ``None`` if it is not one (the log remains the truth)."""
    try:
        return decode(data)
    except ProtocolError:
        return None


class Published(NamedTuple):
    """One event, with the bytes it was published as (on the channel and in the log)."""

    event: Event
    data: bytes


def published_from_log(entries: Iterable[tuple[Any, Any]]) -> list[Published]:
    """``events_from_log``, keeping each event's bytes."""
    out = []
    for _entry_id, values in entries:
        values = values or {}
        data = values.get(_LOG_KEY) or values.get(LOG_FIELD)
        if data is None:
            raise ProtocolError("log entry without an event")
        out.append(Published(decode(data), _bytes(data)))
    return out


def published_live(data: Any) -> Published | None:
    """``decode_live``, keeping the message's bytes."""
    event = decode_live(data)
    return None if event is None else Published(event, _bytes(data))


def _bytes(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode("utf-8", "backslashreplace")


@dataclass
class Transcript:
    """The text of the current attempt, reassembled from events; a restart starts it over.
    With ``keep_text`` false it counts restarts only and its text stays empty (a reader that
    forwards events and never asks for the text, such as the gateway's feeds)."""

    parts: list[str] = field(default_factory=list)
    restarts: int = 0
    keep_text: bool = True

    def add(self, event: Event) -> None:
        if event.type is EventType.TOKEN:
            if self.keep_text:
                self.parts.append(event.text)
        elif event.type is EventType.RESTART:
            self.parts.clear()
            self.restarts += 1

    @property
    def text(self) -> str:
        return "".join(self.parts)


class JobFailedError(RuntimeError):
    """The job ended with an ``error`` (or ``cancelled``) event; ``event`` is that event."""

    def __init__(self, event: Event) -> None:
        code = event.fields.get("code", str(event.type))
        message = event.fields.get("message", f"the job was {event.type}")
        super().__init__(f"job {event.job} ended with {event.type}: [{code}] {message}")
        self.event = event
        self.partial_text = ""


@dataclass(frozen=True)
class JobState:
    """A job's state hash, decoded."""

    job_id: str
    status: Status
    model: str | None = None
    dialect: str | None = None
    attempt: int = 0
    created: float | None = None
    started: float | None = None
    finished: float | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    tokens: int = 0
    last_seq: int = -1
    resumed: int = 0
    tenant: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_hash(cls, job_id: str, raw: Mapping[Any, Any]) -> JobState:
        values = {
            (k.decode() if isinstance(k, bytes) else k): (
                v.decode("utf-8", "replace") if isinstance(v, bytes) else v
            )
            for k, v in raw.items()
        }
        return cls(
            job_id=job_id,
            status=Status(values.get(StateField.STATUS, Status.QUEUED)),
            model=values.get(StateField.MODEL),
            dialect=values.get(StateField.DIALECT),
            attempt=int(values.get(StateField.ATTEMPT, 0)),
            created=_seconds(values.get(StateField.CREATED)),
            started=_seconds(values.get(StateField.STARTED)),
            finished=_seconds(values.get(StateField.FINISHED)),
            finish_reason=values.get(StateField.FINISH_REASON),
            usage=_json(values.get(StateField.USAGE)),
            error=_json(values.get(StateField.ERROR)),
            tokens=int(values.get(StateField.TOKENS, 0)),
            last_seq=int(values.get(StateField.SEQ, -1)),
            resumed=int(values.get(StateField.RESUMED, 0)),
            tenant=values.get(StateField.TENANT),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, as the CLI and the gateway show it."""
        out = {k: v for k, v in self.__dict__.items() if v is not None and k != "tenant"}
        out["status"] = str(self.status)
        return out


def _seconds(value: str | None) -> float | None:
    return int(value) / 1000 if value else None


def _json(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None

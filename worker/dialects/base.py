"""What every upstream dialect shares: the parsed unit (``Delta``) and strict JSON handling.

A dialect turns one job into one HTTP request and each event of the response into a ``Delta``.
Dialects are pure: no Redis, no sockets; the HTTP call lives in ``worker.upstream``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from producer.spec import JobSpec
from worker.errors import UpstreamProtocolError, UpstreamStreamError


@dataclass(frozen=True, slots=True)
class Delta:
    """What one upstream event adds: text, and at the end a finish reason and usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: Mapping[str, int] | None = None


#: Returned by a parser for the stream's explicit end (``[DONE]``, or Ollama's ``done``).
DONE: Final = Delta(finish_reason=None)
#: Returned for events that carry nothing (role-only chat deltas, keep-alives).
EMPTY: Final = Delta()


@dataclass(frozen=True, slots=True)
class Continuation:
    """Text already produced by an interrupted stream, to ask the upstream to go on from."""

    text: str = ""
    tokens: int = 0


Builder = Callable[[JobSpec, Continuation], dict[str, Any]]
Parser = Callable[[str], Delta]


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    path: str
    build: Builder
    parse: Parser
    framing: Literal["sse", "ndjson"] = "sse"
    #: The stream ends only with ``DONE`` (or at EOF for dialects without an end marker).
    needs_done: bool = True


def load_object(data: str) -> dict[str, Any]:
    """Parse one event's JSON object; a malformed one is an ``upstream_protocol`` failure."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise UpstreamProtocolError(
            f"upstream sent an event that is not JSON: {data[:80]!r}"
        ) from None
    if not isinstance(obj, dict):
        raise UpstreamProtocolError(f"upstream sent an event that is not an object: {data[:80]!r}")
    raise_error_object(obj)
    return obj


def raise_error_object(obj: Mapping[str, Any]) -> None:
    """An ``{"error": ...}`` object mid-stream ends the job with the upstream's message."""
    error = obj.get("error")
    if error is None:
        return
    if isinstance(error, Mapping):
        error = error.get("message") or error.get("type") or "upstream error"
    try:
        message = str(error)
    except RecursionError:  # a structure nested about as deep as the JSON parser allows
        message = "upstream error"
    raise UpstreamStreamError(f"upstream error: {message[:500]}")


def usage_of(value: object) -> dict[str, int] | None:
    """Normalise a usage object to OpenAI's three counts; ``None`` if absent or all zero."""
    if not isinstance(value, Mapping):
        return None
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    counts = {key: count(value.get(key)) for key in keys}
    usage = {key: n for key, n in counts.items() if n is not None}
    # Some servers send a zero-filled usage on every chunk; only the final one counts.
    return usage if any(usage.values()) else None


def count(value: object) -> int | None:
    """A token count: a JSON number that is finite (``1e999`` parses as infinity), not a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value)


def first_choice(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The first choice of an OpenAI-style chunk, or ``{}`` for usage-only chunks."""
    choices = obj.get("choices")
    if choices is None or choices == []:
        return {}
    if not isinstance(choices, list) or not isinstance(choices[0], Mapping):
        raise UpstreamProtocolError("upstream sent a chunk whose choices are not a list of objects")
    return choices[0]


def text_field(value: object, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UpstreamProtocolError(f"upstream sent a non-string {where}")
    return value


def finish_field(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def sampling(spec: JobSpec) -> dict[str, Any]:
    """Sampling parameters the job set, by their common names."""
    params = {
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "top_k": spec.top_k,
        "repetition_penalty": spec.repetition_penalty,
    }
    return {k: v for k, v in params.items() if v is not None}

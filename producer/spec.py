"""The job request: what a producer asks a worker to stream, validated in one place.

``JobSpec.from_dict`` is used by ``Client.submit``, the gateway and the worker's task alike, so a
bad job is refused with the same message wherever it enters. Every message names the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

from producer.protocol import DIALECTS

MAX_TOKENS_LIMIT: Final = 131_072
MAX_MODEL_LENGTH: Final = 256
MAX_STOP_SEQUENCES: Final = 16
MAX_STOP_LENGTH: Final = 256
MAX_MESSAGES: Final = 1024
MAX_DEADLINE: Final = 86_400.0
CHAT_ROLES: Final = frozenset({"system", "user", "assistant", "tool", "developer"})
ON_INTERRUPT: Final = ("error", "continue")
# Model names go into URLs and logs: printable ASCII without spaces or quotes.
_MODEL_PATTERN: Final = re.compile(r"[\x21-\x7e]+")
_FORBIDDEN_MODEL_CHARS: Final = frozenset("\"'\\<>`")


class InvalidJob(ValueError):
    """A job request that cannot run. ``field`` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated job request. Exactly one of ``prompt`` and ``messages`` is set."""

    model: str
    dialect: str
    max_tokens: int
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    stop: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    on_interrupt: str = "error"
    deadline: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the inverse of ``from_dict``; fields left unset are omitted."""
        # Every field is a str, a number, None or a tuple: no deep copy needed (``asdict``
        # deep-copied each field, a tenth of a submit's CPU).
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["stop"] = list(self.stop)
        if self.messages is not None:
            data["messages"] = [{"role": m.role, "content": m.content} for m in self.messages]
        return {k: v for k, v in data.items() if v is not None}

    @property
    def text_prompt(self) -> str:
        """The prompt as one string, for completion dialects given chat messages."""
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        return "".join(m.content for m in self.messages)

    @property
    def chat_messages(self) -> tuple[Message, ...]:
        """The prompt as chat messages, for chat dialects given a plain prompt."""
        if self.messages is not None:
            return self.messages
        assert self.prompt is not None
        return (Message("user", self.prompt),)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        default_model: str,
        default_dialect: str,
        max_prompt_bytes: int,
    ) -> JobSpec:
        """Validate a request; raise ``InvalidJob`` naming the first bad field."""
        if not isinstance(data, Mapping):
            raise InvalidJob("job", "must be an object")
        unknown = sorted(str(k) for k in data if k not in _FIELDS)
        if unknown:
            raise InvalidJob(unknown[0][:64], "unknown field")
        prompt, messages = _prompt_and_messages(data, max_prompt_bytes)
        return cls(
            model=_model(data.get("model"), default_model),
            dialect=_choice(data, "dialect", DIALECTS, default_dialect),
            max_tokens=_integer(data, "max_tokens", 1, MAX_TOKENS_LIMIT, default=None)
            or _DEFAULT_MAX_TOKENS,
            prompt=prompt,
            messages=messages,
            stop=_stop(data.get("stop")),
            temperature=_number(data, "temperature", 0.0, 5.0),
            top_p=_number(data, "top_p", 0.0, 1.0),
            top_k=_integer(data, "top_k", 0, 100_000, default=None),
            repetition_penalty=_number(data, "repetition_penalty", 0.0, 10.0),
            on_interrupt=_choice(data, "on_interrupt", ON_INTERRUPT, "error"),
            deadline=_number(data, "deadline", 0.001, MAX_DEADLINE),
        )


_FIELDS: Final = frozenset(
    {
        "model",
        "dialect",
        "max_tokens",
        "prompt",
        "messages",
        "stop",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "on_interrupt",
        "deadline",
    }
)
_DEFAULT_MAX_TOKENS: Final = 256


def _utf8_size(field: str, text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidJob(field, "is not valid UTF-8 text") from None


def _prompt_and_messages(
    data: Mapping[str, Any], max_bytes: int
) -> tuple[str | None, tuple[Message, ...] | None]:
    prompt, messages = data.get("prompt"), data.get("messages")
    if prompt is not None and messages is not None:
        raise InvalidJob("prompt", "give either prompt or messages, not both")
    if messages is not None:
        parsed = _messages(messages)
        if sum(_utf8_size("messages", m.content) for m in parsed) > max_bytes:
            raise InvalidJob("messages", f"larger than the limit of {max_bytes} bytes")
        return None, parsed
    if prompt is None:
        raise InvalidJob("prompt", "is required")
    if not isinstance(prompt, str):
        raise InvalidJob("prompt", f"must be a string, not {_kind(prompt)}")
    if not prompt.strip():
        raise InvalidJob("prompt", "must not be empty")
    if _utf8_size("prompt", prompt) > max_bytes:
        raise InvalidJob("prompt", f"larger than the limit of {max_bytes} bytes")
    return prompt, None


def _messages(value: object) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidJob("messages", "must be a non-empty list of {role, content} objects")
    if len(value) > MAX_MESSAGES:
        raise InvalidJob("messages", f"more than {MAX_MESSAGES} messages")
    parsed = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, Mapping):
            raise InvalidJob(where, "must be an object with role and content")
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise InvalidJob(f"{where}.role", f"must be one of {', '.join(sorted(CHAT_ROLES))}")
        if not isinstance(content, str):
            raise InvalidJob(f"{where}.content", "must be a string")
        parsed.append(Message(str(role), content))
    if not any(m.content.strip() for m in parsed):
        raise InvalidJob("messages", "every message is empty")
    return tuple(parsed)


def _shown(value: object) -> str:
    """A caller's value for a message: short, and safe for any value (a 5000-digit int or a
    list nested 5000 deep has no printable ``repr``)."""
    if isinstance(value, str | float) or (isinstance(value, int) and abs(value) < 10**20):
        return repr(value)[:80]
    return _kind(value)


def _kind(value: object) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string"}.get(
        type(value), "a list" if isinstance(value, list) else type(value).__name__
    )


def _model(value: object, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidJob("model", f"must be a string, not {_kind(value)}")
    if not value or len(value) > MAX_MODEL_LENGTH:
        raise InvalidJob("model", f"must be 1 to {MAX_MODEL_LENGTH} characters")
    if not _MODEL_PATTERN.fullmatch(value) or _FORBIDDEN_MODEL_CHARS & set(value):
        raise InvalidJob("model", "may hold only printable ASCII without spaces or quotes")
    return value


def _choice(data: Mapping[str, Any], field: str, allowed: tuple[str, ...], default: str) -> str:
    value = data.get(field)
    if value is None:
        return default
    if value not in allowed:
        raise InvalidJob(
            field, f"unknown value {_shown(value)}; expected one of {', '.join(allowed)}"
        )
    return str(value)


def _integer(
    data: Mapping[str, Any], field: str, low: int, high: int, *, default: int | None
) -> int | None:
    value = data.get(field)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidJob(field, f"must be an integer, not {_kind(value)}")
    if not low <= value <= high:
        raise InvalidJob(field, f"must be between {low} and {high}, got {_shown(value)}")
    return value


def _number(data: Mapping[str, Any], field: str, low: float, high: float) -> float | None:
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidJob(field, f"must be a number, not {_kind(value)}")
    # Compared before any float conversion, which overflows for a huge int.
    if not low <= value <= high or not math.isfinite(value):
        raise InvalidJob(field, f"must be between {low:g} and {high:g}, got {_shown(value)}")
    return float(value)


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise InvalidJob("stop", "must be a string or a list of strings")
    if len(items) > MAX_STOP_SEQUENCES:
        raise InvalidJob("stop", f"at most {MAX_STOP_SEQUENCES} sequences")
    for s in items:
        if not s or len(s) > MAX_STOP_LENGTH:
            raise InvalidJob("stop", f"each sequence must be 1 to {MAX_STOP_LENGTH} characters")
        _utf8_size("stop", s)
    return tuple(items)

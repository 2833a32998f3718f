"""A mock LLM upstream: a real HTTP server (Starlette + uvicorn) speaking five API dialects.

It is the embedded default upstream for demos, tests and benchmarks.

Contract
--------
``generate(context, max_tokens, stop)`` is pure and deterministic. The next token depends only on
the whole text so far (context plus the tokens already generated), so generation is
prefix-consistent: ``generate(p + "".join(tokens[:k]), n - k)`` yields ``tokens[k:]``. A stop
string that appears in the generated text ends it with finish reason ``"stop"`` and the output is
cut just before it; otherwise the finish reason is ``"length"``.

``create_app(delay_ms, api_key)`` builds the ASGI app; ``serve(...)`` runs it under uvicorn.

Routes, each speaking its dialect streamed and not (default ``max_tokens`` 16 everywhere):

* ``POST /inference`` - Together's legacy API (``stream_tokens``), SSE ending in ``[DONE]``.
* ``POST /v1/completions`` and ``POST /v1/chat/completions`` - OpenAI, SSE ending in ``[DONE]``,
  with a usage chunk (``"choices": []``) when ``stream_options.include_usage`` is true. Chat
  generates from the concatenated message contents, so an assistant prefill continues the text.
* ``POST /generate_stream`` and ``POST /generate`` - Hugging Face TGI; the last token event holds
  ``generated_text`` and ``details``; no ``[DONE]``.
* ``POST /api/generate`` - Ollama; NDJSON, the last line has ``"done": true``.
* ``GET /_stats`` - the last 10,000 requests, newest last, each with ``id``, ``path``, ``model``,
  ``prompt_head``, ``tokens_sent``, ``state``, ``authorized`` and ``client`` (address:port of the
  connection). ``state`` is ``streaming`` (in
  progress), ``completed``, ``disconnected`` (the client left first), ``dropped``, ``failed``
  (an error status was answered), ``stalled`` (stall in progress), ``error`` or ``malformed``
  (the stream completed but carried a malformed event). ``tokens_sent`` counts token events handed
  to the server, so with ``burst`` it may run ahead of the bytes on the wire.
* ``POST /_reset`` - forget the records and the ``fail_times`` counters.
* ``GET /healthz`` - ``{"ok": true}``.

With ``api_key`` set, every route but ``/_stats`` and ``/_reset`` needs
``Authorization: Bearer <api_key>``, else it answers 401 with an OpenAI-style error.

Faults are read per request from the query string of the ``model`` field, e.g.
``"mock?delay_ms=5&error_after=3"``, so any client can set them through its model name:
``delay_ms``, ``burst``, ``status`` (with ``retry_after``, ``retry_after_ms``, ``fail_times``),
``error_after``, ``drop_after``, ``stall_after``, ``malformed_after``, ``stamp`` and ``ping``.
Unknown names are ignored. "After N" faults fire before token N (0-based), also when N equals the
token count, i.e. just before the finish events. Error events use the OpenAI shape
``{"error": {"message", "type"}}`` in every dialect. Non-streamed requests honour ``delay_ms``
(total for all tokens), ``status``, ``error_after`` (a 500), ``drop_after`` (the body is cut off
half-way), ``stall_after`` (no answer until the client leaves) and ``malformed_after`` (the body
is not JSON).

A stream with ``delay_ms`` keeps a steady cadence, as a server decoding at a fixed rate does:
token i is due ``(i + 1) * delay_ms`` after the stream began. A late wake-up (the server waiting
for a core, or for a slow client) delays the tokens that were due then, not every one after them.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = ["VOCAB", "create_app", "generate", "serve"]

VOCAB: Final[tuple[str, ...]] = (
    " the",
    " a",
    " of",
    " and",
    " to",
    " in",
    " is",
    " that",
    " it",
    " for",
    " with",
    " as",
    " on",
    " by",
    " we",
    " they",
    " this",
    " every",
    " over",
    " under",
    " model",
    " machine",
    " learning",
    " token",
    " stream",
    " worker",
    " queue",
    " message",
    " signal",
    " network",
    " data",
    " system",
    " river",
    " garden",
    " light",
    " quiet",
    " bright",
    " small",
    " new",
    " old",
    " fast",
    " slow",
    " time",
    " world",
    " story",
    " city",
    " morning",
    " night",
    ",",
    ".",
    "!",
    "?",
    ";",
    ":",
    "\n",
    '"',
    " café",
    " naïve",
    " Zürich",
    " 日本語",
    " 🙂",
    "—",
    " über",
)

DEFAULT_MAX_TOKENS: Final = 16
MAX_RECORDS: Final = 10_000
STALL_LIMIT_S: Final = 600.0

_VOCAB_BYTES: Final = tuple(token.encode() for token in VOCAB)
_TOKEN_IDS: Final = {token: index for index, token in enumerate(VOCAB)}
_DISCONNECT_POLL_S: Final = 0.05
_LIVE_STATES: Final = frozenset({"streaming", "stalled"})
_MALFORMED: Final = b'{"choices": [{"text": '
_SSE: Final = (b"data: ", b"\n\n")
_TGI_SSE: Final = (b"data:", b"\n\n")
_NDJSON: Final = (b"", b"\n")


# --- generation -------------------------------------------------------------------------------


def generate(context: str, max_tokens: int, stop: list[str] | None = None) -> tuple[list[str], str]:
    """Tokens that follow ``context`` and the finish reason, ``"length"`` or ``"stop"``."""
    state = hashlib.blake2b(context.encode())
    stops = [s for s in stop or () if s]
    tokens: list[str] = []
    text = ""
    for _ in range(max(0, max_tokens)):
        index = int.from_bytes(state.copy().digest()[:4], "big") % len(VOCAB)
        state.update(_VOCAB_BYTES[index])
        tokens.append(VOCAB[index])
        searched_to = len(text)
        text += VOCAB[index]
        cut = _find_stop(text, stops, searched_to)
        if cut is not None:
            return _cut_tokens(tokens, cut), "stop"
    return tokens, "length"


#: Requests whose output is kept for the next identical one (benchmarks send one prompt many
#: times): generating 200 tokens takes about 0.3 ms, spent before the first token is written.
_GENERATED_CACHE: Final = 64
_CACHE_LIMIT: Final = 4096  # characters of context, tokens of output: larger ones are not kept


@functools.lru_cache(maxsize=_GENERATED_CACHE)
def _cached(context: str, max_tokens: int, stop: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    tokens, finish = generate(context, max_tokens, list(stop))
    return tuple(tokens), finish


def _generated(context: str, max_tokens: int, stop: list[str]) -> tuple[list[str], str]:
    """``generate``, from a small cache when the request is small."""
    if len(context) > _CACHE_LIMIT or max_tokens > _CACHE_LIMIT:
        return generate(context, max_tokens, stop)
    tokens, finish = _cached(context, max_tokens, tuple(stop))
    return list(tokens), finish


def _find_stop(text: str, stops: list[str], searched_to: int) -> int | None:
    """Earliest stop position; only a match that reaches past ``searched_to`` can be new."""
    found = [pos for s in stops if (pos := text.find(s, max(0, searched_to - len(s) + 1))) >= 0]
    return min(found, default=None)


def _cut_tokens(tokens: list[str], length: int) -> list[str]:
    """The tokens spelling ``text[:length]``; a token straddling the cut keeps its head."""
    kept: list[str] = []
    for token in tokens:
        if length <= 0:
            break
        kept.append(token[:length])
        length -= len(token)
    return [token for token in kept if token]


# --- wire encoding ----------------------------------------------------------------------------


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


_VOCAB_JSON: Final = {token: _dumps(token) for token in VOCAB}


def _json_text(text: str) -> bytes:
    return _VOCAB_JSON.get(text) or _dumps(text)


class _Template:
    """A JSON event with holes, encoded once, so a token costs a join instead of a dumps.

    Holes are written as the strings ``"<name>"`` in a constant shape; per-request values are
    bound once and per-token values rendered. No client data is in the shape, so it can never
    forge a hole.
    """

    _HOLE = re.compile(rb'"<(\w+)>"')

    def __init__(self, pieces: tuple[bytes | str, ...]) -> None:
        self.pieces = pieces

    @classmethod
    def compile(cls, shape: Mapping[str, Any], framing: tuple[bytes, bytes]) -> _Template:
        parts = cls._HOLE.split(framing[0] + _dumps(shape) + framing[1])
        # re.split with one group alternates literal text and hole names.
        return cls(tuple(p.decode() if k % 2 else p for k, p in enumerate(parts)))

    def bind(self, values: Mapping[str, bytes]) -> _Template:
        merged: list[bytes | str] = []
        for piece in self.pieces:
            value = values.get(piece, piece) if isinstance(piece, str) else piece
            if isinstance(value, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += value
            else:
                merged.append(value)
        return _Template(tuple(merged))

    def render(self, **values: bytes) -> bytes:
        return b"".join(p if isinstance(p, bytes) else values[p] for p in self.pieces)


# --- requests, faults and records -------------------------------------------------------------


class _BadRequest(Exception):
    """The request cannot be served; answered with a 400."""


class _DropConnection(Exception):
    """Raised after the response started, so that uvicorn closes the connection mid-body."""


class _HideDrops(logging.Filter):
    """uvicorn logs the drop fault's deliberate exception as an application error; hide it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BaseExceptionGroup):
            return exc.split(_DropConnection)[1] is not None
        return not isinstance(exc, _DropConnection)


_HIDE_DROPS: Final = _HideDrops()


@dataclass(frozen=True, slots=True)
class _Faults:
    delay_ms: float | None = None
    burst: int = 1
    status: int | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    fail_times: int | None = None
    error_after: int | None = None
    drop_after: int | None = None
    stall_after: int | None = None
    malformed_after: int | None = None
    stamp: bool = False
    ping: bool = False

    def ending_at(self, position: int) -> str | None:
        """The fault that ends a stream before token ``position``, if any."""
        for name in ("error", "drop", "stall"):
            if getattr(self, f"{name}_after") == position:
                return name
        return None

    def first(self, count: int) -> tuple[str, int] | None:
        """The earliest fault within ``count`` tokens, as (name, position)."""
        hits = [
            (position, rank, name)
            for rank, name in enumerate(("error", "drop", "stall", "malformed"))
            if (position := getattr(self, f"{name}_after")) is not None and position <= count
        ]
        if not hits:
            return None
        position, _, name = min(hits)
        return name, position


def _parse_faults(model: str) -> _Faults:
    raw = dict(parse_qsl(model.partition("?")[2]))
    try:
        return _Faults(
            delay_ms=_number(raw, "delay_ms"),
            burst=max(1, _integer(raw, "burst") or 1),
            status=_status(raw),
            retry_after=raw["retry_after"] if _number(raw, "retry_after") is not None else None,
            retry_after_ms=(
                raw["retry_after_ms"] if _number(raw, "retry_after_ms") is not None else None
            ),
            fail_times=_integer(raw, "fail_times"),
            error_after=_integer(raw, "error_after"),
            drop_after=_integer(raw, "drop_after"),
            stall_after=_integer(raw, "stall_after"),
            malformed_after=_integer(raw, "malformed_after"),
            stamp=raw.get("stamp", "0") not in ("0", "false"),
            ping=raw.get("ping", "0") not in ("0", "false"),
        )
    except ValueError as exc:
        raise _BadRequest(f"mock upstream: bad fault parameter: {exc}") from None


def _number(raw: Mapping[str, str], name: str) -> float | None:
    if name not in raw:
        return None
    value = float(raw[name])
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={raw[name]}")
    return value


def _integer(raw: Mapping[str, str], name: str) -> int | None:
    if name not in raw:
        return None
    value = int(raw[name])
    if value < 0:
        raise ValueError(f"{name}={raw[name]}")
    return value


def _status(raw: Mapping[str, str]) -> int | None:
    status = _integer(raw, "status")
    if status is not None and not 400 <= status <= 599:
        raise ValueError(f"status={status} (must be 400-599)")
    return status


@dataclass(frozen=True, slots=True)
class _Params:
    """What a request asks for, whatever its dialect."""

    model: str
    context: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True, slots=True)
class _Call:
    params: _Params
    faults: _Faults
    id: str
    created: int
    delay_s: float

    @property
    def model(self) -> str:
        return self.params.model

    @property
    def fields(self) -> dict[str, bytes]:
        """The per-request values of token templates."""
        return {
            "id": _dumps(self.id),
            "created": str(self.created).encode(),
            "model": _dumps(self.params.model),
        }


@dataclass(frozen=True, slots=True)
class _Outcome:
    text: str
    count: int
    finish: str
    prompt_tokens: int

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.count,
            "total_tokens": self.prompt_tokens + self.count,
        }


@dataclass(slots=True)
class _Record:
    id: str
    path: str
    model: str
    prompt_head: str
    tokens_sent: int = 0
    state: str = "streaming"
    authorized: bool = True
    client: str = ""  # the client's address and port: one per connection


# --- request bodies ---------------------------------------------------------------------------


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        return ""
    if not isinstance(model, str):
        raise _BadRequest("model must be a string")
    return model


def _prompt(value: object, name: str) -> str:
    # OpenAI also accepts a one-element list of prompts.
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadRequest(f"{name} must be a string")
    return value


def _max_tokens(value: object) -> int:
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise _BadRequest("the token limit must be an integer")
    # Ollama uses -1 for "no limit"; a mock has to stop somewhere.
    return int(value) if value >= 0 else DEFAULT_MAX_TOKENS


def _stops(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise _BadRequest("stop must be a string or a list of strings")


def _options(body: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _BadRequest(f"{name} must be an object")
    return value


def _content(message: object) -> str:
    if not isinstance(message, Mapping):
        raise _BadRequest("each message must be an object")
    content = message.get("content")
    # Content may also be a list of parts; only text parts carry text.
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return _prompt(content, "message content")


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise _BadRequest("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    return body


# --- dialects ---------------------------------------------------------------------------------


def _token_id(text: str) -> bytes:
    return str(_TOKEN_IDS.get(text, 0)).encode()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _Dialect:
    """One API's wire format. Subclasses fill in parsing and the events around the tokens."""

    paths: tuple[str, ...] = ()
    framing: tuple[bytes, bytes] = _SSE
    media_type = "text/event-stream"
    ping = b": ping\n\n"
    id_prefix = ""
    token_template: _Template

    def parse(self, body: Mapping[str, Any], path: str) -> _Params:
        raise NotImplementedError

    def head(self, call: _Call) -> list[bytes]:
        return []

    def bind(self, call: _Call) -> _Template:
        return self.token_template.bind(call.fields)

    def token(self, bound: _Template, index: int, text: str, final: _Outcome | None) -> bytes:
        """One token's event; ``final`` is given with the last token."""
        return bound.render(text=_json_text(text))

    def tail(self, call: _Call, out: _Outcome) -> list[bytes]:
        raise NotImplementedError

    def body(self, call: _Call, out: _Outcome) -> dict[str, Any]:
        raise NotImplementedError

    def frame(self, payload: bytes) -> bytes:
        return self.framing[0] + payload + self.framing[1]

    def event(self, obj: object) -> bytes:
        return self.frame(_dumps(obj))

    def error(self, message: str) -> bytes:
        return self.event({"error": {"message": message, "type": "server_error"}})


class _Together(_Dialect):
    paths = ("/inference",)
    token_template = _Template.compile(
        {
            "choices": [{"text": "<text>"}],
            "result_type": "language-model-inference",
            "id": "<id>",
            "token": {"id": "<tid>", "text": "<text>", "logprob": -0.5, "special": False},
            "generated_text": None,
            "details": None,
            "stats": None,
            "usage": None,
        },
        _SSE,
    )

    def parse(self, body: Mapping[str, Any], path: str) -> _Params:
        return _Params(
            model=_model(body),
            context=_prompt(body.get("prompt"), "prompt"),
            max_tokens=_max_tokens(body.get("max_tokens")),
            stop=_stops(body.get("stop")),
            stream=bool(body.get("stream_tokens")),
        )

    def token(self, bound: _Template, index: int, text: str, final: _Outcome | None) -> bytes:
        return bound.render(text=_json_text(text), tid=_token_id(text))

    def tail(self, call: _Call, out: _Outcome) -> list[bytes]:
        finish = {
            "choices": [{"text": "", "finish_reason": out.finish}],
            "result_type": "language-model-inference",
            "id": call.id,
            "generated_text": out.text,
            "usage": out.usage,
        }
        return [self.event(finish), self.frame(b"[DONE]")]

    def body(self, call: _Call, out: _Outcome) -> dict[str, Any]:
        choices = [{"text": out.text, "finish_reason": out.finish, "index": 0}]
        return {
            "id": call.id,
            "status": "finished",
            "model": call.model,
            "prompt": [call.params.context],
            "output": {
                "choices": choices,
                "result_type": "language-model-inference",
                "usage": out.usage,
            },
            "choices": choices,
            "usage": out.usage,
        }


class _OpenAI(_Dialect):
    """What OpenAI's completions and chat completions share."""

    object_name = ""
    chunk_name = ""

    def parse(self, body: Mapping[str, Any], path: str) -> _Params:
        return _Params(
            model=_model(body),
            context=self.context(body),
            max_tokens=_max_tokens(self.limit(body)),
            stop=_stops(body.get("stop")),
            stream=bool(body.get("stream")),
            include_usage=_options(body, "stream_options").get("include_usage") is True,
        )

    def context(self, body: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def limit(self, body: Mapping[str, Any]) -> object:
        return body.get("max_tokens")

    def choice(self, out: _Outcome | None, finish: str | None) -> dict[str, Any]:
        """The choice object: the finish chunk's with ``out`` None, else the whole answer's."""
        raise NotImplementedError

    def chunk(self, call: _Call, choices: list[dict[str, Any]], usage: object = None) -> bytes:
        return self.event(
            {
                "id": call.id,
                "object": self.chunk_name,
                "created": call.created,
                "model": call.model,
                "choices": choices,
                "usage": usage,
            }
        )

    def tail(self, call: _Call, out: _Outcome) -> list[bytes]:
        events = [self.chunk(call, [self.choice(None, out.finish)])]
        if call.params.include_usage:
            events.append(self.chunk(call, [], out.usage))
        return [*events, self.frame(b"[DONE]")]

    def body(self, call: _Call, out: _Outcome) -> dict[str, Any]:
        return {
            "id": call.id,
            "object": self.object_name,
            "created": call.created,
            "model": call.model,
            "choices": [self.choice(out, out.finish)],
            "usage": out.usage,
        }


class _Completions(_OpenAI):
    paths = ("/v1/completions",)
    id_prefix = "cmpl-"
    object_name = chunk_name = "text_completion"
    token_template = _Template.compile(
        {
            "id": "<id>",
            "object": "text_completion",
            "created": "<created>",
            "model": "<model>",
            "choices": [{"index": 0, "text": "<text>", "logprobs": None, "finish_reason": None}],
            "usage": None,
        },
        _SSE,
    )

    def context(self, body: Mapping[str, Any]) -> str:
        return _prompt(body.get("prompt"), "prompt")

    def choice(self, out: _Outcome | None, finish: str | None) -> dict[str, Any]:
        text = out.text if out else ""
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


class _Chat(_OpenAI):
    paths = ("/v1/chat/completions",)
    id_prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    token_template = _Template.compile(
        {
            "id": "<id>",
            "object": "chat.completion.chunk",
            "created": "<created>",
            "model": "<model>",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "<text>"},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "usage": None,
        },
        _SSE,
    )

    def context(self, body: Mapping[str, Any]) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise _BadRequest("messages must be a list")
        return "".join(_content(message) for message in messages)

    def limit(self, body: Mapping[str, Any]) -> object:
        newer = body.get("max_completion_tokens")
        return body.get("max_tokens") if newer is None else newer

    def head(self, call: _Call) -> list[bytes]:
        delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return [self.chunk(call, [choice])]

    def choice(self, out: _Outcome | None, finish: str | None) -> dict[str, Any]:
        if out is None:
            return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
        message = {"role": "assistant", "content": out.text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}


class _Tgi(_Dialect):
    paths = ("/generate_stream", "/generate")
    framing = _TGI_SSE
    token_template = _Template.compile(
        {
            "index": "<index>",
            "token": {"id": "<tid>", "text": "<text>", "logprob": -0.5, "special": False},
            "generated_text": None,
            "details": None,
        },
        _TGI_SSE,
    )

    def parse(self, body: Mapping[str, Any], path: str) -> _Params:
        parameters = _options(body, "parameters")
        return _Params(
            model=_model(body),
            context=_prompt(body.get("inputs"), "inputs"),
            max_tokens=_max_tokens(parameters.get("max_new_tokens")),
            stop=_stops(parameters.get("stop")),
            stream=path == "/generate_stream",
        )

    def token(self, bound: _Template, index: int, text: str, final: _Outcome | None) -> bytes:
        # TGI counts tokens from 1.
        if final is None:
            return bound.render(
                index=str(index + 1).encode(), tid=_token_id(text), text=_json_text(text)
            )
        token = {"id": _TOKEN_IDS.get(text, 0), "text": text, "logprob": -0.5, "special": False}
        return self.last_event(index + 1, token, final)

    def last_event(self, index: int, token: dict[str, Any], out: _Outcome) -> bytes:
        return self.event(
            {
                "index": index,
                "token": token,
                "generated_text": out.text,
                "details": self.details(out),
            }
        )

    def details(self, out: _Outcome) -> dict[str, Any]:
        finish = "stop_sequence" if out.finish == "stop" else out.finish
        return {"finish_reason": finish, "generated_tokens": out.count, "seed": None}

    def tail(self, call: _Call, out: _Outcome) -> list[bytes]:
        if out.count:
            return []  # the last token's event already carried the details
        # With no token at all, TGI still ends with one (special, empty) token event.
        token = {"id": 0, "text": "", "logprob": 0.0, "special": True}
        return [self.last_event(1, token, out)]

    def body(self, call: _Call, out: _Outcome) -> dict[str, Any]:
        return {"generated_text": out.text, "details": self.details(out)}


class _Ollama(_Dialect):
    paths = ("/api/generate",)
    framing = _NDJSON
    media_type = "application/x-ndjson"
    ping = b""  # NDJSON has no comments
    token_template = _Template.compile(
        {"model": "<model>", "created_at": "<ts>", "response": "<text>", "done": False}, _NDJSON
    )

    def parse(self, body: Mapping[str, Any], path: str) -> _Params:
        options = _options(body, "options")
        return _Params(
            model=_model(body),
            context=_prompt(body.get("prompt"), "prompt"),
            max_tokens=_max_tokens(options.get("num_predict")),
            stop=_stops(options.get("stop")),
            stream=body.get("stream") is not False,
        )

    def token(self, bound: _Template, index: int, text: str, final: _Outcome | None) -> bytes:
        return bound.render(ts=_dumps(_now_iso()), text=_json_text(text))

    def tail(self, call: _Call, out: _Outcome) -> list[bytes]:
        return [self.event(self.done(call, out, ""))]

    def body(self, call: _Call, out: _Outcome) -> dict[str, Any]:
        return self.done(call, out, out.text)

    def done(self, call: _Call, out: _Outcome, response: str) -> dict[str, Any]:
        return {
            "model": call.model,
            "created_at": _now_iso(),
            "response": response,
            "done": True,
            "done_reason": out.finish,
            "prompt_eval_count": out.prompt_tokens,
            "eval_count": out.count,
        }


_DIALECTS: Final[tuple[_Dialect, ...]] = (_Together(), _Completions(), _Chat(), _Tgi(), _Ollama())


# --- responses --------------------------------------------------------------------------------


def _error_response(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    error = {"message": message, "type": kind, "param": None, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _unauthorized() -> JSONResponse:
    # Never echo the key the client sent.
    return _error_response(
        401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
    )


def _status_fault(faults: _Faults) -> JSONResponse:
    status = faults.status or 500
    kind, code = {
        401: ("invalid_request_error", "invalid_api_key"),
        403: ("permission_error", None),
        404: ("invalid_request_error", "model_not_found"),
        429: ("requests", "rate_limit_exceeded"),
    }.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    headers = {}
    if faults.retry_after is not None:
        headers["retry-after"] = faults.retry_after
    if faults.retry_after_ms is not None:
        headers["retry-after-ms"] = faults.retry_after_ms
    return _error_response(status, f"mock upstream: status {status}", kind, code, headers)


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that always closes its generator when the response ends.

    Starlette cancels a stream when the client goes away, but a generator suspended at ``yield``
    (waiting for a slow client) would only be closed when garbage-collected; closing it here makes
    its bookkeeping run at once.
    """

    def __init__(
        self,
        content: AsyncGenerator[bytes, None],
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._content.aclose()


async def _wait_for_disconnect(request: Request, limit_s: float) -> bool:
    """Wait until the client goes away (True) or ``limit_s`` passes (False)."""
    # Polling works whether or not the server also cancels the stream on disconnect.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        if await request.is_disconnected():
            return True
        await asyncio.sleep(_DISCONNECT_POLL_S)
    return False


class _Op(enum.Enum):
    FLUSH = "flush"
    DROP = "drop"
    STALL = "stall"


# A step of a stream: an event to write, a pause in seconds, or an operation.
_Step = bytes | float | _Op


class _Chunker:
    """Groups events so that ``burst`` of them go out in one HTTP chunk."""

    def __init__(self, burst: int) -> None:
        self.burst = burst
        self.parts: list[bytes] = []

    def add(self, event: bytes) -> bytes | None:
        self.parts.append(event)
        return self.flush() if len(self.parts) >= self.burst else None

    def flush(self) -> bytes | None:
        if not self.parts:
            return None
        chunk = b"".join(self.parts)
        self.parts.clear()
        return chunk


class _Stream:
    """One streamed response: ``steps`` plans the events and faults, ``body`` performs them."""

    def __init__(
        self,
        call: _Call,
        dialect: _Dialect,
        tokens: list[str],
        finish: str,
        record: _Record,
        request: Request,
    ) -> None:
        self.call, self.dialect, self.tokens, self.finish = call, dialect, tokens, finish
        self.record, self.request = record, request
        self.bound = dialect.bind(call)
        self.chunker = _Chunker(call.faults.burst)
        self.sent: list[str] = []
        self.malformed = False
        self.due: float | None = None  # when the next pause ends, on the event loop's clock

    async def body(self) -> AsyncGenerator[bytes, None]:
        try:
            for step in self.steps():
                chunk = await self.perform(step)
                if chunk:
                    yield chunk
                    if self.call.delay_s <= 0:
                        await asyncio.sleep(0)  # let other streams and disconnects through
        except (asyncio.CancelledError, GeneratorExit):
            # Starlette cancels the stream, or the response closes it, when the client leaves.
            if self.record.state in _LIVE_STATES:
                self.record.state = "disconnected"
            raise

    async def perform(self, step: _Step) -> bytes | None:
        if isinstance(step, bytes):
            return self.chunker.add(step)
        if isinstance(step, float):
            # Due ``step`` after the last pause was due, not after it ended (a steady cadence).
            loop = asyncio.get_running_loop()
            self.due = (self.due or loop.time()) + step
            await asyncio.sleep(self.due - loop.time())
            return None
        if step is _Op.FLUSH:
            return self.chunker.flush()
        if step is _Op.DROP:
            raise _DropConnection
        if await _wait_for_disconnect(self.request, STALL_LIMIT_S):
            self.record.state = "disconnected"
        return None

    def steps(self) -> Iterator[_Step]:
        # Record states change on resumption, i.e. once the previous step's chunk was written.
        faults = self.call.faults
        yield from self.dialect.head(self.call)
        for position in range(len(self.tokens) + 1):
            ending = faults.ending_at(position)
            if ending is not None:
                yield from self.end_early(ending, position)
                return
            if position == faults.malformed_after:
                self.malformed = True
                yield self.dialect.frame(_MALFORMED)
            if position < len(self.tokens):
                yield from self.token(position)
        yield from self.dialect.tail(self.call, self.outcome())
        yield _Op.FLUSH
        self.record.state = "malformed" if self.malformed else "completed"

    def token(self, index: int) -> Iterator[_Step]:
        if self.call.delay_s > 0:
            yield self.call.delay_s
        if self.call.faults.ping and self.dialect.ping:
            yield self.dialect.ping
        # The stamp is taken as late as possible: right before the event is written.
        text = f"|{index}:{time.time_ns()}" if self.call.faults.stamp else self.tokens[index]
        self.sent.append(text)
        final = self.outcome() if index == len(self.tokens) - 1 else None
        self.record.tokens_sent += 1
        yield self.dialect.token(self.bound, index, text, final)

    def end_early(self, ending: str, position: int) -> Iterator[_Step]:
        if ending == "error":
            yield self.dialect.error(f"mock upstream error after {position} tokens")
        yield _Op.FLUSH
        self.record.state = {"error": "error", "drop": "dropped", "stall": "stalled"}[ending]
        if ending == "drop":
            yield _Op.DROP
        elif ending == "stall":
            yield _Op.STALL

    def outcome(self) -> _Outcome:
        prompt_tokens = max(1, len(self.call.params.context.split()))
        return _Outcome("".join(self.sent), len(self.sent), self.finish, prompt_tokens)


# --- the app ----------------------------------------------------------------------------------


class _Upstream:
    """The app's state: default pace, API key, request records and fail_times counters."""

    def __init__(self, delay_ms: float, api_key: str | None) -> None:
        self.delay_ms = delay_ms
        self.api_key = api_key
        self.records: deque[_Record] = deque(maxlen=MAX_RECORDS)
        self.failures: dict[tuple[str, str, str], int] = {}

    def routes(self) -> list[Route]:
        routes = [
            Route(path, self.endpoint(dialect), methods=["POST"])
            for dialect in _DIALECTS
            for path in dialect.paths
        ]
        return [
            *routes,
            Route("/_stats", self.stats, methods=["GET"]),
            Route("/_reset", self.reset, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
        ]

    def endpoint(self, dialect: _Dialect) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            return await self.serve(request, dialect)

        return handle

    async def stats(self, request: Request) -> Response:
        return JSONResponse({"requests": [asdict(record) for record in self.records]})

    async def reset(self, request: Request) -> Response:
        self.records.clear()
        self.failures.clear()
        return JSONResponse({"ok": True})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True}) if self.authorized(request) else _unauthorized()

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    def remember(self, record: _Record) -> _Record:
        self.records.append(record)
        return record

    async def serve(self, request: Request, dialect: _Dialect) -> Response:
        authorized = self.authorized(request)
        call_id = dialect.id_prefix + uuid.uuid4().hex
        path = request.url.path
        try:
            params = dialect.parse(await _json_body(request), path)
        except _BadRequest as exc:
            self.remember(_Record(call_id, path, "", "", state="failed", authorized=authorized))
            return _unauthorized() if not authorized else _bad_request(exc)
        peer = request.client
        record = self.remember(
            _Record(
                call_id,
                path,
                params.model,
                params.context[:200],
                authorized=authorized,
                client=f"{peer.host}:{peer.port}" if peer else "",
            )
        )
        if not authorized:
            record.state = "failed"
            return _unauthorized()
        try:
            faults = _parse_faults(params.model)
        except _BadRequest as exc:
            record.state = "failed"
            return _bad_request(exc)
        if self.should_fail(path, params, faults):
            record.state = "failed"
            return _status_fault(faults)
        delay_ms = self.delay_ms if faults.delay_ms is None else faults.delay_ms
        call = _Call(params, faults, call_id, int(time.time()), delay_ms / 1000)
        return await self.respond(call, dialect, record, request)

    def should_fail(self, path: str, params: _Params, faults: _Faults) -> bool:
        if faults.status is None:
            return False
        if faults.fail_times is None:
            return True
        key = (path, params.model, params.context)
        seen = self.failures.pop(key, 0) + 1
        self.failures[key] = seen  # re-inserted, so the dict is ordered by last use
        if len(self.failures) > MAX_RECORDS:
            del self.failures[next(iter(self.failures))]
        return seen <= faults.fail_times

    async def respond(
        self, call: _Call, dialect: _Dialect, record: _Record, request: Request
    ) -> Response:
        tokens, finish = _generated(call.params.context, call.params.max_tokens, call.params.stop)
        if call.params.stream:
            stream = _Stream(call, dialect, tokens, finish, record, request)
            return _ClosingStream(
                stream.body(), dialect.media_type, headers={"cache-control": "no-cache"}
            )
        return await _answer(call, dialect, tokens, finish, record, request)


def _bad_request(exc: _BadRequest) -> JSONResponse:
    return _error_response(400, str(exc), "invalid_request_error")


async def _answer(
    call: _Call,
    dialect: _Dialect,
    tokens: list[str],
    finish: str,
    record: _Record,
    request: Request,
) -> Response:
    """A non-streamed answer, with the faults that make sense without a stream."""
    fault = call.faults.first(len(tokens))
    produced = len(tokens) if fault is None else fault[1]
    if call.delay_s > 0:
        await asyncio.sleep(call.delay_s * produced)
    if call.faults.stamp:
        tokens = [f"|{index}:{time.time_ns()}" for index in range(len(tokens))]
    record.tokens_sent = produced
    prompt_tokens = max(1, len(call.params.context.split()))
    body = dialect.body(call, _Outcome("".join(tokens), len(tokens), finish, prompt_tokens))
    if fault is None:
        record.state = "completed"
        return JSONResponse(body)
    return await _answer_fault(fault, body, record, request)


async def _answer_fault(
    fault: tuple[str, int], body: dict[str, Any], record: _Record, request: Request
) -> Response:
    name, position = fault
    record.state = {"error": "error", "drop": "dropped", "stall": "stalled"}.get(name, name)
    if name == "error":
        message = f"mock upstream error after {position} tokens"
        return _error_response(500, message, "server_error")
    if name == "malformed":
        return Response(_MALFORMED, media_type="application/json")
    if name == "drop":
        encoded = _dumps(body)
        headers = {"content-length": str(len(encoded))}
        return _ClosingStream(_half_then_drop(encoded), "application/json", headers=headers)
    if await _wait_for_disconnect(request, STALL_LIMIT_S):
        record.state = "disconnected"
    return _error_response(504, "mock upstream: stalled", "server_error")


async def _half_then_drop(body: bytes) -> AsyncGenerator[bytes, None]:
    # The declared Content-Length tells the client the body was cut short.
    yield body[: len(body) // 2]
    raise _DropConnection


def create_app(delay_ms: float = 0.0, api_key: str | None = None) -> Starlette:
    """The mock upstream app; ``delay_ms`` is the default time between tokens."""
    logging.getLogger("uvicorn.error").addFilter(_HIDE_DROPS)
    return Starlette(routes=_Upstream(delay_ms, api_key).routes())


def serve(
    host: str = "127.0.0.1",
    port: int = 8001,
    delay_ms: float = 0.0,
    api_key: str | None = None,
) -> None:
    """Run the mock upstream under uvicorn until interrupted."""
    app = create_app(delay_ms=delay_ms, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    serve()

"""Together- and OpenAI-compatible request and response shapes, pure: no I/O here.

Requests are translated into job requests (``producer.spec`` validates them); a job's events are
rendered as the chunks each API streams, and its whole output as each API's non-streamed answer.
Unknown request fields are ignored and ``null`` means unset, as real clients send them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any, Final

from producer.protocol import Event
from producer.spec import InvalidJob

#: The fields a job request takes from each API's body (the rest are ignored).
_SAMPLING = ("model", "max_tokens", "stop", "temperature", "top_p", "top_k", "repetition_penalty")


def _pick(body: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: body[name] for name in names if body.get(name) is not None}


def together_request(body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Together ``POST /inference``: the job request and whether to stream."""
    return {**_pick(body, (*_SAMPLING, "prompt")), "prompt": body.get("prompt")}, _flag(
        body, "stream_tokens"
    )


def completions_request(body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """OpenAI ``POST /v1/completions``."""
    _check_n(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidJob("prompt", "must be a string or a list of exactly one string")
        prompt = prompt[0]
    return {**_pick(body, _SAMPLING), "prompt": prompt}, _flag(body, "stream")


def chat_request(body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """OpenAI ``POST /v1/chat/completions``."""
    _check_n(body)
    request = _pick(body, _SAMPLING)
    if body.get("max_completion_tokens") is not None:
        request["max_tokens"] = body["max_completion_tokens"]
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidJob("messages", "must be a non-empty list of {role, content} objects")
    request["messages"] = [_chat_message(i, m) for i, m in enumerate(messages)]
    return request, _flag(body, "stream")


def _chat_message(index: int, message: object) -> object:
    if not isinstance(message, Mapping):
        return message  # the job's validation names it
    content = message.get("content")
    if isinstance(content, list):
        # Content parts: only text parts can be sent to a text model.
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise InvalidJob(f"messages[{index}].content", "only text parts are supported")
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    elif content is None:
        content = ""
    return {"role": message.get("role"), "content": content}


def _check_n(body: Mapping[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise InvalidJob("n", "only n=1 is supported")


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidJob(name, "must be true or false")
    return value


def include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def _dumps(obj: object) -> bytes:
    # backslashreplace writes a lone surrogate as its JSON escape instead of failing.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "backslashreplace"
    )


def _string(text: str) -> bytes:
    """``_dumps(text)`` for a string: the same escaping, without building an encoder."""
    return encode_basestring(text).encode("utf-8", "backslashreplace")


#: Stands for the token's text in a chunk made once per job (private-use characters).
_TEXT_MARK: Final = "\ue000tokenrelay-text\ue001"


@dataclass
class Outcome:
    """How a job ended, as the compatibility APIs report it."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    tokens: int = 0

    @classmethod
    def of(cls, text: str, done: Event, tokens: int) -> Outcome:
        usage = done.fields.get("usage")
        return cls(text, done.fields.get("finish_reason") or "stop", usage, tokens)

    def usage_or_count(self, prompt_tokens: int = 0) -> dict[str, Any]:
        if self.usage:
            return dict(self.usage)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": prompt_tokens + self.tokens,
        }


@dataclass
class Format:
    """One API's chunks and answer for one job."""

    job_id: str
    model: str
    usage_chunk: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    _token_parts: tuple[bytes, ...] | None = field(default=None, init=False, repr=False)

    def first(self) -> list[bytes]:
        """Payloads sent before the first token."""
        return []

    def token(self, text: str) -> bytes:
        """One token's chunk: ``token_chunk``'s bytes, from a template made once per job, since
        only the text changes from token to token."""
        if self._token_parts is None:
            whole, mark = self.token_chunk(_TEXT_MARK), _string(_TEXT_MARK)
            self._token_parts = tuple(whole.split(mark)) if whole.count(mark) == 1 else ()
        if not self._token_parts:  # the mark was somewhere else too (in the model's name)
            return self.token_chunk(text)
        head, tail = self._token_parts
        return head + _string(text) + tail

    def token_chunk(self, text: str) -> bytes:
        raise NotImplementedError

    def finish(self, outcome: Outcome) -> list[bytes]:
        raise NotImplementedError

    def answer(self, outcome: Outcome) -> dict[str, Any]:
        raise NotImplementedError


class TogetherFormat(Format):
    """Together's legacy ``/inference`` shapes."""

    def token_chunk(self, text: str) -> bytes:
        return _dumps(
            {
                "choices": [{"text": text}],
                "result_type": "language-model-inference",
                "id": self.job_id,
            }
        )

    def finish(self, outcome: Outcome) -> list[bytes]:
        return [
            _dumps(
                {
                    "choices": [{"text": "", "finish_reason": outcome.finish_reason}],
                    "result_type": "language-model-inference",
                    "id": self.job_id,
                    "usage": outcome.usage_or_count(),
                }
            )
        ]

    def answer(self, outcome: Outcome) -> dict[str, Any]:
        choices = [{"text": outcome.text, "finish_reason": outcome.finish_reason, "index": 0}]
        usage = outcome.usage_or_count()
        return {
            "id": self.job_id,
            "status": "finished",
            "model": self.model,
            "output": {
                "choices": choices,
                "result_type": "language-model-inference",
                "usage": usage,
            },
            "choices": choices,
            "usage": usage,
        }


class CompletionsFormat(Format):
    """OpenAI ``text_completion`` chunks and answer."""

    object_name = "text_completion"
    id_prefix = "cmpl-"

    @property
    def id(self) -> str:
        return self.id_prefix + self.job_id

    def chunk(self, choices: list[dict[str, Any]], usage: object = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.usage_chunk:
            body["usage"] = usage
        return _dumps(body)

    def choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def token_chunk(self, text: str) -> bytes:
        return self.chunk([self.choice(text, None)])

    def finish(self, outcome: Outcome) -> list[bytes]:
        chunks = [self.chunk([self.choice(None, outcome.finish_reason)])]
        if self.usage_chunk:
            chunks.append(self.chunk([], outcome.usage_or_count()))
        return chunks

    def answer(self, outcome: Outcome) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": [self.choice(outcome.text, outcome.finish_reason)],
            "usage": outcome.usage_or_count(),
        }


class ChatFormat(CompletionsFormat):
    """OpenAI ``chat.completion.chunk`` chunks and ``chat.completion`` answer."""

    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def first(self) -> list[bytes]:
        role = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [self.chunk([role])]

    def answer(self, outcome: Outcome) -> dict[str, Any]:
        message = {"role": "assistant", "content": outcome.text}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": outcome.finish_reason,
                }
            ],
            "usage": outcome.usage_or_count(),
        }


def error_body(
    message: str,
    kind: str,
    *,
    param: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """The error object both APIs use: ``{"error": {"message", "type", "param", "code"}}``."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if param is not None:
        param = param.encode("utf-8", "backslashreplace").decode("utf-8")
    error: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def error_payload(event: Event) -> bytes:
    """A job's ``error`` (or ``cancelled``) event as a mid-stream error object."""
    code = str(event.fields.get("code", event.type))
    message = str(event.fields.get("message", f"the job was {event.type}"))
    return _dumps(error_body(message, _error_type(code), code=code, request_id=event.job))


def _error_type(code: str) -> str:
    if code == "invalid_job":
        return "invalid_request_error"
    if code in ("cancelled", "deadline_exceeded", "upstream_timeout"):
        return "timeout_error" if code != "cancelled" else "cancelled"
    return "server_error"


def http_status_of(event: Event) -> int:
    """The HTTP status for a job that failed before its first token."""
    code = event.fields.get("code")
    status = event.fields.get("status")
    if code == "invalid_job":
        return 400
    if status == 429:
        return 429
    if code in ("upstream_timeout", "deadline_exceeded"):
        return 504
    if code == "too_many_attempts":
        return 503
    if event.type == "cancelled":
        return 409
    return 502

"""OpenAI-compatible ``POST /v1/chat/completions`` with ``stream: true``.

Chunks carry ``choices[0].delta.content``; the first may hold only a ``role``, content may be
``null``, and with ``include_usage`` a last chunk has ``choices: []`` and the usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.spec import JobSpec
from worker.dialects.base import (
    DONE,
    Continuation,
    Delta,
    Dialect,
    finish_field,
    first_choice,
    load_object,
    sampling,
    text_field,
    usage_of,
)
from worker.errors import UpstreamProtocolError


def build(spec: JobSpec, done: Continuation) -> dict[str, Any]:
    messages = [{"role": m.role, "content": m.content} for m in spec.chat_messages]
    if done.text:
        # An assistant prefill: the model goes on from the text already delivered.
        messages.append({"role": "assistant", "content": done.text})
    body: dict[str, Any] = {
        "model": spec.model,
        "messages": messages,
        "max_tokens": spec.max_tokens - done.tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.stop:
        body["stop"] = list(spec.stop)
    body.update(sampling(spec))
    return body


def parse(data: str) -> Delta:
    if data.strip() == "[DONE]":
        return DONE
    obj = load_object(data)
    choice = first_choice(obj)
    delta = choice.get("delta") or {}
    if not isinstance(delta, Mapping):
        raise UpstreamProtocolError("upstream sent a chat chunk whose delta is not an object")
    return Delta(
        text=text_field(delta.get("content"), "delta content"),
        finish_reason=finish_field(choice.get("finish_reason")),
        usage=usage_of(obj.get("usage")),
    )


DIALECT = Dialect("openai-chat", "/v1/chat/completions", build, parse)

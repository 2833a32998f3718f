"""Together's legacy ``POST /inference`` with ``"stream_tokens": true``.

Events: ``{"choices":[{"text": ...}], ...}`` per token, a last chunk with ``finish_reason`` and
``usage``, then ``[DONE]``.
"""

from __future__ import annotations

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


def build(spec: JobSpec, done: Continuation) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model,
        "prompt": spec.text_prompt + done.text,
        "max_tokens": spec.max_tokens - done.tokens,
        "stop": list(spec.stop),
        "stream_tokens": True,
    }
    body.update(sampling(spec))
    return body


def parse(data: str) -> Delta:
    if data.strip() == "[DONE]":
        return DONE
    obj = load_object(data)
    choice = first_choice(obj)
    return Delta(
        text=text_field(choice.get("text"), "text"),
        finish_reason=finish_field(choice.get("finish_reason")),
        usage=usage_of(obj.get("usage")),
    )


DIALECT = Dialect("together", "/inference", build, parse)

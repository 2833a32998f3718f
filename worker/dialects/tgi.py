"""Hugging Face Text Generation Inference ``POST /generate_stream``.

Each event carries ``token.text``; the last one also ``details.finish_reason``. No ``[DONE]``:
the stream ends when the server closes it after the event with ``details``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.spec import JobSpec
from worker.dialects.base import (
    Continuation,
    Delta,
    Dialect,
    count,
    finish_field,
    load_object,
    text_field,
)

_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def build(spec: JobSpec, done: Continuation) -> dict[str, Any]:
    parameters: dict[str, Any] = {"max_new_tokens": spec.max_tokens - done.tokens}
    if spec.stop:
        parameters["stop"] = list(spec.stop)
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        value = getattr(spec, name)
        if value is not None:
            parameters[name] = value
    return {"inputs": spec.text_prompt + done.text, "parameters": parameters, "stream": True}


def parse(data: str) -> Delta:
    obj = load_object(data)
    token = obj.get("token") or {}
    if not isinstance(token, Mapping):
        return Delta()
    text = "" if token.get("special") else text_field(token.get("text"), "token text")
    details = obj.get("details")
    if not isinstance(details, Mapping):
        return Delta(text=text)
    finish = finish_field(details.get("finish_reason")) or "stop"
    generated = count(details.get("generated_tokens"))
    usage = {"completion_tokens": generated} if generated is not None else None
    return Delta(text=text, finish_reason=_FINISH.get(finish, finish), usage=usage)


DIALECT = Dialect("tgi", "/generate_stream", build, parse, needs_done=False)

"""Ollama ``POST /api/generate``: newline-delimited JSON, one object per token, the last with
``"done": true``."""

from __future__ import annotations

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


def build(spec: JobSpec, done: Continuation) -> dict[str, Any]:
    options: dict[str, Any] = {"num_predict": spec.max_tokens - done.tokens}
    if spec.stop:
        options["stop"] = list(spec.stop)
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("repetition_penalty", "repeat_penalty"),
    ):
        value = getattr(spec, ours)
        if value is not None:
            options[theirs] = value
    return {
        "model": spec.model,
        "prompt": spec.text_prompt + done.text,
        "stream": True,
        "options": options,
    }


def parse(data: str) -> Delta:
    obj = load_object(data)
    text = text_field(obj.get("response"), "response")
    if not obj.get("done"):
        return Delta(text=text)
    prompt, completion = count(obj.get("prompt_eval_count")), count(obj.get("eval_count"))
    usage = None
    if prompt is not None and completion is not None:
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    finish = finish_field(obj.get("done_reason")) or "stop"
    return Delta(text=text, finish_reason=finish, usage=usage)


DIALECT = Dialect("ollama", "/api/generate", build, parse, framing="ndjson", needs_done=False)

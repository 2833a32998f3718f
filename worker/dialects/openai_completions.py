"""OpenAI-compatible ``POST /v1/completions`` with ``stream: true`` (OpenAI, Together ``/v1``,
vLLM, llama.cpp, LiteLLM)."""

from __future__ import annotations

from typing import Any

from producer.spec import JobSpec
from worker.dialects.base import Continuation, Dialect, sampling
from worker.dialects.together import parse


def build(spec: JobSpec, done: Continuation) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model,
        "prompt": spec.text_prompt + done.text,
        "max_tokens": spec.max_tokens - done.tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.stop:
        body["stop"] = list(spec.stop)
    body.update(sampling(spec))
    return body


# Completion chunks have the same shape as Together's legacy events: one parser serves both.
DIALECT = Dialect("openai-completions", "/v1/completions", build, parse)

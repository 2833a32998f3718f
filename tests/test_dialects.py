"""Dialect parsers against what real servers send, fed as raw byte chunks. Pure: no network."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest

from producer.spec import JobSpec
from worker import dialects
from worker.dialects import Continuation, Delta
from worker.errors import UpstreamDisconnected, UpstreamProtocolError, UpstreamStreamError
from worker.upstream import parse_stream, retry_after


def run(name: str, chunks: Iterable[bytes]) -> list[Delta]:
    return list(parse_stream(chunks, dialects.get(name)))


def text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def sse(*objects: object) -> bytes:
    out = b""
    for obj in objects:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        out += b"data: " + data.encode() + b"\n\n"
    return out


def together_chunk(text: str) -> dict[str, object]:
    return {"choices": [{"text": text}], "result_type": "language-model-inference", "id": "x"}


def test_together_stream_with_finish_chunk_and_usage() -> None:
    body = sse(
        together_chunk(" Alan"),
        together_chunk(" Turing"),
        {
            "choices": [{"text": "", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        },
        "[DONE]",
    )
    deltas = run("together", [body])
    assert text(deltas) == " Alan Turing"
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_ping_comments_data_without_space_and_crlf_are_tolerated() -> None:
    body = (
        b": ping\n\n"
        b'data:{"choices":[{"text":"a"}]}\r\n\r\n'
        b": ping - 2024-01-01\n"
        b'data: {"choices":[{"text":"b"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    assert text(run("together", [body])) == "ab"


def test_multibyte_utf8_split_across_reads_in_every_position() -> None:
    body = sse(together_chunk(" caf\u00e9 \u65e5\u672c \U0001f642"), "[DONE]")
    for size in (1, 2, 3, 5, 7):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert text(run("together", chunks)) == " caf\u00e9 \u65e5\u672c \U0001f642"


def test_finish_chunk_without_text() -> None:
    body = sse(together_chunk("x"), {"choices": [{"index": 0, "finish_reason": "stop"}]}, "[DONE]")
    deltas = run("openai-completions", [body])
    assert text(deltas) == "x" and deltas[-1].finish_reason == "stop"


def test_zero_filled_usage_on_every_chunk_keeps_the_final_one() -> None:
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    body = sse(
        {"choices": [{"index": 0, "text": "a"}], "usage": zero},
        {"choices": [{"index": 0, "text": "b"}], "usage": zero},
        {
            "choices": [{"index": 0}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        },
        "[DONE]",
    )
    usages = [d.usage for d in run("openai-completions", [body]) if d.usage]
    assert usages == [{"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}]


def test_chat_role_only_null_content_and_usage_chunk_with_no_choices() -> None:
    body = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
        "[DONE]",
    )
    deltas = run("openai-chat", [body])
    assert text(deltas) == "Hi there"
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
    assert deltas[-1].usage == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


@pytest.mark.parametrize("name", ["together", "openai-completions", "openai-chat"])
def test_error_object_mid_stream_is_an_upstream_error(name: str) -> None:
    body = sse(together_chunk("a"), {"error": {"message": "overloaded", "type": "server_error"}})
    with pytest.raises(UpstreamStreamError, match="overloaded"):
        run(name, [body])


@pytest.mark.parametrize("bad", ['{"choices": [{"text": ', "[1, 2]", '{"choices": "x"}'])
def test_malformed_event_is_a_protocol_error(bad: str) -> None:
    with pytest.raises(UpstreamProtocolError):
        run("together", [sse(together_chunk("a"), bad)])


def test_stream_that_ends_without_done_is_a_disconnect() -> None:
    with pytest.raises(UpstreamDisconnected):
        run("openai-chat", [sse({"choices": [{"index": 0, "delta": {"content": "a"}}]})])


def test_tgi_ends_at_eof_with_details() -> None:
    body = (
        b'data:{"index":1,"token":{"id":1,"text":" a","special":false},"generated_text":null}\n\n'
        b'data:{"index":2,"token":{"id":2,"text":"</s>","special":true},"generated_text":" a",'
        b'"details":{"finish_reason":"eos_token","generated_tokens":2}}\n\n'
    )
    deltas = run("tgi", [body])
    assert text(deltas) == " a" and deltas[-1].finish_reason == "stop"


def test_ollama_ndjson_split_mid_line() -> None:
    body = (
        b'{"model":"m","response":" Hel","done":false}\n'
        b'{"model":"m","response":"lo","done":false}\n'
        b'{"model":"m","response":"","done":true,"done_reason":"length","prompt_eval_count":2,'
        b'"eval_count":2}\n'
    )
    deltas = run("ollama", [body[:17], body[17:60], body[60:]])
    assert text(deltas) == " Hello"
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def spec(**extra: object) -> JobSpec:
    return JobSpec.from_dict(
        {"prompt": "Alan Turing was", "max_tokens": 10, **extra},
        default_model="m",
        default_dialect="together",
        max_prompt_bytes=1000,
    )


def test_together_request_is_the_seed_payload() -> None:
    body = dialects.get("together").build(
        spec(temperature=0.7, top_p=0.7, top_k=50, repetition_penalty=1.0, stop=["</s>"]),
        Continuation(),
    )
    assert body == {
        "model": "m",
        "prompt": "Alan Turing was",
        "max_tokens": 10,
        "stop": ["</s>"],
        "temperature": 0.7,
        "top_p": 0.7,
        "top_k": 50,
        "repetition_penalty": 1.0,
        "stream_tokens": True,
    }


def test_continuation_requests() -> None:
    done = Continuation(text=" a brilliant", tokens=2)
    completion = dialects.get("openai-completions").build(spec(), done)
    assert completion["prompt"] == "Alan Turing was a brilliant"
    assert completion["max_tokens"] == 8
    assert completion["stream_options"] == {"include_usage": True}
    chat = dialects.get("openai-chat").build(spec(), done)
    assert chat["messages"][-1] == {"role": "assistant", "content": " a brilliant"}


def test_retry_after_headers() -> None:
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None

"""Validation of job requests: every refusal names the field. Pure."""

from __future__ import annotations

from typing import Any

import pytest

from producer.spec import InvalidJob, JobSpec

LIMIT = 1024


def parse(**data: Any) -> JobSpec:
    return JobSpec.from_dict(
        data, default_model="m", default_dialect="together", max_prompt_bytes=LIMIT
    )


def test_defaults_and_round_trip() -> None:
    spec = parse(prompt="Alan Turing was", max_tokens=8, stop="\n")
    assert (spec.model, spec.dialect, spec.max_tokens, spec.stop) == ("m", "together", 8, ("\n",))
    assert parse(**spec.to_dict()) == spec


def test_chat_messages() -> None:
    spec = parse(messages=[{"role": "user", "content": "hi"}], dialect="openai-chat")
    assert spec.chat_messages[0].content == "hi"
    assert spec.text_prompt == "hi"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": ["a"]}, "prompt"),
        ({"prompt": "x" * (LIMIT + 1)}, "prompt"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 10**12}, "max_tokens"),
        ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "a", "dialect": "klingon"}, "dialect"),
        ({"prompt": "a", "model": ""}, "model"),
        ({"prompt": "a", "model": 7}, "model"),
        ({"prompt": "a", "model": "a b"}, "model"),
        ({"prompt": "a", "model": "x\n"}, "model"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "temperature": float("nan")}, "temperature"),
        ({"prompt": "a", "temperature": 1e308}, "temperature"),
        ({"prompt": "a", "top_p": 2}, "top_p"),
        ({"prompt": "a", "stop": [1]}, "stop"),
        ({"prompt": "a", "stop": ["x"] * 17}, "stop"),
        ({"prompt": "a", "on_interrupt": "retry"}, "on_interrupt"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "b"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"prompt": "a", "colour": "red"}, "colour"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidJob) as caught:
        parse(**data)
    assert caught.value.field == field
    assert str(caught.value).startswith(field + ":")

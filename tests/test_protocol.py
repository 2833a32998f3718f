"""The wire contract, pure: keys, encode/decode, validation. No Redis, no network."""

from __future__ import annotations

import json

import pytest

from producer.protocol import (
    TASK_NAME,
    TERMINAL_TYPES,
    EventType,
    Keys,
    ProtocolError,
    decode,
    decode_control,
    encode,
    encode_cancel,
    encode_token,
    log_entry_id,
    make_event,
    seq_of_entry_id,
    validate_job_id,
)
from producer.reading import Transcript


def test_key_names_follow_the_design() -> None:
    keys = Keys("tr")
    assert keys.channel("J1") == "tr:job:{J1}"
    assert keys.log("J1") == "tr:job:{J1}:log"
    assert keys.state("J1") == "tr:job:{J1}:state"
    assert TASK_NAME == "tokenrelay.stream"
    assert Keys().channel("x") == "tokenrelay:job:{x}"


def test_every_key_of_a_job_shares_one_hash_tag() -> None:
    keys = Keys()
    tags = {key[key.index("{") : key.index("}") + 1] for key in keys.job_keys("abc-1")}
    assert tags == {"{abc-1}"}


@pytest.mark.parametrize("bad", ["", "a" * 65, "a:b", "a}b", "a b", "x*", "é", None, 5])
def test_job_ids_that_could_address_other_keys_are_refused(bad: object) -> None:
    with pytest.raises(ProtocolError, match="job_id"):
        validate_job_id(bad)
    with pytest.raises(ProtocolError):
        Keys().state(bad)  # type: ignore[arg-type]


def test_encode_is_compact_json_with_the_envelope() -> None:
    data = encode(make_event("j", 3, EventType.DONE, finish_reason="length", usage=None))
    assert data == b'{"v":1,"job":"j","seq":3,"type":"done","finish_reason":"length"}'


@pytest.mark.parametrize(
    "text", ["hi", " caf\u00e9", "\u65e5\u672c", '"quoted"\n', "\U0001f642", ""]
)
def test_token_fast_path_equals_the_general_encoder(text: str) -> None:
    general = encode(make_event("job_1", 7, EventType.TOKEN, text=text))
    assert encode_token("job_1", 7, text) == general
    assert decode(general).text == text


def test_decode_round_trips_every_type() -> None:
    samples = [
        make_event("j", 0, EventType.START, attempt=1),
        make_event("j", 1, EventType.TOKEN, text="x"),
        make_event("j", 2, EventType.RESTART, attempt=2),
        make_event("j", 3, EventType.ERROR, code="upstream_http", message="boom"),
        make_event("j", 4, EventType.CANCELLED),
        make_event("j", 5, EventType.DONE, usage={"total_tokens": 3}),
    ]
    for event in samples:
        assert decode(encode(event)) == event
    assert {e.type for e in samples if e.terminal} == TERMINAL_TYPES


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"not json", "JSON"),
        (b"[]", "object"),
        (b'{"v":2,"job":"j","seq":0,"type":"start","attempt":1}', "v:"),
        (b'{"v":1,"job":"a:b","seq":0,"type":"done"}', "job:"),
        (b'{"v":1,"job":"j","seq":-1,"type":"done"}', "seq:"),
        (b'{"v":1,"job":"j","seq":true,"type":"done"}', "seq:"),
        (b'{"v":1,"job":"j","seq":0,"type":"nope"}', "type:"),
        (b'{"v":1,"job":"j","seq":0,"type":"token"}', "text:"),
        (b'{"v":1,"job":"j","seq":0,"type":"error","code":"x"}', "message:"),
        (b"\xff\xfe", "JSON"),
    ],
)
def test_decode_names_what_is_wrong(data: bytes, field: str) -> None:
    with pytest.raises(ProtocolError, match=field):
        decode(data)


def test_log_entry_ids_map_to_seq() -> None:
    assert log_entry_id(0) == "0-1"
    assert seq_of_entry_id(b"0-42") == 41


def test_control_messages() -> None:
    assert decode_control(encode_cancel("job-9")) == "job-9"
    assert decode_control(b'{"v":1,"cancel":"a:b"}') is None
    assert decode_control(b"garbage") is None
    assert json.loads(encode_cancel("j"))["cancel"] == "j"


def test_a_transcript_reassembles_the_current_attempt_or_only_counts_restarts() -> None:
    events = [
        make_event("j", 0, EventType.START, attempt=1),
        make_event("j", 1, EventType.TOKEN, text="lost"),
        make_event("j", 2, EventType.RESTART, attempt=2),
        make_event("j", 3, EventType.TOKEN, text="Hello"),
        make_event("j", 4, EventType.TOKEN, text=" world"),
    ]
    kept, counted = Transcript(), Transcript(keep_text=False)
    for event in events:
        kept.add(event)
        counted.add(event)
    assert (kept.text, kept.restarts) == ("Hello world", 1)
    assert (counted.text, counted.parts, counted.restarts) == ("", [], 1)

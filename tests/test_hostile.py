"""Hostile input by the thousand: random and adversarial jobs, events and upstream bytes.

Whatever comes in - oversized prompts, deep JSON, invalid UTF-8, lone surrogates, wrong types,
huge numbers, control characters, injection-looking model names and ids - the outcome is a clean
refusal (``InvalidJob`` naming the field, ``ProtocolError``, an ``UpstreamError``) or a job that
ends with exactly one terminal event. Never an unhandled exception, a hung job, or a key outside
the job's namespace.

The first half is pure (no Redis) and runs thousands of examples; the second half throws a few
dozen hostile jobs at the session's real worker fleet.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import secrets
import string
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from celery import Celery
from hypothesis import HealthCheck, currently_in_test_context, example, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from kombu.utils import json as kombu_json

from producer import Client
from producer.client import prepare
from producer.protocol import (
    DIALECTS,
    MAX_SEQ,
    TASK_NAME,
    TERMINAL_TYPES,
    Event,
    EventType,
    Keys,
    ProtocolError,
    decode,
    decode_control,
    encode,
    encode_cancel,
    encode_token,
    make_event,
    validate_job_id,
)
from producer.reading import events_from_log
from producer.settings import Settings
from producer.spec import (
    CHAT_ROLES,
    MAX_MESSAGES,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    MAX_TOKENS_LIMIT,
    ON_INTERRUPT,
    InvalidJob,
    JobSpec,
    Message,
)
from tests.conftest import Fleet
from worker import dialects
from worker.dialects import Delta
from worker.errors import UpstreamError
from worker.upstream import parse_stream

# --- shared pieces ---------------------------------------------------------------------------

#: Pure properties: no example database on disk, no per-example deadline (a 1 MiB prompt is slow
#: on a busy machine, and that is not what these tests are about).
PURE = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ID_ALPHABET = string.ascii_letters + string.digits + "-_"
#: The job id contract, written out independently of ``producer.protocol``.
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
MODEL_RE = re.compile(r"[\x21-\x7e]{1,256}", re.ASCII)
FORBIDDEN_MODEL_CHARS = set("\"'\\<>`")

FIELDS = (
    "model",
    "dialect",
    "max_tokens",
    "prompt",
    "messages",
    "stop",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "on_interrupt",
    "deadline",
)
NUMBER_RANGES = {
    "temperature": (0.0, 5.0),
    "top_p": (0.0, 1.0),
    "repetition_penalty": (0.0, 10.0),
    "deadline": (0.001, 86_400.0),
}
MESSAGE_FIELD_RE = re.compile(r"messages\[\d+\](\.role|\.content)?")

#: Characters that trip up parsers, logs, terminals and key builders.
NASTY_CHARS = [
    "\x00", "\x01", "\x08", "\x1b", "\x7f", "\r", "\n", "\t", "\x0b", "\x0c", "\x1c",
    "\u0085", "\u00a0", "\u2028", "\u2029", "\u200b", "\u200d", "\u200e", "\u200f", "\u202e",
    "\u2066", "\ufeff", "\ufffd", "\uffff", "\ud800", "\udbff", "\udc00", "\udfff",
    "\U0001f642", "\U0010ffff", "é", "\u0301", "日", "ß", "\u212a", "\uff41", "\u0661",
    "{", "}", ":", "*", "?", "[", "]", '"', "'", "\\", "/", "%", "$", ";", "&", "=", " ", "`",
]  # fmt: skip
#: Strings that look like attacks on a key space, a shell, a template, a query or a log.
INJECTIONS = [
    "", " ", "..", "../../etc/passwd", "*", "?", "[a-z]*", "{x}", "}{", "{", "}", "a:b",
    "tokenrelay:job:{victim}:state", "trmain:job:{victim}:log", "trmain.jobs", "unacked",
    "'; DROP TABLE jobs; --", '" OR 1=1 --', "$(rm -rf /)", "`id`", "<script>alert(1)</script>",
    "%00", "%2e%2e%2f", "\r\nSET pwned 1\r\n", "*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$1\r\ny\r\n",
    "FLUSHALL", "${jndi:ldap://x/a}", "{{7*7}}", "__proto__", "constructor", "null", "true",
    "NaN", "Infinity", "-0", "1e999", "0x10", "\x00\x00", "data: [DONE]\n\n", "mock?status=500",
]  # fmt: skip
LONG_STRINGS = ["x" * 64, "x" * 65, "x" * 257, "é" * 600, "\U0001f642" * 300, "a\n" * 3000]
#: Numbers no sane field accepts.
HUGE_NUMBERS: list[Any] = [
    10**100, -(10**100), 10**400, 10**4000, 2**63, 2**64 + 1, -(2**63) - 1,
    math.inf, -math.inf, math.nan, 1e308, 5e-324, -0.0, 0.5, 2.5, 1.0, 0, -1, True, False,
]  # fmt: skip
json_numbers = st.sampled_from(HUGE_NUMBERS)
#: Python callers can also pass an int with more digits than ``str(int)`` will print (so it is
#: built lazily: Hypothesis would try to print it).
py_numbers = st.one_of(json_numbers, st.sampled_from([4301, 5000]).map(lambda n: -(10**n)))


def event(name: str) -> None:
    """Count an outcome in Hypothesis' statistics (when run by Hypothesis)."""
    if currently_in_test_context():
        hypothesis_event(name)


def nested(depth: int, kind: str, leaf: Any = "x") -> Any:
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


nasty_chars = st.one_of(
    st.characters(),
    st.characters(categories=["Cs", "Cc", "Cf", "Zs", "Zl", "Zp", "Mn"]),
    st.sampled_from(NASTY_CHARS),
)
nasty_text = st.text(nasty_chars, max_size=40)
hostile_strings = st.one_of(
    nasty_text, st.sampled_from(INJECTIONS), st.sampled_from(LONG_STRINGS), st.text(max_size=20)
)


def hostile_values(huge: st.SearchStrategy[Any], depths: list[int]) -> st.SearchStrategy[Any]:
    """Any JSON-like value: scalars from ``huge`` and hostile strings, lists, objects, and
    lists or objects nested ``depths`` deep."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), huge, hostile_strings)
    trees = st.recursive(
        scalars,
        lambda kids: st.one_of(
            st.lists(kids, max_size=4),
            st.dictionaries(st.one_of(hostile_strings, st.sampled_from(FIELDS)), kids, max_size=4),
        ),
        max_leaves=12,
    )
    deep = st.builds(nested, st.sampled_from(depths), st.sampled_from(["list", "dict"]))
    return st.one_of(trees, deep)


#: Python callers can pass anything: numbers JSON cannot carry, nesting JSON cannot encode.
py_values = hostile_values(py_numbers, [2, 50, 500, 3000])
#: What arrives as JSON (through Celery, the gateway): nesting a JSON encoder still handles.
json_values = hostile_values(json_numbers, [2, 50, 400])
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), py_numbers, hostile_strings,
)  # fmt: skip


#: Text a valid field may hold: anything but lone surrogates (which have no UTF-8 form).
clean_chars = st.one_of(
    st.characters(exclude_categories=["Cs"]),
    st.sampled_from([c for c in NASTY_CHARS if not 0xD800 <= ord(c) <= 0xDFFF]),
)
clean_text = st.text(clean_chars, max_size=40)
visible_text = st.text(clean_chars, min_size=1, max_size=40).filter(str.strip)
model_chars = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\"'\\<>`")


def chat_messages(content: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"role": st.sampled_from(sorted(CHAT_ROLES)), "content": content},
        optional={"name": clean_text},
    )


#: Chat messages of which at least one says something.
message_lists = st.builds(
    lambda first, rest, at: [*rest[:at], first, *rest[at:]],
    chat_messages(visible_text),
    st.lists(chat_messages(clean_text), max_size=4),
    st.integers(0, 4),
)
#: A plausible value for every field; each one alone is valid (within the prompt limit).
VALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(
        st.text(model_chars, min_size=1, max_size=256),
        st.sampled_from(["mock", "mock?delay_ms=0&x=1;DROP", "*", "{x}", "a:b", "..", "%00"]),
    ),
    "dialect": st.sampled_from(DIALECTS),
    "max_tokens": st.one_of(
        st.integers(1, MAX_TOKENS_LIMIT), st.sampled_from([1.0, 8.0, float(MAX_TOKENS_LIMIT)])
    ),
    "stop": st.one_of(
        st.text(clean_chars, min_size=1, max_size=MAX_STOP_LENGTH),
        st.lists(st.text(clean_chars, min_size=1, max_size=20), max_size=MAX_STOP_SEQUENCES),
    ),
    "temperature": st.one_of(st.floats(0, 5), st.integers(0, 5)),
    "top_p": st.one_of(st.floats(0, 1), st.sampled_from([0, 1])),
    "top_k": st.integers(0, 100_000),
    "repetition_penalty": st.one_of(st.floats(0, 10), st.integers(0, 10)),
    "on_interrupt": st.sampled_from(ON_INTERRUPT),
    "deadline": st.one_of(st.floats(0.001, 86_400.0), st.integers(1, 86_400)),
}
#: Values each field must refuse (besides anything at all of the wrong kind).
BAD_FIELDS: dict[str, list[Any]] = {
    "prompt": ["", "  \n\t", "\u200b", "\ud800", "ok\udfffok", 42, ["a", "b"], "x" * 1025],
    "messages": [
        [], [{}], [[]], ["user"], [{"role": "user"}], [{"role": "robot", "content": "x"}],
        [{"role": "user", "content": 7}], [{"role": "user", "content": "\ud800"}],
        [{"role": ["user"], "content": "x"}], [{"role": {}, "content": "x"}],
        [{"role": "user", "content": " "}], [{"role": "user", "content": "x"}] * 1025,
    ],
    "model": [
        "a b", "mock\r\n", "", "x" * 257, "m'", 'm"', "m<", "m`", "m\\", "mock\x00",
        "\uff4d\uff4f\uff43\uff4b", "\ud800", 5, ["mock"],
    ],
    "dialect": ["nope", "TOGETHER", " together", "ollama\n", "", 0, ["together"]],
    "max_tokens": [0, -1, MAX_TOKENS_LIMIT + 1, 10**9, "12", 2.5, "", [8]],
    "stop": ["", [""], ["x" * 257], [1], ["\ud800"], ["a"] * 17, ("a",), 5, {"a": 1}],
    "temperature": [-0.001, 5.001, "hot", "1"],
    "top_p": [1.01, -1e-9, "0.5"],
    "top_k": [-1, 100_001, 1.5, "5"],
    "repetition_penalty": [10.5, -1, "x"],
    "on_interrupt": ["retry", "", "Error", 1],
    "deadline": [0, 0.0009, 86_401, -1, "60"],
}  # fmt: skip


@st.composite
def spec_dicts(
    draw: st.DrawFn, values: st.SearchStrategy[Any], huge: st.SearchStrategy[Any], most: int = 3
) -> dict[str, Any]:
    """Job requests: a plausible one with some fields made hostile (a known bad value, ``huge``,
    or any ``values`` at all; at ``most`` of them), or missing, or with unknown fields added."""
    data = draw(st.fixed_dictionaries({}, optional=VALID_FIELDS))
    if draw(st.integers(0, 3)):
        data["prompt"] = draw(st.one_of(visible_text, st.sampled_from(INJECTIONS[2:])))
    else:
        data["messages"] = draw(message_lists)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=most, unique=True)):
        data[name] = draw(st.one_of(st.sampled_from(BAD_FIELDS[name]), huge, values))
    if draw(st.integers(0, 9)) == 0:
        data.pop(draw(st.sampled_from(["prompt", "messages"])), None)
    if draw(st.integers(0, 9)) == 0:
        data.update(draw(st.dictionaries(hostile_strings, values, min_size=1, max_size=2)))
    return data


SPEC_LIMITS = st.sampled_from([8, 256, 4096, 1024 * 1024])


def check_spec(spec: JobSpec, kwargs: Mapping[str, Any]) -> None:
    """Every invariant a validated job must hold, and its round trip through JSON."""
    limit = kwargs["max_prompt_bytes"]
    assert (spec.prompt is None) != (spec.messages is None)
    if spec.prompt is not None:
        assert isinstance(spec.prompt, str) and spec.prompt.strip()
        assert len(spec.prompt.encode("utf-8")) <= limit
    else:
        assert isinstance(spec.messages, tuple) and 1 <= len(spec.messages) <= MAX_MESSAGES
        for message in spec.messages:
            assert isinstance(message, Message)
            assert message.role in CHAT_ROLES and isinstance(message.content, str)
        assert any(m.content.strip() for m in spec.messages)
        assert sum(len(m.content.encode("utf-8")) for m in spec.messages) <= limit
    assert type(spec.max_tokens) is int and 1 <= spec.max_tokens <= MAX_TOKENS_LIMIT
    assert MODEL_RE.fullmatch(spec.model) and not FORBIDDEN_MODEL_CHARS & set(spec.model)
    assert spec.dialect in DIALECTS and spec.on_interrupt in ON_INTERRUPT
    for name, (low, high) in NUMBER_RANGES.items():
        value = getattr(spec, name)
        assert value is None or (type(value) is float and low <= value <= high), (name, value)
    assert spec.top_k is None or (type(spec.top_k) is int and 0 <= spec.top_k <= 100_000)
    assert isinstance(spec.stop, tuple) and len(spec.stop) <= MAX_STOP_SEQUENCES
    for stop in spec.stop:
        assert isinstance(stop, str) and 1 <= len(stop) <= MAX_STOP_LENGTH
        stop.encode("utf-8")
    data = spec.to_dict()
    assert JobSpec.from_dict(data, **kwargs) == spec
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    text.encode("utf-8")  # what the client stores in the job's state
    assert JobSpec.from_dict(json.loads(text), **kwargs) == spec


def check_refusal(exc: InvalidJob, data: object) -> None:
    """A refusal names one field: a known one, ``job``, ``messages[i]...`` or the unknown key."""
    assert str(exc) == f"{exc.field}: {exc.problem}"
    assert exc.problem and len(str(exc)) <= 400, str(exc)[:500]
    whole_job = exc.field == "job" and exc.problem != "unknown field"  # not a key named "job"
    if exc.field in FIELDS or whole_job or MESSAGE_FIELD_RE.fullmatch(exc.field):
        if whole_job:
            assert not isinstance(data, Mapping)
        return
    assert isinstance(data, Mapping)
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    assert unknown and exc.field == unknown[0][:64], (exc.field, unknown[:3])
    assert exc.problem == "unknown field"


def validate(data: object, kwargs: Mapping[str, Any]) -> JobSpec | InvalidJob:
    """``JobSpec.from_dict``, which must return a valid spec or raise ``InvalidJob`` only."""
    try:
        spec = JobSpec.from_dict(data, **kwargs)  # type: ignore[arg-type]
    except InvalidJob as exc:
        check_refusal(exc, data)
        event(f"refused: {exc.field if exc.field in FIELDS else 'other'}")
        return exc
    check_spec(spec, kwargs)
    event("accepted")
    return spec


# --- the job request -------------------------------------------------------------------------


@settings(PURE, max_examples=1200)
@given(data=spec_dicts(py_values, py_numbers), limit=SPEC_LIMITS)
def test_job_requests_are_valid_or_refused_by_field(data: dict[str, Any], limit: int) -> None:
    kwargs = {"default_model": "mock", "default_dialect": "together", "max_prompt_bytes": limit}
    validate(data, kwargs)


@settings(PURE, max_examples=500)
@given(data=py_values, limit=SPEC_LIMITS)
def test_any_value_at_all_is_valid_or_refused(data: Any, limit: int) -> None:
    kwargs = {"default_model": "m", "default_dialect": "openai-chat", "max_prompt_bytes": limit}
    validate(data, kwargs)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompt": "x", "temperature": 10**400}, "temperature: must be between 0 and 5"),
        ({"prompt": "x", "deadline": -(10**400)}, "deadline: must be between"),
        ({"prompt": "x", "max_tokens": 10**5000}, "max_tokens: must be between 1 and 131072"),
        ({"prompt": "x", "top_k": -(10**5000)}, "top_k: must be between 0 and 100000"),
        ({"prompt": "x", "dialect": 10**5000}, "dialect: unknown value"),
        ({"prompt": "x", "on_interrupt": nested(5000, "list")}, "on_interrupt: unknown value"),
        ({"messages": [{"role": [], "content": "x"}]}, "messages[0].role: must be one of"),
        ({"messages": [{"role": {"a": 1}, "content": "x"}]}, "messages[0].role: must be one of"),
        ({"prompt": "\ud800"}, "prompt: is not valid UTF-8 text"),
        ({"prompt": "x", "\ud800": 1}, "\ud800: unknown field"),
    ],
)
def test_known_hostile_requests_are_refused_by_field(data: dict[str, Any], message: str) -> None:
    kwargs = {"default_model": "m", "default_dialect": "together", "max_prompt_bytes": 1024}
    with pytest.raises(InvalidJob) as caught:
        JobSpec.from_dict(data, **kwargs)
    assert str(caught.value).startswith(message)
    check_refusal(caught.value, data)


# --- job ids and keys ------------------------------------------------------------------------

SETTINGS = Settings.from_env({})
hostile_ids = st.one_of(
    st.text(ID_ALPHABET, min_size=1, max_size=64),
    st.text(ID_ALPHABET, min_size=60, max_size=70),
    st.text(max_size=80),
    nasty_text,
    st.builds(lambda a, b, c: a + b + c, st.text(ID_ALPHABET, max_size=8),
              st.sampled_from(NASTY_CHARS + INJECTIONS), st.text(ID_ALPHABET, max_size=8)),
    # "$" matches before a final newline; \d and \w match other scripts' digits and letters;
    # the Kelvin sign matches "k" case-insensitively.
    st.sampled_from(["abc\n", "\nabc", "abc\x00", "\uff41\uff42\uff43", "\u0661\u0662",
                     "\u212a", "\u01c5", "a" * 64, "a" * 65]),
    st.sampled_from(INJECTIONS),
    json_scalars,
    st.lists(st.text(ID_ALPHABET, min_size=1, max_size=4), max_size=2),
)  # fmt: skip
prefixes = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)


def is_valid_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 64
        and all(c in ID_ALPHABET for c in value)
        and ID_RE.fullmatch(value) is not None
    )


def check_keys(prefix: str, job_id: str) -> None:
    """Every key of the job is inside ``{prefix}:job:{{id}}``, its hash tag intact."""
    head = f"{prefix}:job:{{{job_id}}}"
    for key in Keys(prefix).job_keys(job_id):
        assert key.startswith(head), key
        assert key.count("{") == 1 and key.count("}") == 1, key
        assert key[key.index("{") + 1 : key.index("}")] == job_id
        assert key[len(head) :] in ("", ":log", ":state", ":lease")


@settings(PURE, max_examples=800)
@given(job_id=hostile_ids, prefix=prefixes)
def test_caller_job_ids_cannot_address_other_keys(job_id: Any, prefix: str) -> None:
    try:
        accepted, _spec = prepare(SETTINGS, {"prompt": "hi", "max_tokens": 3}, job_id)
    except InvalidJob as exc:
        event("refused")
        assert exc.field == "job_id" and str(exc).startswith("job_id: ")
        assert job_id is not None and not is_valid_id(job_id), repr(job_id)
        with pytest.raises(ProtocolError):
            Keys(prefix).job_keys(job_id)
        return
    event("accepted")
    if job_id is not None:
        assert accepted == job_id
    assert is_valid_id(accepted), repr(accepted)
    check_keys(prefix, accepted)
    assert decode_control(encode_cancel(accepted)) == accepted


@settings(PURE, max_examples=300)
@given(prefix=st.one_of(prefixes, hostile_strings))
def test_prefixes_are_validated(prefix: str) -> None:
    try:
        keys = Keys(prefix)
    except ProtocolError:
        assert not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", prefix, re.ASCII)
        return
    assert "{" not in keys.prefix and "}" not in keys.prefix
    check_keys(keys.prefix, "job-1")


# --- the wire protocol -----------------------------------------------------------------------

job_ids = st.text(ID_ALPHABET, min_size=1, max_size=64)
seqs = st.one_of(st.integers(0, 10), st.integers(0, MAX_SEQ), st.sampled_from([0, MAX_SEQ]))
field_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        nasty_text,
    ),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(nasty_text, kids, max_size=3),
    max_leaves=8,
)
extra_fields = st.dictionaries(
    nasty_text.filter(lambda k: k not in ("v", "job", "seq", "type")), field_values, max_size=3
)
REQUIRED: dict[EventType, dict[str, st.SearchStrategy[Any]]] = {
    EventType.START: {"attempt": st.integers()},
    EventType.TOKEN: {"text": nasty_text},
    EventType.RESTART: {"attempt": st.integers(min_value=1)},
    EventType.DONE: {},
    EventType.ERROR: {"code": nasty_text, "message": nasty_text},
    EventType.CANCELLED: {},
}


@st.composite
def events(draw: st.DrawFn) -> Event:
    type_ = draw(st.sampled_from(list(EventType)))
    fields = draw(extra_fields)
    fields.update(draw(st.fixed_dictionaries(REQUIRED[type_])))
    return Event(draw(job_ids), draw(seqs), type_, fields)


INSERTS = [b"\xff", b"\xc3", b"\xed\xa0\x80", b'"', b"{", b"[" * 3000, b"\\", b"\x00"]


@st.composite
def mutated_encodings(draw: st.DrawFn) -> bytes:
    """A valid encoded event with bytes flipped, inserted, deleted, cut or repeated."""
    data = bytearray(encode(draw(events())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(INSERTS))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


DEEP_MARK = "\x00deep\x00"
#: Values each event key must refuse, besides anything at all of the wrong kind.
BAD_EVENT_VALUES: dict[str, list[Any]] = {
    "v": [2, 0, "1", None, [1]],
    "job": ["", "a b", "x" * 65, "{x}", "a:b", "*", "..", "\ud800", 7, None, ["a"]],
    "seq": [-1, -(10**100), "0", 1.5, None, True, [0]],
    "type": ["TOKEN", "Token", "token ", "", None, 1, ["token"], {"token": 1}],
    "text": [None, 1, ["a"], {"a": "b"}, True],
    "attempt": [None, "1", 1.5, True, [1]],
    "code": [None, 1, ["x"]],
    "message": [None, 1, {"a": 1}],
}  # fmt: skip


@st.composite
def hostile_event_objects(draw: st.DrawFn) -> bytes | str:
    """Events with some keys given wrong types, huge numbers or deep nesting, or removed."""
    obj = draw(events()).as_dict()
    for key in draw(st.lists(st.sampled_from(sorted(BAD_EVENT_VALUES)), max_size=3, unique=True)):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            obj.pop(key, None)
        else:
            obj[key] = draw(st.one_of(st.sampled_from(BAD_EVENT_VALUES[key]), json_numbers,
                                      json_values))  # fmt: skip
    deep = draw(st.integers(0, 4)) == 0
    if deep:
        obj[draw(st.sampled_from(["type", "text", "v", "extra", "job", "seq"]))] = DEEP_MARK
    if draw(st.integers(0, 19)) == 0:
        obj = draw(st.sampled_from([[obj], "event", 7, None]))
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    if deep:  # nesting deeper than any JSON encoder would write
        depth = draw(st.sampled_from([10, 500, 900, 990, 1200, 5000, 100_000]))
        kind = draw(st.sampled_from(["[]", "{}"]))
        opening = "[" * depth if kind == "[]" else '{"a":' * depth
        text = text.replace(json.dumps(DEEP_MARK), opening + "1" + kind[1] * depth)
    if draw(st.booleans()):
        return text
    return text.encode("utf-8", draw(st.sampled_from(["surrogatepass", "backslashreplace"])))


def check_decoded(data: bytes | str) -> None:
    """``decode`` returns a valid event or raises ``ProtocolError``; nothing else."""
    try:
        decoded = decode(data)
    except ProtocolError as exc:
        event("refused")
        assert len(str(exc)) <= 400, str(exc)[:500]
        return
    event(f"decoded {decoded.type}")
    assert isinstance(decoded, Event) and isinstance(decoded.type, EventType)
    assert is_valid_id(decoded.job)
    assert type(decoded.seq) is int and decoded.seq >= 0
    assert not {"v", "job", "seq", "type"} & set(decoded.fields)
    # What decodes re-encodes, and decodes to the same bytes again.
    again = encode(decoded)
    assert encode(decode(again)) == again


@settings(PURE, max_examples=600)
@given(data=st.one_of(st.binary(max_size=200), mutated_encodings()))
def test_decoding_random_and_mutated_bytes_is_an_event_or_a_protocol_error(data: bytes) -> None:
    check_decoded(data)


@settings(PURE, max_examples=600)
@given(data=hostile_event_objects())
def test_decoding_hostile_event_objects_is_an_event_or_a_protocol_error(data: bytes | str) -> None:
    check_decoded(data)


@pytest.mark.parametrize(
    ("data", "refused"),
    [
        (b"[" * 100_000, True),
        (b"{" * 100_000, True),
        (b'{"v":1,"job":"a","seq":0,"type":"token","text":' + b"[" * 100_000, True),
        (b'{"v":1,"job":"a","seq":0,"type":' + b"[" * 990 + b"]" * 990 + b"}", True),
        (b'{"v":1,"job":"a","seq":0,"type":{"a":' * 400 + b"1" + b"}" * 400, True),
        (b'{"v":1,"job":"a","seq":' + b"9" * 5000 + b',"type":"done"}', True),
        (b'{"v":1,"job":"a","seq":0,"type":"token","text":"\xff"}', True),
        (b'{"v":1,"job":"a","seq":0,"type":"token","text":"\xed\xa0\x80"}', False),
        (b'{"v":1,"job":"a","seq":0,"type":"token","text":"\\ud800"}', False),
        (b'{"v":1,"job":"a","seq":' + b"9" * 4000 + b',"type":"done"}', False),
    ],
    ids=["deep-array", "deep-object", "deep-text", "deep-type", "deep-objects", "seq-5000-digits",
         "invalid-utf8", "utf8-encoded-surrogate", "escaped-surrogate", "seq-4000-digits"],
)  # fmt: skip
def test_decoding_known_hostile_bytes(data: bytes, refused: bool) -> None:
    check_decoded(data)
    if refused:
        with pytest.raises(ProtocolError):
            decode(data)
    assert decode_control(data) is None


@settings(PURE, max_examples=600)
@given(event_=events())
def test_events_round_trip(event_: Event) -> None:
    data = encode(event_)
    assert decode(data) == event_
    assert decode(data.decode("utf-8")) == event_


@settings(PURE, max_examples=800)
@given(job_id=job_ids, seq=seqs, text=st.one_of(nasty_text, st.sampled_from(NASTY_CHARS)))
def test_the_token_fast_path_encodes_exactly_like_encode(job_id: str, seq: int, text: str) -> None:
    fast = encode_token(job_id, seq, text)
    slow = encode(make_event(job_id, seq, EventType.TOKEN, text=text))
    assert fast == slow
    assert decode(fast) == decode(slow) == Event(job_id, seq, EventType.TOKEN, {"text": text})
    assert decode(fast).text == text


# --- the upstream dialects -------------------------------------------------------------------

DIALECT_NAMES = ["together", "openai-completions", "openai-chat", "tgi", "ollama"]
SSE_DIALECTS = [name for name in DIALECT_NAMES if dialects.get(name).framing == "sse"]
#: Pieces of real streams, to build byte soup that gets past the framing into the parsers.
FRAGMENTS = [
    b"data: ", b"data:", b"event: x", b"id: 1", b"retry: 5", b": ping", b"\n", b"\r", b"\r\n",
    b"\n\n", b"[DONE]", b"{", b"}", b"[", b"]", b'"', b",", b":", b"null", b"true", b"1e999",
    b"NaN", b"-Infinity", b'"\\ud800"', b'"\\udc00\\ud800"', b'"choices"', b'"text"',
    b'"delta"', b'"content"', b'"usage"', b'"total_tokens"', b'"error"', b'"message"',
    b'"token"', b'"special"', b'"details"', b'"finish_reason"', b'"generated_tokens"',
    b'"response"', b'"done"', b'"prompt_eval_count"', b'"eval_count"', b'"done_reason"',
    b"[" * 2000, b"{\"a\":" * 1200, b"9" * 5000, b"\xc3\xa9", b"\xf0\x9f\x99\x82",
    '{"choices":[{"text":"\U0001f642"}]}'.encode(), b'{"choices":[]}', b'{"done":true}',
]  # fmt: skip
soup = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map(b"".join)


def utf8(text: str) -> bytes:
    """Valid UTF-8 of ``text``, lone surrogates spelled as JSON escapes."""
    return text.encode("utf-8", "backslashreplace")


@st.composite
def chunkings(draw: st.DrawFn, body: bytes) -> list[bytes]:
    """``body`` cut at random byte positions, inside multi-byte characters too."""
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=12)))
    bounds = [0, *cuts, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def run_parser(name: str, chunks: list[bytes]) -> list[Delta] | UpstreamError:
    """Parse a body; the only exceptions allowed are ``UpstreamError``s."""
    deltas = []
    try:
        for delta in parse_stream(iter(chunks), dialects.get(name)):
            assert isinstance(delta, Delta)
            assert isinstance(delta.text, str)
            assert delta.finish_reason is None or isinstance(delta.finish_reason, str)
            if delta.usage is not None:
                assert all(isinstance(k, str) for k in delta.usage)
                assert all(type(v) is int for v in delta.usage.values()), delta.usage
            deltas.append(delta)
    except UpstreamError as exc:
        event(f"{name}: {exc.code}")
        assert isinstance(exc.message, str) and len(exc.message) <= 1000
        return exc
    event(f"{name}: parsed")
    return deltas


@settings(PURE, max_examples=800)
@given(
    name=st.sampled_from(DIALECT_NAMES),
    chunks=st.lists(st.one_of(soup, nasty_text.map(utf8)), max_size=6),
)
def test_parsers_on_utf8_soup_yield_deltas_or_upstream_errors(
    name: str, chunks: list[bytes]
) -> None:
    run_parser(name, chunks)


@settings(PURE, max_examples=400)
@given(chunks=st.lists(st.binary(max_size=64) | soup, max_size=6))
def test_ndjson_parser_on_arbitrary_bytes_yields_deltas_or_upstream_errors(
    chunks: list[bytes],
) -> None:
    run_parser("ollama", chunks)


@settings(PURE, max_examples=400)
@given(
    name=st.sampled_from(SSE_DIALECTS),
    chunks=st.lists(st.binary(max_size=64) | soup, max_size=6),
)
@example(name="together", chunks=[b'data: {"choices":[{"text":"\xff"}]}\n\n'])
def test_sse_parsers_on_arbitrary_bytes_yield_deltas_or_upstream_errors(
    name: str, chunks: list[bytes]
) -> None:
    run_parser(name, chunks)


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("together", b"data: " + b"[" * 100_000 + b"\n\n"),
        ("ollama", b"[" * 100_000 + b"\n"),
        ("tgi", b'data:{"token":{"text":' + b"[" * 100_000 + b"\n\n"),
        ("together", b'data: {"choices":[],"usage":{"total_tokens":1e999}}\n\ndata: [DONE]\n\n'),
        ("openai-chat", b'data: {"choices":[],"usage":{"total_tokens":NaN}}\n\ndata: [DONE]\n\n'),
        ("openai-completions", b'data: {"choices":[],"usage":{"prompt_tokens":-Infinity}}\n\n'),
        ("ollama", b'{"done":true,"prompt_eval_count":1,"eval_count":1e999}\n'),
        ("tgi", b'data:{"token":{"text":"a"},"details":{"finish_reason":[[[]]]}}\n\n'),
        ("together", b'data: {"error":{"message":' + b"[" * 950 + b"]" * 950 + b"}}\n\n"),
        ("together", b'data: {"error":"\\ud800"}\n\n'),
    ],
    ids=["deep-sse", "deep-ndjson", "deep-tgi-text", "usage-1e999", "usage-nan", "usage-inf",
         "ollama-count-1e999", "tgi-finish-list", "deep-error-message", "error-surrogate"],
)  # fmt: skip
def test_parsers_on_known_hostile_bodies(name: str, body: bytes) -> None:
    run_parser(name, [body])


def sse_body(objects: list[object], rng: st.DrawFn) -> bytes:
    out = b""
    for obj in objects:
        if rng(st.integers(0, 4)) == 0:
            out += rng(st.sampled_from([b": ping\n\n", b": keep-alive\r\n\r\n", b"event: x\n"]))
        data = obj.encode() if isinstance(obj, str) else json_bytes(obj, rng)
        head = rng(st.sampled_from([b"data: ", b"data:"]))
        end = rng(st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r"]))
        out += head + data + end
    return out


def json_bytes(obj: object, rng: st.DrawFn) -> bytes:
    """JSON as a server would send it: ASCII-escaped, or raw UTF-8 with lone surrogates
    escaped (raw UTF-8 cannot hold them)."""
    if rng(st.booleans()):
        return json.dumps(obj).encode("ascii")
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")


@st.composite
def valid_streams(draw: st.DrawFn) -> tuple[str, bytes, str, str]:
    """A well-formed stream of one dialect: its name, body, full text and finish reason."""
    name = draw(st.sampled_from(DIALECT_NAMES))
    texts = draw(st.lists(st.one_of(nasty_text, st.sampled_from(NASTY_CHARS)), max_size=12))
    finish = draw(st.sampled_from(["stop", "length"]))
    usage = {"prompt_tokens": 3, "completion_tokens": len(texts), "total_tokens": 3 + len(texts)}
    if name in ("together", "openai-completions"):
        chunks: list[object] = [{"choices": [{"index": 0, "text": t}], "id": "x"} for t in texts]
        chunks += [{"choices": [{"index": 0, "text": "", "finish_reason": finish}], "usage": usage},
                   "[DONE]"]  # fmt: skip
        return name, sse_body(chunks, draw), "".join(texts), finish
    if name == "openai-chat":
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}]
        chunks += [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in texts]
        chunks += [{"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
                   {"choices": [], "usage": usage}, "[DONE]"]  # fmt: skip
        return name, sse_body(chunks, draw), "".join(texts), finish
    if name == "tgi":
        chunks = [{"index": i, "token": {"id": i, "text": t, "special": False},
                   "generated_text": None} for i, t in enumerate(texts)]  # fmt: skip
        chunks.append({"index": len(texts), "token": {"id": 2, "text": "</s>", "special": True},
                       "generated_text": "".join(texts), "details": {
                           "finish_reason": "eos_token" if finish == "stop" else "length",
                           "generated_tokens": len(texts)}})  # fmt: skip
        return name, sse_body(chunks, draw), "".join(texts), finish
    lines = [{"model": "m", "response": t, "done": False} for t in texts]
    lines.append({"model": "m", "response": "", "done": True, "done_reason": finish,
                  "prompt_eval_count": 3, "eval_count": len(texts)})  # fmt: skip
    body = b"".join(json_bytes(line, draw) + b"\n" for line in lines)
    return name, body, "".join(texts), finish


@settings(PURE, max_examples=600)
@given(data=st.data(), stream=valid_streams())
def test_valid_streams_split_anywhere_give_the_same_text(
    data: st.DataObject, stream: tuple[str, bytes, str, str]
) -> None:
    name, body, full_text, finish = stream
    whole = run_parser(name, [body])
    assert isinstance(whole, list), whole
    assert "".join(d.text for d in whole) == full_text
    assert [d.finish_reason for d in whole if d.finish_reason] == [finish]
    split = run_parser(name, data.draw(chunkings(body)))
    assert isinstance(split, list), split
    assert split == whole


# --- end to end: hostile jobs through the real worker ----------------------------------------

E2E = settings(
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: Model names that carry the mock upstream's fault switches, or look like injections.
CLEAN_MODELS = [None, "mock", "mock?delay_ms=0&x=1;DROP", "*", "{x}", "mock?burst=3&delay_ms=1",
                "trmain:job:{victim}:state", "mock?ping=1&stamp=1", "m?x=%00&y=%0d%0a"]  # fmt: skip
FAULT_MODELS = [
    "mock?status=500", "mock?status=503&fail_times=1", "mock?status=429&retry_after=0",
    "mock?status=400", "mock?status=99999", "mock?delay_ms=abc", "mock?malformed_after=0",
    "mock?malformed_after=1", "mock?error_after=0", "mock?error_after=2", "mock?drop_after=1",
    "mock?drop_after=2&delay_ms=1",
]  # fmt: skip
BAD_MODELS = ["a b", "mock\r\n", "x" * 257, "m'", "", "\ud800", "mock\x00", 5]
#: Hostile id shapes; ``@`` becomes a tag unique to the run, searched for in every key later.
HOSTILE_ID_SHAPES = [
    "@..", "../@", "@:x", "{@}", "@}", "{@", "@*", "@?", "@ x", "@\n", "@\r\n", "@\x00", "é@",
    "@/x", "trmain:job:{@}:state", "@" + "x" * 64, "@\ud800", "@\u202e", "@%2f", "@.jobs",
]  # fmt: skip
HOSTILE_TAGS: list[str] = []


def hostile_id(shape: str) -> str:
    tag = "hx" + secrets.token_hex(5)
    HOSTILE_TAGS.append(tag)
    return shape.replace("@", tag)


def fresh_id(head: str) -> str:
    return f"{head}-{secrets.token_hex(6)}"


#: Values ``submit`` must refuse, by argument.
BAD_SUBMITS: dict[str, list[Any]] = {
    "prompt": ["", "  ", "\ud800", 42, ["a"], "x" * (2**20 + 1)],
    "model": BAD_MODELS,
    "max_tokens": [0, -1, 10**9, "5", True, 2.5, 10**400, math.nan],
    "stop": [[""], ["x" * 300], [1], "\ud800", ["a"] * 17],
    "temperature": [-1, 10**400, math.nan, math.inf, "hot", True],
    "dialect": ["nope", "together; DROP", "TOGETHER", " together", 5],
    "on_interrupt": ["retry", ""],
    "job_id": HOSTILE_ID_SHAPES,
}


@st.composite
def submit_kwargs(draw: st.DrawFn) -> dict[str, Any]:
    """Arguments of ``submit``: a small job, often faulty upstream, some arguments hostile."""
    kwargs: dict[str, Any] = {
        "prompt": draw(st.one_of(visible_text, st.sampled_from(INJECTIONS[2:]))),
        "model": draw(st.sampled_from(CLEAN_MODELS + FAULT_MODELS)),
        "max_tokens": draw(st.integers(1, 8)),
        "stop": draw(st.sampled_from([None, None, "\n", [" the", "\x00"], []])),
        "temperature": draw(st.sampled_from([None, 0.0, 0.7, 5.0])),
        "dialect": draw(st.sampled_from([None, *DIALECTS])),
        "on_interrupt": draw(st.sampled_from([None, "continue", "error"])),
        "job_id": draw(st.one_of(st.none(), st.text(ID_ALPHABET, max_size=40).map(fresh_id))),
    }
    if draw(st.integers(0, 4)) == 0:
        kwargs["prompt"], kwargs["messages"] = None, draw(message_lists)
    for name in draw(st.lists(st.sampled_from(sorted(BAD_SUBMITS)), max_size=2, unique=True)):
        kwargs[name] = draw(st.one_of(st.sampled_from(BAD_SUBMITS[name]), py_numbers))
    return kwargs


def logged_events(client: Client, job_id: str) -> list[Event]:
    return events_from_log(client.redis.xrange(client.keys.log(job_id)))


def check_finished(client: Client, job_id: str, timeout: float = 30) -> list[Event]:
    """Wait (bounded) for the job's terminal event; check the whole log."""
    read = list(client.subscribe(job_id, wait=timeout).events(timeout=timeout))
    events_ = logged_events(client, job_id)
    assert [e.seq for e in events_] == list(range(len(events_))), "gap or duplicate in seq"
    terminals = [e for e in events_ if e.type in TERMINAL_TYPES]
    assert len(terminals) == 1 and terminals[0] is events_[-1], [e.type for e in events_]
    assert read == events_
    assert events_[-1].type in (EventType.DONE, EventType.ERROR)
    if events_[-1].type is EventType.ERROR:
        assert isinstance(events_[-1].fields.get("code"), str)
        assert isinstance(events_[-1].fields.get("message"), str)
    assert client.status(job_id).status.value == events_[-1].type.value
    return events_


SUBMIT_BASE: dict[str, Any] = {
    "prompt": "hostile",
    "model": "mock",
    "max_tokens": 2,
    "stop": None,
    "temperature": None,
    "dialect": None,
    "on_interrupt": None,
    "job_id": None,
}


@pytest.mark.timeout(300)
@settings(E2E, max_examples=40)
@given(kwargs=submit_kwargs())
@example(kwargs={**SUBMIT_BASE, "temperature": 10**400})
@example(kwargs={**SUBMIT_BASE, "max_tokens": -(10**5000)})
@example(kwargs={**SUBMIT_BASE, "prompt": None, "messages": [{"role": ["user"], "content": "x"}]})
@example(kwargs={**SUBMIT_BASE, "job_id": "{@}"})
def test_hostile_submits_are_refused_or_end_with_one_terminal_event(
    client: Client, kwargs: dict[str, Any]
) -> None:
    kwargs = dict(kwargs)
    if isinstance(kwargs["job_id"], str) and kwargs["job_id"] in HOSTILE_ID_SHAPES:
        kwargs["job_id"] = hostile_id(kwargs["job_id"])
    try:
        job = client.submit(**kwargs)
    except InvalidJob as exc:
        event(f"refused: {exc.field}")
        assert exc.field in (*FIELDS, "job_id") or MESSAGE_FIELD_RE.fullmatch(exc.field), str(exc)
        assert str(exc) == f"{exc.field}: {exc.problem}"
        if is_valid_id(kwargs["job_id"]):  # a refused job leaves nothing behind
            assert not client.redis.exists(*client.keys.job_keys(kwargs["job_id"]))
        return
    event("accepted")
    assert kwargs["job_id"] is None or job.id == kwargs["job_id"]
    assert is_valid_id(job.id)
    events_ = check_finished(client, job.id)
    assert events_[0].type is EventType.START
    tokens = [e for e in events_ if e.type is EventType.TOKEN]
    assert len(tokens) <= kwargs["max_tokens"] * 4  # at most 3 resumes, each up to the limit
    if kwargs["model"] in CLEAN_MODELS:
        assert events_[-1].type is EventType.DONE, events_[-1]
        assert len(tokens) <= kwargs["max_tokens"]


@pytest.fixture(scope="module")
def celery_app(fleet: Fleet) -> Iterator[Celery]:
    app = Celery("someone-else", broker=fleet.settings.redis_url, set_as_current=False)
    yield app
    app.close()


e2e_json = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**30), 10**30),
        st.floats(),
        st.sampled_from([10**100, 10**400, math.inf, math.nan]),
        hostile_strings,
    ),
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.dictionaries(st.one_of(hostile_strings, st.sampled_from(FIELDS)), kids, max_size=3),
    ),
    max_leaves=8,
)


@st.composite
def raw_specs(draw: st.DrawFn) -> Any:
    """What another Celery client might send as ``spec``: anything, mostly almost a job."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(e2e_json.filter(lambda v: v is not None))
    if kind == 1:
        return nested(draw(st.sampled_from([5, 100, 400])), draw(st.sampled_from(["list", "dict"])))
    spec = draw(spec_dicts(json_values, json_numbers, most=1))
    if draw(st.integers(0, 5)):
        spec["max_tokens"] = draw(st.integers(1, 8))
    if isinstance(spec.get("prompt"), str) and len(spec["prompt"]) > 200:
        spec["prompt"] = spec["prompt"][:200]
    if "model" in spec or draw(st.booleans()):
        spec["model"] = draw(st.sampled_from(CLEAN_MODELS[1:] + FAULT_MODELS + BAD_MODELS))
    if draw(st.integers(0, 9)) == 0:
        spec[draw(st.sampled_from(["\ud800", "x" * 100, "prompt\x00", "{x}", "a:b"]))] = 1
    return spec


def expected_outcome(fleet: Fleet, spec: Any) -> JobSpec | InvalidJob:
    """What the worker must make of ``spec`` after the broker's JSON round trip."""
    received = kombu_json.loads(kombu_json.dumps(spec))
    settings_ = fleet.settings
    try:
        return JobSpec.from_dict(
            received,
            default_model=settings_.default_model,
            default_dialect=settings_.upstream_dialect,
            max_prompt_bytes=settings_.max_prompt_bytes,
        )
    except InvalidJob as exc:
        return exc


@pytest.mark.timeout(300)
@settings(E2E, max_examples=40)
@given(spec=raw_specs())
@example(spec={"prompt": "x", "max_tokens": 2, "\ud800": 1})
@example(spec={"prompt": "x", "max_tokens": 2, "temperature": 10**400})
@example(spec={"messages": [{"role": [], "content": "x"}]})
@example(spec={"prompt": "x", "max_tokens": 2, "dialect": ["together"]})
def test_raw_celery_jobs_end_in_done_or_invalid_job(
    client: Client, fleet: Fleet, celery_app: Celery, spec: Any
) -> None:
    expected = expected_outcome(fleet, spec)
    job_id = fresh_id("raw")
    celery_app.send_task(TASK_NAME, kwargs={"job_id": job_id, "spec": spec},
                         queue=client.keys.queue)  # fmt: skip
    events_ = check_finished(client, job_id)
    if isinstance(expected, InvalidJob):
        event(f"refused: {expected.field[:12]!r}")
        assert [e.type for e in events_] == [EventType.ERROR]
        assert events_[0].fields["code"] == "invalid_job"
        assert events_[0].fields["message"] == str(expected)
    else:
        event("accepted")
        assert events_[0].type is EventType.START
        deadline = expected.deadline or fleet.settings.job_deadline
        if expected.model in CLEAN_MODELS and deadline >= 10:
            assert events_[-1].type is EventType.DONE, events_[-1]
            assert events_[-1].fields.get("finish_reason") in ("stop", "length")


RAW_BAD_IDS: list[Any] = [
    None, 7, -1, 10**100, 1.5, math.nan, True, [], ["a"], {"a": 1}, "", "x" * 65, " ", "*",
]  # fmt: skip


def drained(client: Client, marker: str, timeout: float = 20) -> None:
    """Wait (bounded) until the fleet's queue is empty and no message whose task id holds
    ``marker`` is left unacknowledged (kombu keeps the envelope, task id in clear, in a hash)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [v for v in client.redis.hvals("unacked") if marker.encode() in v]
        if not client.redis.llen(client.keys.queue) and not pending:
            return
        time.sleep(0.05)
    raise TimeoutError("the worker did not drain its queue")


@pytest.mark.timeout(300)
def test_raw_celery_jobs_with_hostile_ids_touch_no_key(
    client: Client, fleet: Fleet, celery_app: Celery
) -> None:
    spec = {"prompt": "hostile id", "max_tokens": 2}
    sent: list[Any] = [hostile_id(shape) for shape in HOSTILE_ID_SHAPES] + RAW_BAD_IDS
    probe = fresh_id("hostile-probe")
    for i, job_id in enumerate(sent):
        celery_app.send_task(TASK_NAME, kwargs={"job_id": job_id, "spec": spec},
                             queue=client.keys.queue, task_id=f"{probe}-{i}")  # fmt: skip
    # A good job sent after them still runs: the bad ones did not take the worker down.
    sentinel = fresh_id("after-hostile-ids")
    celery_app.send_task(TASK_NAME, kwargs={"job_id": sentinel, "spec": spec},
                         queue=client.keys.queue)  # fmt: skip
    assert check_finished(client, sentinel)[-1].type is EventType.DONE
    drained(client, probe)
    assert fleet.process.alive()
    check_key_space(client)


#: Everything the test session puts in its Redis. Each fleet or idle client has a prefix ``P``
#: (``trmain``, ``trdown``, ``trops``, ... : the test suites' prefixes all start with ``tr``,
#: and other suites may have run first in the same session): job keys ``P:job:{J}`` (``:log``,
#: ``:state``, ``:lease``), ``P:running``, worker heartbeats ``P:worker:W`` and the queue
#: ``P.jobs``. Kombu adds its exchange bindings and, while messages are in flight, the unacked
#: hash with its index and mutex.
_P = r"tr[a-z0-9_-]*"
ALLOWED_KEYS = [
    re.compile(_P + r":job:\{(?P<id>[^{}]*)\}(?::log|:state|:lease)?"),
    re.compile(_P + r"(?::running|:queued|\.jobs|:worker:[^{}*?\s]+)"),
    re.compile(r"_kombu\.binding(?:_permanent)?\.(?:" + _P + r"\.jobs|celery\.pidbox)"),
    re.compile(r"_kombu\.binding_deadlines|unacked|unacked_index|unacked_mutex"),
]


def check_key_space(client: Client) -> None:
    """No key outside the known namespaces, no key built from a hostile id."""
    keys = [k.decode("utf-8", "backslashreplace") for k in client.redis.scan_iter(match="*")]
    assert keys
    for key in keys:
        assert not any(tag in key for tag in HOSTILE_TAGS), key
        matches = [m for m in (p.fullmatch(key) for p in ALLOWED_KEYS) if m]
        assert matches, f"a key outside every known namespace: {key!r}"
        job_id = matches[0].groupdict().get("id")
        if job_id is not None:
            validate_job_id(job_id)
    for member in client.redis.zrange(client.keys.running, 0, -1):
        validate_job_id(member.decode())


@pytest.mark.timeout(120)
def test_the_key_space_holds_only_job_namespaces(client: Client) -> None:
    """After every hostile job above: nothing outside the namespaces, nothing from a bad id."""
    check_key_space(client)


@settings(PURE, max_examples=200)
@given(seq=st.one_of(st.integers(min_value=MAX_SEQ + 1), st.integers(max_value=-1)))
def test_decode_refuses_a_seq_outside_the_log_id_range(seq: int) -> None:
    with pytest.raises(ProtocolError, match=r"^seq: "):
        decode(json.dumps({"v": 1, "job": "j", "seq": seq, "type": "start"}).encode())

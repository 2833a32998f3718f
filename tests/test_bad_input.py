"""Bad input is refused with a message naming the field: at submit (library and CLI) and by the
task itself when a job reaches the queue from some other Celery client."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from celery import Celery

from producer import Client, EventType, InvalidJob, Status
from producer.protocol import TASK_NAME
from tests.conftest import Fleet, marker

MIB = 1024 * 1024

BAD_SUBMITS: list[tuple[dict[str, Any], str]] = [
    ({}, "prompt: is required"),
    ({"prompt": ""}, "prompt: must not be empty"),
    ({"prompt": "   \n"}, "prompt: must not be empty"),
    ({"prompt": 42}, "prompt: must be a string"),
    ({"prompt": ["a", "b"]}, "prompt: must be a string"),
    ({"prompt": "x" * (MIB + 1)}, "prompt: larger than the limit of 1048576 bytes"),
    ({"prompt": "é" * (MIB // 2 + 1)}, "prompt: larger than the limit"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens: must be between 1 and"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens: must be between 1 and"),
    ({"prompt": "hi", "max_tokens": 10**9}, "max_tokens: must be between 1 and"),
    ({"prompt": "hi", "max_tokens": "12"}, "max_tokens: must be an integer, not a string"),
    ({"prompt": "hi", "max_tokens": True}, "max_tokens: must be an integer, not a boolean"),
    ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens: must be an integer"),
    ({"prompt": "hi", "dialect": "nope"}, "dialect: unknown value 'nope'; expected one of"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature: must be a number"),
    ({"prompt": "hi", "temperature": float("nan")}, "temperature: must be between"),
    ({"prompt": "hi", "top_p": 2}, "top_p: must be between 0 and 1"),
    ({"prompt": "hi", "stop": 5}, "stop: must be a string or a list of strings"),
    ({"prompt": "hi", "stop": [""]}, "stop: each sequence must be"),
    ({"prompt": "hi", "model": "a b"}, "model: may hold only printable ASCII"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, "prompt: give either"),
    ({"messages": []}, "messages: must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role: must be one of"),
    ({"prompt": "hi", "on_interrupt": "retry"}, "on_interrupt: unknown value"),
    ({"prompt": "hi", "job_id": "has space"}, "job_id: must be 1 to 64 letters"),
    ({"prompt": "hi", "job_id": "x" * 65}, "job_id: must be 1 to 64 letters"),
]


@pytest.mark.parametrize(("request_", "message"), BAD_SUBMITS, ids=lambda v: str(v)[:40])
def test_submit_refuses_bad_input_naming_the_field(
    client: Client, request_: dict[str, Any], message: str
) -> None:
    before = client.redis.dbsize()
    with pytest.raises(InvalidJob) as caught:
        client.submit(**request_)
    assert str(caught.value).startswith(message)
    assert client.redis.dbsize() == before, "a refused job must leave nothing behind"


def test_unknown_fields_are_refused_by_name(client: Client) -> None:
    from producer.client import prepare

    with pytest.raises(InvalidJob, match=r"^promt: unknown field"):
        prepare(client.settings, {"promt": "typo"}, None)


@pytest.fixture()
def cli_env(fleet: Fleet) -> dict[str, str]:
    return {**fleet.env}


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", ""], "tokenrelay: prompt: must not be empty"),
        (["submit", "hi", "--max-tokens", "-5"], "tokenrelay: max_tokens: must be between 1 and"),
        (["submit", "hi", "--dialect", "nope"], "tokenrelay: dialect: unknown value 'nope'"),
        (["submit", "hi", "--job-id", "no/slash"], "tokenrelay: job_id: must be 1 to 64"),
        (["status", "bad id"], "tokenrelay: job_id: must be 1 to 64"),
    ],
)
def test_cli_refuses_bad_input_with_exit_status_2(
    cli_env: dict[str, str], args: list[str], message: str
) -> None:
    done = run_cli(cli_env, *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert "Traceback" not in done.stderr


def test_cli_prompt_over_the_configured_limit(cli_env: dict[str, str]) -> None:
    done = run_cli({**cli_env, "TOKENRELAY_MAX_PROMPT_BYTES": "10"}, "submit", "x" * 11)
    assert done.returncode == 2
    assert done.stderr.startswith("tokenrelay: prompt: larger than the limit of 10 bytes")


def test_cli_reports_an_unknown_job_with_exit_status_3(cli_env: dict[str, str]) -> None:
    done = run_cli(cli_env, "status", "no-such-job")
    assert done.returncode == 3
    assert "no job 'no-such-job'" in done.stderr


def test_cli_reports_a_bad_setting_by_its_variable(cli_env: dict[str, str]) -> None:
    done = run_cli({**cli_env, "TOKENRELAY_JOB_TTL": "soon"}, "status", "x")
    assert done.returncode == 2
    assert "TOKENRELAY_JOB_TTL" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"prompt": 7}, "prompt: must be a string"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens: must be between"),
        ({"prompt": "hi", "dialect": "klingon"}, "dialect: unknown value"),
        ({"prompt": "hi", "secret_field": 1}, "secret_field: unknown field"),
        ("just a string", "job: must be an object"),
    ],
)
def test_the_task_refuses_a_bad_job_sent_by_any_celery_client(
    client: Client, fleet: Fleet, spec: Any, field: str
) -> None:
    # A plain Celery client, knowing only the task name and the queue.
    app = Celery("someone-else", broker=fleet.settings.redis_url, set_as_current=False)
    job_id = marker("raw")[1:-1]
    try:
        app.send_task(TASK_NAME, kwargs={"job_id": job_id, "spec": spec}, queue=client.keys.queue)
    finally:
        app.close()
    events = list(client.subscribe(job_id, wait=30).events(timeout=30))
    assert [e.type for e in events] == [EventType.ERROR]
    assert events[-1].fields["code"] == "invalid_job"
    assert events[-1].fields["message"].startswith(field)
    assert client.status(job_id).status is Status.ERROR


def test_a_plain_celery_client_can_enqueue_a_good_job(client: Client, fleet: Fleet) -> None:
    app = Celery("someone-else", broker=fleet.settings.redis_url, set_as_current=False)
    job_id = marker("plain")[1:-1]
    try:
        spec = {"prompt": "Hello", "max_tokens": 6}
        app.send_task(TASK_NAME, kwargs={"job_id": job_id, "spec": spec}, queue=client.keys.queue)
    finally:
        app.close()
    job = client.subscribe(job_id, wait=30)
    from producer.mock_upstream import generate

    assert job.text(timeout=30) == "".join(generate("Hello", 6)[0])

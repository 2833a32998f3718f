"""The ``tokenrelay`` command line, run as a user runs it: a real process against the session's
Redis and worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from producer import Client, Status
from producer.devservers import free_port
from producer.mock_upstream import generate
from tests.conftest import Fleet, marker


def cli(
    fleet: Fleet, *args: str, extra_env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env={**fleet.env, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_submit_follow_prints_the_text(fleet: Fleet) -> None:
    prompt = marker("cli")
    done = cli(fleet, "submit", prompt, "--max-tokens", "12", "--follow")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(generate(prompt, 12)[0]) + "\n"


def test_submit_follow_prints_each_token_as_it_arrives(fleet: Fleet, client: Client) -> None:
    job_id = marker("live")[1:-1]
    args = [
        sys.executable,
        "-m",
        "producer.cli",
        "submit",
        "live prompt",
        "--job-id",
        job_id,
        "--model",
        "mock?delay_ms=150",
        "--max-tokens",
        "20",
        "--follow",
    ]
    with subprocess.Popen(args, env=fleet.env, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        first = process.stdout.read(1)  # blocks until the first token is flushed
        # The job is still streaming: the token was printed live, not at the end.
        assert first
        assert client.status(job_id).status is Status.RUNNING
        rest = process.stdout.read()
        assert process.wait(30) == 0
    assert first + rest == "".join(generate("live prompt", 20)[0]) + "\n"


def test_json_lines_status_and_follow(fleet: Fleet) -> None:
    prompt = marker("json")
    submitted = cli(fleet, "submit", prompt, "--max-tokens", "5")
    job_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and job_id

    followed = cli(fleet, "follow", job_id, "--json", "--timeout", "30")
    assert followed.returncode == 0, followed.stderr
    events = [json.loads(line) for line in followed.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(7))
    assert [e["type"] for e in events] == ["start"] + ["token"] * 5 + ["done"]
    assert all(e["v"] == 1 and e["job"] == job_id for e in events)

    status = cli(fleet, "status", job_id)
    state = json.loads(status.stdout)
    assert state["status"] == "done" and state["tokens"] == 5


def test_cancel_from_the_cli_ends_a_followed_job(fleet: Fleet, client: Client) -> None:
    job = client.submit(prompt=marker("cli-cancel"), model="mock?delay_ms=100", max_tokens=300)
    deadline = time.monotonic() + 20
    while client.status(job.id).status is not Status.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cancelled = cli(fleet, "cancel", job.id)
    assert cancelled.returncode == 0, cancelled.stderr
    followed = cli(fleet, "follow", job.id, "--timeout", "30")
    assert followed.returncode == 1
    assert f"job {job.id} cancelled" in followed.stderr
    assert json.loads(cli(fleet, "status", job.id).stdout)["status"] == "cancelled"


def test_demo_starts_everything_it_needs_and_stops_it(fleet: Fleet) -> None:
    # Nothing answers at this Redis URL, so the demo starts its own redis-server too.
    env = {
        "TOKENRELAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "TOKENRELAY_UPSTREAM_API_KEY": "",
        "TOKENRELAY_UPSTREAM_URL": "http://127.0.0.1:1",
    }
    done = cli(fleet, "demo", "--max-tokens", "10", extra_env=env, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Alan Turing was" + "".join(generate("Alan Turing was", 10)[0]) + "\n"
    assert "started a private redis-server" in done.stderr
    assert "started the mock upstream" in done.stderr
    assert "stopped what the demo started" in done.stderr

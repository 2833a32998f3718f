"""Operations: metrics endpoints, heartbeats, `tokenrelay health|workers|top`, structured logs.

A worker of its own (prefix ``trops``) runs with a metrics port, a short heartbeat and JSON logs.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from producer import Client
from producer.devservers import Process, RedisServer, free_port, start_worker, wait_worker_ready
from producer.mock_upstream import generate
from tests.conftest import Fleet, Gateway, Mock, marker


class OpsWorker:
    def __init__(self, env: dict[str, str], process: Process, metrics_port: int) -> None:
        self.env, self.process, self.metrics_port = env, process, metrics_port

    def metrics(self) -> dict[str, float]:
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def ops_worker(fleet: Fleet, run_dir: Path) -> Iterator[OpsWorker]:
    port = free_port()
    env = {
        **fleet.env,
        "TOKENRELAY_PREFIX": "trops",
        "TOKENRELAY_METRICS_PORT": str(port),
        "TOKENRELAY_HEARTBEAT_SECONDS": "0.5",
        "TOKENRELAY_LOG_FORMAT": "json",
    }
    process = start_worker(env, concurrency=10, name="ops@%h", log_path=run_dir / "ops.log")
    wait_worker_ready(process)
    yield OpsWorker(env, process, port)
    process.stop()


def test_worker_metrics_count_a_job(ops_worker: OpsWorker) -> None:
    before = ops_worker.metrics()
    with Client(settings=fleet_settings(ops_worker)) as client:
        prompt = marker("metrics")
        job = client.submit(prompt=prompt, model="mock?delay_ms=5", max_tokens=25)
        assert job.text(timeout=30) == "".join(generate(prompt, 25)[0])
    # The stream is unregistered just after its terminal event is published.
    deadline = time.monotonic() + 5
    while (after := ops_worker.metrics())["tokenrelay_active_streams"] != 0:
        assert time.monotonic() < deadline, "the active-streams gauge never went back to 0"
        time.sleep(0.05)

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew("tokenrelay_tokens_published_total") == 25
    assert grew('tokenrelay_jobs_finished_total{status="done"}') == 1
    assert grew("tokenrelay_time_to_first_token_seconds_count") == 1
    assert grew("tokenrelay_inter_token_gap_seconds_count") >= 1
    assert grew("tokenrelay_publish_seconds_count") >= 3


def test_worker_metrics_count_upstream_failures(ops_worker: OpsWorker) -> None:
    with Client(settings=fleet_settings(ops_worker)) as client:
        job = client.submit(prompt=marker("m500"), model="mock?status=503&fail_times=1")
        assert job.text(timeout=30)
        job = client.submit(prompt=marker("m401"), model="mock?status=401")
        assert list(job.events(timeout=30))[-1].fields["code"] == "upstream_http"
    after = ops_worker.metrics()
    assert after['tokenrelay_upstream_retries_total{code="upstream_http"}'] >= 1
    assert after['tokenrelay_upstream_errors_total{code="upstream_http"}'] >= 1
    assert after['tokenrelay_jobs_finished_total{status="error"}'] >= 1


def fleet_settings(ops: OpsWorker):  # type: ignore[no-untyped-def]
    from producer.settings import Settings

    return Settings.from_env(ops.env)


def test_structured_logs_have_one_line_per_job_start_and_finish(ops_worker: OpsWorker) -> None:
    prompt = marker("logs") + " a secret-looking prompt body"
    with Client(settings=fleet_settings(ops_worker)) as client:
        job = client.submit(prompt=prompt, max_tokens=7)
        job.text(timeout=30)
    deadline = time.monotonic() + 10
    while f'"job": "{job.id}", "model"' not in ops_worker.process.output():
        assert time.monotonic() < deadline, "no finish line"
        time.sleep(0.05)
    lines = [json.loads(line) for line in ops_worker.process.output().splitlines()
             if line.startswith("{") and job.id in line]  # fmt: skip
    started = [r for r in lines if r.get("event") == "job_started"]
    finished = [r for r in lines if r.get("event") == "job_finished"]
    assert len(started) == 1 and len(finished) == 1
    record = finished[0]
    assert record["outcome"] == "done" and record["tokens"] == 7 and record["attempt"] == 1
    assert record["model"] == "mock" and record["ttft_s"] > 0 and record["duration_s"] > 0
    assert record["level"] == "info" and record["logger"] == "tokenrelay.worker"
    assert "secret-looking prompt body" not in ops_worker.process.output()
    # Celery's own two lines per task (received, succeeded) would repeat these two.
    assert "Task tokenrelay.stream[" not in ops_worker.process.output()


def test_heartbeat_workers_and_health(ops_worker: OpsWorker, fleet: Fleet) -> None:
    listed = json.loads(cli(ops_worker.env, "workers", "--json").stdout)
    assert len(listed) == 1
    (worker,) = listed
    assert worker["pool"] == "gevent" and worker["concurrency"] == 10
    assert worker["pid"] == ops_worker.process.pid and worker["version"]
    assert cli(ops_worker.env, "health").returncode == 0
    assert cli(ops_worker.env, "health", "--all").returncode == 0
    top = cli(ops_worker.env, "top", "--once")
    assert top.returncode == 0 and worker["id"] in top.stdout and "running jobs" in top.stdout

    # Nobody works for this prefix: unhealthy.
    nobody = {**ops_worker.env, "TOKENRELAY_PREFIX": "trnoworkers"}
    result = cli(nobody, "health", "--all")
    assert result.returncode == 1 and "no live workers" in result.stdout


def test_gateway_metrics_and_health_url(gateway: Gateway, client: Client) -> None:
    client.submit(prompt=marker("gwm"), max_tokens=3).text(timeout=30)
    requests.post(gateway.url + "/v1/jobs", json={"prompt": marker("gwm2"), "max_tokens": 2},
                  timeout=10)  # fmt: skip
    metrics = parse_metrics(requests.get(gateway.url + "/metrics", timeout=10).text)
    assert metrics['tokenrelay_gateway_requests_total{route="/v1/jobs",status="202"}'] >= 1
    assert "tokenrelay_queue_depth" in metrics and "tokenrelay_running_jobs" in metrics
    assert "tokenrelay_gateway_streams" in metrics
    # A reader mid-job: its job's feed holds the frames read so far (fewer than it drops at).
    body = {"prompt": marker("gwm3"), "max_tokens": 20, "model": "mock?delay_ms=100"}
    job = requests.post(gateway.url + "/v1/jobs", json=body, timeout=10).json()
    with requests.get(gateway.url + job["events_url"], stream=True, timeout=30) as stream:
        lines = stream.iter_lines()  # held: a generator closed early would close the stream
        for line in lines:
            if line == b"id: 3":
                break
        scraped = parse_metrics(requests.get(gateway.url + "/metrics", timeout=10).text)
    held = scraped["tokenrelay_gateway_feed_frames"] - metrics["tokenrelay_gateway_feed_frames"]
    assert 4 <= held <= 22
    env = {"PATH": "", "HOME": "/"}
    assert cli(env, "health", "--url", gateway.url + "/healthz").returncode == 0
    bad = cli(env, "health", "--url", f"http://127.0.0.1:{free_port()}/healthz")
    assert bad.returncode == 1 and "unhealthy" in bad.stdout


def test_heartbeat_expires_when_a_worker_is_killed(
    fleet: Fleet, mock: Mock, run_dir: Path, redis_server: RedisServer
) -> None:
    env = {**fleet.env, "TOKENRELAY_PREFIX": "trbeat", "TOKENRELAY_HEARTBEAT_SECONDS": "0.3"}
    process = start_worker(env, concurrency=2, name="beat@%h", log_path=run_dir / "beat.log")
    try:
        deadline = time.monotonic() + 30
        while cli(env, "health").returncode != 0:
            assert time.monotonic() < deadline, process.output()[-2000:]
            time.sleep(0.2)
        process.signal(signal.SIGKILL)
        killed = time.monotonic()
        while cli(env, "health", "--all").returncode == 0:
            assert time.monotonic() < killed + 10, "heartbeat never expired"
            time.sleep(0.1)
        assert time.monotonic() - killed < 5
    finally:
        process.stop()
    assert re.search(r"no live worker", cli(env, "health").stdout)


def test_freeze_startup_takes_the_heap_out_of_the_collectors_walks() -> None:
    """Objects alive at the freeze are no longer walked by a collection; later ones are. (In a
    subprocess: freezing would keep the test session's own garbage for ever.)"""
    code = """
import gc, logging
from producer.heap import freeze_startup
before = [[index] for index in range(50_000)]
frozen = freeze_startup(logging.getLogger("t"))
after = [[index] for index in range(10)]
walked = {id(o) for o in gc.get_objects()}
print(frozen, sum(id(o) in walked for o in before), sum(id(o) in walked for o in after))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    frozen, before_walked, after_walked = map(int, result.stdout.split())
    assert frozen >= 50_000
    assert before_walked == 0
    assert after_walked == 10


def test_worker_and_gateway_freeze_their_startup_heap(fleet: Fleet, gateway: Gateway) -> None:
    for name, output in (("worker", fleet.process.output()), ("gateway", gateway.log())):
        found = re.search(r"froze (\d+) start-up objects", output)
        assert found, f"{name} did not freeze its start-up heap:\n{output[-2000:]}"
        assert int(found[1]) > 10_000, f"{name} froze only {found[1]} objects"

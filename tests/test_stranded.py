"""Jobs whose queue message was lost: created, never claimed. A worker puts each back on the
queue once it has waited past the queued grace, so nothing accepted stays ``queued`` for ever.

A worker of its own (prefix ``trstrand``) runs with a queued grace of one second. Its broker is
another database of the session's Redis: when the broker is the jobs' own Redis, a job's message
is queued in the call that creates it, and a producer cannot die in between.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import Client
from producer.devservers import (
    Process,
    RedisServer,
    start_worker,
    wait_worker_ready,
    worker_args,
    worker_env,
)
from producer.mock_upstream import generate
from producer.protocol import Keys
from producer.scripts import REQUEUE_DUE
from producer.settings import Settings
from tests.conftest import Fleet, Mock, marker

GRACE = 1.0


class Stranded:
    def __init__(self, env: dict[str, str], process: Process) -> None:
        self.env, self.process = env, process
        self.settings = Settings.from_env(env)


def _env(redis_server: RedisServer, mock: Mock, api_key: str, prefix: str) -> dict[str, str]:
    """A worker's environment: a queued grace of ``GRACE``, the broker in database 1."""
    return worker_env(
        redis_server.url,
        prefix,
        upstream_url=mock.url,
        upstream_api_key=api_key,
        queued_grace=str(GRACE),
        broker_url=redis_server.url.removesuffix("/0") + "/1",
    )


@pytest.fixture(scope="module")
def stranded(
    redis_server: RedisServer, mock: Mock, api_key: str, run_dir: Path
) -> Iterator[Stranded]:
    env = _env(redis_server, mock, api_key, "trstrand")
    process = start_worker(env, concurrency=10, name="stranded@%h", log_path=run_dir / "s.log")
    try:
        wait_worker_ready(process)
        yield Stranded(env, process)
    finally:
        process.stop()


def _dies_here(*_: object) -> None:
    raise KeyboardInterrupt  # the producer's process ends here: no clean-up of its own runs


def _created_not_queued(
    client: Client, monkeypatch: pytest.MonkeyPatch, prompt: str, job_id: str
) -> None:
    """Submit a job whose producer dies between creating it and queueing its message."""
    with monkeypatch.context() as patch:
        patch.setattr(client._enqueuer, "send", _dies_here)
        with pytest.raises(KeyboardInterrupt):
            client.submit(prompt, model="mock", max_tokens=8, job_id=job_id)


def test_a_job_whose_producer_died_before_queueing_it_runs_after_the_grace(
    stranded: Stranded, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = marker("stranded")
    job_id = "stranded-" + secrets.token_hex(4)
    with Client(settings=stranded.settings) as client:
        _created_not_queued(client, monkeypatch, prompt, job_id)
        assert client.status(job_id).status == "queued"
        # Retrying with the same id finds the job: it is the sweep that runs it.
        assert client.submit(prompt, model="mock", max_tokens=8, job_id=job_id).id == job_id
        text = client.subscribe(job_id).text(timeout=30)
        assert client.redis.zscore(client.keys.queued, job_id) is None
    assert text == "".join(generate(prompt, 8)[0])
    assert f"job {job_id}: not taken by any worker" in stranded.process.output()


def test_a_job_whose_takeover_message_was_lost_runs_after_the_grace(
    stranded: Stranded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker died mid-stream and a reaper re-enqueued the attempt, but that message never
    reached the broker: the job is running with no lease and its attempt marked re-enqueued."""
    prompt = marker("takeover")
    job_id = "takeover-" + secrets.token_hex(4)
    with Client(settings=stranded.settings) as client:
        _created_not_queued(client, monkeypatch, prompt, job_id)
        client.redis.hset(
            client.keys.state(job_id),
            mapping={"status": "running", "attempt": 1, "requeued": 1, "owner": "dead"},
        )
        text = client.subscribe(job_id).text(timeout=30)
        state = client.status(job_id)
    assert text == "".join(generate(prompt, 8)[0])
    assert (state.status, state.attempt) == ("done", 2)


def test_a_job_cancelled_while_queued_leaves_the_queued_set_without_running(
    stranded: Stranded, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = "cancelled-" + secrets.token_hex(4)
    with Client(settings=stranded.settings) as client:
        _created_not_queued(client, monkeypatch, marker("cancel"), job_id)
        assert client.cancel(job_id).status == "cancelled"
        deadline = time.monotonic() + 10 * GRACE + 10
        while client.redis.zscore(client.keys.queued, job_id) is not None:
            assert time.monotonic() < deadline, "the cancelled job stayed in the queued set"
            time.sleep(0.1)
        assert client.status(job_id).status == "cancelled"
    assert f"job {job_id}: not taken" not in stranded.process.output()


def test_a_job_left_waiting_is_queued_again_less_and_less_often(
    redis_server: RedisServer,
    mock: Mock,
    api_key: str,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backlog longer than the grace: nobody takes the job (this worker consumes another
    queue), so every message the sweep sends stays queued. The sweep sends one after the grace,
    then waits as long as the job's age before the next, instead of sending one every grace."""
    env = _env(redis_server, mock, api_key, "trbackoff")
    args = [*worker_args(concurrency=4, name="backoff@%h"), "-Q", "trbackoff.elsewhere"]
    process = Process(args, env=env, log_path=run_dir / "backoff.log")
    job_id = "backoff-" + secrets.token_hex(4)
    settings = Settings.from_env(env)
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        wait_worker_ready(process)
        with Client(settings=settings) as client:
            _created_not_queued(client, monkeypatch, marker("backoff"), job_id)
            deadline = time.monotonic() + 20
            while broker.llen(client.keys.queue) < 3:
                assert time.monotonic() < deadline, process.output()[-2000:]
                time.sleep(0.05)
            client.cancel(job_id)
        found = re.findall(rf"job {job_id}: not taken by any worker ([0-9.]+) s", process.output())
        ages = [float(age) for age in found]
    finally:
        process.stop()
        broker.delete(Keys("trbackoff").queue)
        broker.close()
    assert len(ages) == 3, ages  # one message per re-enqueue, and no other
    assert GRACE <= ages[0] < ages[1] < ages[2]
    for earlier, later in itertools.pairwise(ages):
        assert later - earlier >= earlier - 0.15, ages  # waited at least the job's age


def test_jobs_that_ran_are_not_left_in_the_queued_set(fleet: Fleet) -> None:
    with fleet.client() as client:
        jobs = [client.submit(marker("ran"), model="mock", max_tokens=3) for _ in range(5)]
        for job in jobs:
            job.text(timeout=30)
        assert [client.redis.zscore(client.keys.queued, job.id) for job in jobs] == [None] * 5


def test_only_one_of_two_workers_looking_at_once_queues_a_job_again(
    redis_server: RedisServer,
) -> None:
    queued = Keys("trstrand-unit-" + secrets.token_hex(3)).queued
    client = redis.Redis(port=redis_server.port)
    try:
        due = client.register_script(REQUEUE_DUE)
        client.zadd(queued, {"old": 1_000, "new": 9_000})
        cutoff, now = 5_000, 10_000
        first = [due(keys=[queued], args=[job, cutoff, now]) for job in ("old", "new", "gone")]
        second = due(keys=[queued], args=["old", cutoff, now + 1])
        assert first == [1, 0, 0]
        assert second == 0
        assert client.zscore(queued, "old") == now
    finally:
        client.delete(queued)
        client.close()

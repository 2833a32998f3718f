"""The fault-injection suite: real worker processes, a Redis the tests kill and restart, and the
mock upstream's fault switches. For each fault, the exact outcome a user sees.

The fleet here has its own event-bus Redis (append-only, restartable) and a separate broker
Redis, two workers with a 2-second lease (so a dead worker's job is taken over in seconds), and a
1-second shutdown grace. Measured recovery times are written to ``TOKENRELAY_FAULT_REPORT`` when
that variable names a file (``ops/FAULTS.md`` quotes them).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client, EventType, Status
from producer.devservers import Process, RedisServer, start_worker, wait_worker_ready, worker_env
from producer.mock_upstream import generate
from producer.protocol import Event, Keys
from producer.settings import Settings
from tests.conftest import Mock, marker
from tests.test_pipeline import assert_well_formed, token_text

pytestmark = pytest.mark.slow

LEASE = 2.0
MEASURED: dict[str, float] = {}


class FaultFleet:
    def __init__(self, run_dir: Path, mock: Mock, api_key: str) -> None:
        self.dir = run_dir / "faults"
        self.dir.mkdir()
        (self.dir / "bus").mkdir()
        (self.dir / "broker").mkdir()
        self.bus = RedisServer(directory=self.dir / "bus", appendonly=True).start()
        self.broker = RedisServer(directory=self.dir / "broker").start()
        self.env = worker_env(
            self.bus.url,
            "trfault",
            broker_url=self.broker.url,
            upstream_url=mock.url,
            upstream_api_key=api_key,
            lease_seconds=str(LEASE),
            shutdown_grace="1",
            upstream_read_timeout="1.5",
            upstream_retries="3",
            upstream_retry_wait="5",
            max_attempts="3",
        )
        self.workers: list[Process] = []
        self.count = 0

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def add_worker(self) -> Process:
        self.count += 1
        log_path = self.dir / f"worker-{self.count}.log"
        process = start_worker(
            self.env, concurrency=20, name=f"fault{self.count}@%h", log_path=log_path
        )
        wait_worker_ready(process)
        self.workers.append(process)
        return process

    def worker_of(self, client: Client, job_id: str) -> Process:
        """The worker process running the job now (its pid is in the lease owner's name)."""
        owner = client.redis.hget(client.keys.state(job_id), "owner")
        assert owner, "the job has no owner"
        pid = int(owner.decode().split(":")[0].rsplit("-", 2)[1])
        (process,) = [w for w in self.workers if w.pid == pid]
        return process

    def replace(self, process: Process) -> None:
        self.workers.remove(process)
        process.stop()
        self.add_worker()

    def stop(self) -> None:
        for process in self.workers:
            process.stop()
        self.bus.stop()
        self.broker.stop()


@pytest.fixture(scope="module")
def faults(run_dir: Path, mock: Mock, api_key: str) -> Iterator[FaultFleet]:
    fleet = FaultFleet(run_dir, mock, api_key)
    try:
        fleet.add_worker()
        fleet.add_worker()
        yield fleet
    finally:
        fleet.stop()
        report = os.environ.get("TOKENRELAY_FAULT_REPORT")
        if report:
            Path(report).write_text(json.dumps(MEASURED, indent=2))


@pytest.fixture()
def fclient(faults: FaultFleet) -> Iterator[Client]:
    with Client(settings=faults.settings) as client:
        yield client


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def follow(job: Any, timeout: float = 60) -> tuple[list[Event], list[float]]:
    """Read a job in a thread; return its events and their arrival times."""
    events: list[Event] = []
    times: list[float] = []

    def read() -> None:
        for event in job.events(timeout=timeout):
            events.append(event)
            times.append(time.monotonic())

    thread = threading.Thread(target=read)
    thread.start()
    return events, times  # filled as the thread reads; join via wait_done


def wait_done(events: list[Event], timeout: float = 60) -> None:
    wait_for(lambda: bool(events) and events[-1].terminal, timeout, "no terminal event")


def log_is_clean(client: Client, job_id: str) -> list[Event]:
    """The log holds every seq once, in order, with one terminal event at the end."""
    from producer.reading import events_from_log

    events = events_from_log(client.redis.xrange(client.keys.log(job_id)))
    assert_well_formed(events, job_id)
    return events


def final_attempt_text(events: list[Event]) -> str:
    last_restart = max((i for i, e in enumerate(events) if e.type is EventType.RESTART), default=0)
    return token_text(events[last_restart:])


# --- worker crashes -----------------------------------------------------------------------------


def test_sigkill_mid_stream_is_taken_over_and_readers_get_attempt_two(
    faults: FaultFleet, fclient: Client
) -> None:
    prompt = marker("sigkill")
    job = fclient.submit(prompt=prompt, model="mock?delay_ms=40", max_tokens=120, follow=True)
    events, times = follow(job)
    wait_for(lambda: len(events) > 10, 20, "the job never streamed")
    victim = faults.worker_of(fclient, job.id)
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_done(events, 60)

    restart = next(i for i, e in enumerate(events) if e.type is EventType.RESTART)
    recovery = times[restart] - killed_at
    MEASURED["sigkill_takeover_s"] = round(recovery, 2)
    assert recovery < 15, f"takeover took {recovery:.1f} s"
    assert events[-1].type is EventType.DONE
    assert final_attempt_text(events) == "".join(generate(prompt, 120)[0])
    assert job.text(timeout=10) == "".join(generate(prompt, 120)[0])  # the library drops attempt 1
    state = fclient.status(job.id)
    assert state.status is Status.DONE and state.attempt == 2
    assert sum(1 for e in events if e.type is EventType.START) == 2
    log_is_clean(fclient, job.id)
    faults.replace(victim)


def test_a_job_that_keeps_killing_its_workers_stops_after_max_attempts(
    faults: FaultFleet, fclient: Client
) -> None:
    job = fclient.submit(
        prompt=marker("killer"), model="mock?delay_ms=40", max_tokens=400, follow=True
    )
    events, _ = follow(job, timeout=120)
    for attempt in (1, 2, 3):
        wait_for(
            lambda a=attempt: (
                fclient.status(job.id).attempt == a
                and fclient.redis.hget(fclient.keys.state(job.id), "owner")
            ),
            30,
            f"attempt {attempt} never started",
        )
        wait_for(lambda: fclient.status(job.id).tokens >= 3, 20, "no tokens")
        victim = faults.worker_of(fclient, job.id)
        victim.signal(signal.SIGKILL)
        faults.replace(victim)
    wait_done(events, 60)
    assert events[-1].type is EventType.ERROR
    assert events[-1].fields["code"] == "too_many_attempts"
    log_is_clean(fclient, job.id)


def test_two_workers_racing_for_a_lapsed_lease_never_both_take_it(fclient: Client) -> None:
    from producer import scripts

    keys = fclient.keys
    claim = fclient.redis.register_script(scripts.CLAIM)
    takeover = fclient.redis.register_script(scripts.TAKEOVER)
    both_ran = requeued_twice = 0
    for round_ in range(100):
        job_id = f"race-{round_}-{time.monotonic_ns()}"
        state = keys.state(job_id)
        fclient.redis.hset(
            state, mapping={"status": "running", "attempt": 1, "seq": 5, "owner": "dead-worker"}
        )
        fclient.redis.expire(state, 60)  # its lease key is gone: the worker died
        results: dict[str, list[Any]] = {"claim": [], "takeover": []}
        barrier = threading.Barrier(4)

        def race(
            kind: str,
            me: str,
            job_id: str = job_id,
            barrier: threading.Barrier = barrier,
            results: dict[str, list[Any]] = results,
        ) -> None:
            racer = redis.Redis.from_url(fclient.settings.redis_url)
            barrier.wait()
            if kind == "takeover":
                out = takeover(keys=[keys.state(job_id), keys.lease(job_id)], client=racer)
            else:
                out = claim(
                    keys=[keys.state(job_id), keys.lease(job_id)], args=[me, 2000, 0], client=racer
                )[0]
            results[kind].append(out)
            racer.close()

        kinds = ["takeover", "takeover", "claim", "claim"]
        threads = [threading.Thread(target=race, args=(k, f"w{i}")) for i, k in enumerate(kinds)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        both_ran += results["claim"].count(b"claimed") > 1
        assert results["claim"].count(b"claimed") == 1, results
        requeued_twice += results["takeover"].count(b"requeue") > 1
        fclient.redis.delete(state, keys.lease(job_id))
    assert both_ran == 0 and requeued_twice == 0


# --- upstream failures --------------------------------------------------------------------------


def run_job(client: Client, prompt: str, model: str, **options: Any) -> tuple[list[Event], float]:
    started = time.monotonic()
    job = client.submit(prompt=prompt, model=model, follow=True, **options)
    events = list(job.events(timeout=60))
    assert_well_formed(events, job.id)
    return events, time.monotonic() - started


def upstream_calls(mock: Mock, prompt: str) -> int:
    return sum(1 for r in mock.stats() if str(r.get("prompt_head", "")).startswith(prompt))


def test_429_with_retry_after_is_honoured_then_succeeds(fclient: Client, mock: Mock) -> None:
    prompt = marker("429")
    events, took = run_job(
        fclient, prompt, "mock?status=429&retry_after=1&fail_times=2", max_tokens=10
    )
    assert events[-1].type is EventType.DONE
    assert token_text(events) == "".join(generate(prompt, 10)[0])
    assert upstream_calls(mock, prompt) == 3
    assert took >= 2.0, "Retry-After: 1 was not honoured twice"
    MEASURED["429_retry_after_1s_x2_s"] = round(took, 2)

    prompt = marker("429ms")
    events, took = run_job(
        fclient, prompt, "mock?status=429&retry_after_ms=300&fail_times=1", max_tokens=5
    )
    assert events[-1].type is EventType.DONE and took >= 0.3


def test_503_then_success(fclient: Client, mock: Mock) -> None:
    prompt = marker("503")
    events, took = run_job(fclient, prompt, "mock?status=503&fail_times=1", max_tokens=10)
    assert events[-1].type is EventType.DONE
    assert token_text(events) == "".join(generate(prompt, 10)[0])
    assert upstream_calls(mock, prompt) == 2
    MEASURED["503_once_s"] = round(took, 2)


def test_persistent_500_gives_up_after_the_retry_cap(fclient: Client, mock: Mock) -> None:
    prompt = marker("500")
    events, took = run_job(fclient, prompt, "mock?status=500", max_tokens=10)
    error = events[-1]
    assert error.type is EventType.ERROR and error.fields["code"] == "upstream_http"
    assert error.fields["status"] == 500
    assert "gave up after 3 retries" in error.fields["message"]
    assert upstream_calls(mock, prompt) == 4
    MEASURED["500_give_up_s"] = round(took, 2)


def test_401_is_not_retried(fclient: Client, mock: Mock) -> None:
    prompt = marker("401")
    events, _ = run_job(fclient, prompt, "mock?status=401", max_tokens=10)
    assert events[-1].fields["code"] == "upstream_http" and events[-1].fields["status"] == 401
    assert upstream_calls(mock, prompt) == 1


def test_a_stall_ends_in_upstream_timeout(fclient: Client, mock: Mock) -> None:
    prompt = marker("stall")
    events, took = run_job(fclient, prompt, "mock?stall_after=4", max_tokens=10)
    assert events[-1].fields["code"] == "upstream_timeout"
    assert token_text(events) == "".join(generate(prompt, 10)[0][:4])
    MEASURED["stall_detected_s"] = round(took, 2)
    wait_for(lambda: mock.record(prompt)["state"] == "disconnected", 10, "stall left open")


def test_a_job_past_its_deadline_ends_in_deadline_exceeded(fclient: Client) -> None:
    events, took = run_job(
        fclient, marker("late"), "mock?delay_ms=100", max_tokens=100, deadline=1.0
    )
    assert events[-1].fields["code"] == "deadline_exceeded"
    assert 1.0 <= took < 3.0


def test_a_malformed_event_ends_in_upstream_protocol(fclient: Client) -> None:
    events, _ = run_job(fclient, marker("bad"), "mock?malformed_after=2", max_tokens=10)
    assert events[-1].fields["code"] == "upstream_protocol"
    assert len([e for e in events if e.type is EventType.TOKEN]) == 2


def test_a_dropped_stream_ends_in_error_keeping_what_was_delivered(fclient: Client) -> None:
    prompt = marker("drop")
    events, _ = run_job(fclient, prompt, "mock?drop_after=5", max_tokens=20)
    assert events[-1].fields["code"] == "upstream_disconnected"
    assert token_text(events) == "".join(generate(prompt, 20)[0][:5])


@pytest.mark.parametrize("dialect", ["together", "openai-completions", "openai-chat"])
def test_a_dropped_stream_continues_seamlessly_when_asked(fclient: Client, dialect: str) -> None:
    prompt = marker("cont")
    events, _ = run_job(
        fclient,
        prompt,
        "mock?drop_after=8",
        max_tokens=20,
        dialect=dialect,
        on_interrupt="continue",
    )
    assert events[-1].type is EventType.DONE
    assert token_text(events) == "".join(generate(prompt, 20)[0])
    assert not any(e.type is EventType.RESTART for e in events)
    state = fclient.status(events[0].job)
    assert state.resumed == 2 and state.tokens == 20


# --- Redis faults -------------------------------------------------------------------------------


def test_client_kill_of_worker_and_reader_connections_mid_stream(
    faults: FaultFleet, fclient: Client
) -> None:
    prompt = marker("ckill")
    job = fclient.submit(prompt=prompt, model="mock?delay_ms=20", max_tokens=150, follow=True)
    events, _ = follow(job)
    admin = redis.Redis(port=faults.bus.port)
    for _ in range(3):
        seen = len(events)
        wait_for(lambda seen=seen: len(events) > seen + 10, 20, "no progress")
        killed = admin.client_kill_filter(_type="normal", skipme=True)
        killed += admin.client_kill_filter(_type="pubsub", skipme=True)
        assert killed >= 2
    admin.close()
    wait_done(events)
    assert events[-1].type is EventType.DONE
    assert token_text(events) == "".join(generate(prompt, 150)[0])
    assert_well_formed(events, job.id)
    log_is_clean(fclient, job.id)
    assert fclient.status(job.id).attempt == 1, "a dropped connection must not restart the job"


def test_a_reader_cut_off_as_a_slow_consumer_recovers_from_the_log(
    faults: FaultFleet, fclient: Client
) -> None:
    admin = redis.Redis(port=faults.bus.port)
    admin.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")
    tokens = 120_000
    redis_log = faults.bus.directory / "redis.log"

    def cut_off() -> int:
        return redis_log.read_text().count("overcoming of output buffer limits")

    cuts_before = cut_off()
    try:
        prompt = marker("slowpoke")
        job = fclient.submit(
            prompt=prompt, model="mock?delay_ms=0&burst=100", max_tokens=tokens, follow=True
        )
        # A reader that stops reading while the job floods its channel: once the kernel's
        # socket buffers are full, Redis's output buffer for it grows and Redis disconnects it.
        events = []
        for event in job.events(timeout=120):
            events.append(event)
            if len(events) == 2:
                wait_for(lambda: cut_off() > cuts_before, 60, "Redis never cut the reader off")
    finally:
        admin.config_set("client-output-buffer-limit", "pubsub 32mb 8mb 60")
        admin.close()
    assert cut_off() > cuts_before
    assert_well_formed(events, job.id)
    assert token_text(events) == "".join(generate(prompt, tokens)[0])


def underway(client: Client, prompt: str, tokens: int) -> tuple[Any, list[Event], list[float]]:
    """A job of ``tokens`` at 20 ms each, read in a thread, once 10 of its events have arrived."""
    job = client.submit(prompt=prompt, model="mock?delay_ms=20", max_tokens=tokens, follow=True)
    events, times = follow(job, timeout=90)
    wait_for(lambda: len(events) > 10, 20, "no progress")
    return job, events, times


def test_redis_restart_with_aof_mid_stream(faults: FaultFleet, fclient: Client) -> None:
    prompt = marker("restart")
    job, events, times = underway(fclient, prompt, 200)
    port, directory = faults.bus.port, faults.bus.directory
    faults.bus.stop()
    down_at = time.monotonic()
    time.sleep(0.5)
    faults.bus = RedisServer(port=port, directory=directory, appendonly=True).start()
    n_before = len(events)
    wait_for(lambda: len(events) > n_before, 30, "nothing after the restart")
    MEASURED["redis_restart_first_event_after_s"] = round(times[n_before] - down_at, 2)
    wait_done(events, 60)
    assert events[-1].type is EventType.DONE
    assert final_attempt_text(events) == "".join(generate(prompt, 200)[0])
    assert_well_formed(events, job.id)
    logged = log_is_clean(fclient, job.id)
    assert logged == events


# --- graceful shutdown --------------------------------------------------------------------------


def test_sigterm_lets_short_streams_finish_and_hands_long_ones_back(
    faults: FaultFleet, fclient: Client
) -> None:
    long_prompt = marker("long")
    long_job = fclient.submit(
        prompt=long_prompt, model="mock?delay_ms=40", max_tokens=150, follow=True
    )
    long_events, times = follow(long_job)
    wait_for(lambda: len(long_events) > 5, 20, "long job not streaming")
    victim = faults.worker_of(fclient, long_job.id)
    short = [
        fclient.submit(prompt=marker("short"), model="mock?delay_ms=30", max_tokens=10)
        for _ in range(4)
    ]
    victim.signal(signal.SIGTERM)
    term_at = time.monotonic()
    victim.popen.wait(15)
    exited_after = time.monotonic() - term_at
    MEASURED["sigterm_worker_exit_s"] = round(exited_after, 2)
    assert exited_after < 5, "the stopping worker did not exit soon after its grace"
    for job in short:
        assert job.text(timeout=30)
        assert job.status().status is Status.DONE
    wait_done(long_events, 60)
    assert long_events[-1].type is EventType.DONE
    restart = next(i for i, e in enumerate(long_events) if e.type is EventType.RESTART)
    MEASURED["sigterm_handback_restart_s"] = round(times[restart] - term_at, 2)
    assert final_attempt_text(long_events) == "".join(generate(long_prompt, 150)[0])
    starts = [e for e in long_events if e.type is EventType.START]
    assert f"-{victim.pid}-" in starts[0].fields["worker"]
    assert f"-{victim.pid}-" not in starts[-1].fields["worker"], "a stopping worker took it"

    assert "handed back to the queue at shutdown" in victim.output()
    faults.replace(victim)


def test_no_key_outside_the_namespace_and_no_secret_after_the_faults(
    faults: FaultFleet, fclient: Client, api_key: str
) -> None:
    from tests.test_secrets import every_redis_byte

    stored = every_redis_byte(faults.bus)
    assert api_key[-16:].encode() not in stored
    for path in faults.dir.glob("*.log"):
        assert api_key[-16:].encode() not in path.read_bytes(), path.name
    keys = [k.decode() for k in fclient.redis.scan_iter(count=1000)]
    prefix = Keys("trfault").prefix
    assert keys and all(k.startswith(prefix + ":") for k in keys), sorted(keys)[:10]


def test_a_redelivered_message_of_a_running_or_finished_job_is_dropped(
    faults: FaultFleet, fclient: Client
) -> None:
    from celery import Celery

    from producer.protocol import TASK_NAME

    prompt = marker("dup")
    job = fclient.submit(prompt=prompt, model="mock?delay_ms=30", max_tokens=40, follow=True)
    events, _ = follow(job)
    wait_for(lambda: len(events) > 3, 20, "not streaming")
    app = Celery("redeliver", broker=faults.settings.broker_url, set_as_current=False)
    try:
        send = {"kwargs": {"job_id": job.id}, "queue": fclient.keys.queue}
        app.send_task(TASK_NAME, **send)  # while it runs elsewhere, under a live lease
        wait_done(events)
        app.send_task(TASK_NAME, **send)  # after it finished
        logs = lambda: "".join(w.output() for w in faults.workers)  # noqa: E731
        wait_for(lambda: f"job {job.id}: not run, finished" in logs(), 20, "not dropped")
        assert f"job {job.id}: not run, busy" in logs()
    finally:
        app.close()
    assert [e.type for e in events].count(EventType.START) == 1
    assert log_is_clean(fclient, job.id) == events
    assert token_text(events) == "".join(generate(prompt, 40)[0])


def test_a_redis_error_before_the_claim_delivers_the_job_again(
    faults: FaultFleet, fclient: Client
) -> None:
    # The running set holds the wrong type: the worker's first command for a job (ZADD, before
    # the claim) fails at once. The delivery must come back, not leave the job queued for ever.
    running = fclient.keys.running
    saved = fclient.redis.zrange(running, 0, -1, withscores=True)
    fclient.redis.delete(running)
    fclient.redis.set(running, "not a sorted set")
    try:
        prompt = marker("redeliver")
        job = fclient.submit(prompt=prompt, model="mock", max_tokens=10, follow=True)
        logs = lambda: "".join(w.output() for w in faults.workers)  # noqa: E731
        wait_for(lambda: f"job {job.id}: Redis failed" in logs(), 20, "no redelivery")
        assert fclient.status(job.id).status is Status.QUEUED
    finally:
        fclient.redis.delete(running)
        if saved:
            fclient.redis.zadd(running, dict(saved))
    events = list(job.events(timeout=30))
    assert token_text(events) == "".join(generate(prompt, 10)[0])
    assert [e.type for e in events].count(EventType.START) == 1
    assert fclient.status(job.id).status is Status.DONE


# --- the broker ---------------------------------------------------------------------------------


def test_a_broker_outage_refuses_submits_and_spares_running_streams(
    faults: FaultFleet, fclient: Client
) -> None:
    """The broker (a Redis of its own, no persistence) stops for a second while a job streams.
    A submit meanwhile fails with the broker's error and leaves no job behind; the running job
    carries on (no ``restart``) and ends ``done`` with its full text; once the broker is back,
    new jobs run."""
    prompt = marker("broker")
    _, events, _ = underway(fclient, prompt, 150)
    port, directory = faults.broker.port, faults.broker.directory
    faults.broker.stop()
    down_at = time.monotonic()
    refused = marker("refused")
    try:
        with pytest.raises(Exception) as raised:
            fclient.submit(prompt=refused, model="mock", max_tokens=3, job_id=refused[1:-1])
        refused_after = time.monotonic() - down_at
        assert not fclient.redis.exists(fclient.keys.state(refused[1:-1]))
        assert fclient.redis.zscore(fclient.keys.queued, refused[1:-1]) is None
    finally:
        time.sleep(max(0.0, 1.0 - (time.monotonic() - down_at)))
        faults.broker = RedisServer(port=port, directory=directory).start()
    wait_done(events, 60)
    MEASURED["broker_outage_submit_refused_after_s"] = round(refused_after, 2)
    assert "Connection refused" in str(raised.value) or "connect" in str(raised.value).lower()
    assert events[-1].type is EventType.DONE, events[-1]
    assert final_attempt_text(events) == "".join(generate(prompt, 150)[0])
    assert EventType.RESTART not in [e.type for e in events]  # the stream carried on
    back = marker("back")
    started = time.monotonic()
    events_after, _ = run_job(fclient, back, "mock", max_tokens=5)
    MEASURED["broker_back_job_done_s"] = round(time.monotonic() - started, 2)
    assert events_after[-1].type is EventType.DONE
    assert token_text(events_after) == "".join(generate(back, 5)[0])
    assert all(w.alive() for w in faults.workers)


def test_one_redis_for_events_and_broker_restarted_mid_stream(
    run_dir: Path, mock: Mock, api_key: str
) -> None:
    """The default deployment: one Redis (append-only) is both the event bus and the broker. It
    restarts while a job streams: the worker's consumer reconnects, and the stream itself carries
    on (no ``restart``) once its publishes get through again."""
    directory = run_dir / "single-redis"
    directory.mkdir()
    server = RedisServer(directory=directory, appendonly=True).start()
    env = worker_env(
        server.url, "trsingle", upstream_url=mock.url, upstream_api_key=api_key, lease_seconds="5"
    )
    worker = start_worker(env, concurrency=10, name="single@%h", log_path=directory / "w.log")
    try:
        wait_worker_ready(worker)
        with Client(settings=Settings.from_env(env)) as client:
            prompt = marker("single")
            job, events, _ = underway(client, prompt, 150)
            port = server.port
            server.stop()
            time.sleep(0.5)
            server = RedisServer(port=port, directory=directory, appendonly=True).start()
            wait_done(events, 60)
            assert events[-1].type is EventType.DONE, events[-1]
            assert EventType.RESTART not in [e.type for e in events]
            assert token_text(events) == "".join(generate(prompt, 150)[0])
            assert log_is_clean(client, job.id) == events
            after = marker("single-after")
            done, _ = run_job(client, after, "mock", max_tokens=5)
            assert token_text(done) == "".join(generate(after, 5)[0])
        assert worker.alive()
    finally:
        worker.stop()
        server.stop()

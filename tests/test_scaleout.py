"""Scale-out across hosts: three worker processes as three separate hosts share 300 jobs, and
cutting one host off mid-run loses no job.

Each host is a network namespace of its own (``ip netns``) joined to the test's private Redis by a
veth pair on a /30 subnet of ``10.231.0.0/16``; it runs its own mock upstream on its own loopback
and one gevent worker that reaches Redis (events and broker) only through its veth. The test
submits 300 jobs from the root namespace, waits until every job has been claimed and the second
host is streaming several of them, then takes that host's link down. Its leases lapse, the other
workers' reapers re-enqueue its jobs (attempt 2, announced with a ``restart`` event), and every
job still ends ``done`` with exactly the text the mock upstream generates. At the end the link
comes back, and the jobs the partitioned worker was still streaming must stay as they finished:
its late publishes are fenced.

Where namespaces are not permitted (no root, no ``ip``, a container without ``CAP_NET_ADMIN``,
or ``TR_SCALEOUT_NO_NETNS=1`` in the environment) the three hosts are plain processes on
127.0.0.1 instead, the cut is a SIGKILL of the second host's processes, and the test says so in
its output.

Why the cut waits until every job has been claimed: with the Redis broker, a message Redis has
popped for a worker's ``BRPOP`` exists only on the wire until that worker records it as
unacknowledged, and a job is in the reapers' view only once a worker claimed it. A message in
flight to a host at the moment it is cut off is therefore not the lease's to recover; the test
cuts the host while it streams claimed jobs, which is what the lease protects.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from producer import Client, EventType, Status
from producer.devservers import (
    Process,
    RedisServer,
    free_port,
    wait_worker_ready,
    worker_args,
    worker_env,
)
from producer.mock_upstream import generate
from producer.protocol import Event
from producer.reading import events_from_log
from producer.settings import Settings
from tests.test_pipeline import token_text

pytestmark = pytest.mark.slow

HOSTS = 3
CUT = 2  # the host that is cut off (1-based), wait_worker_ready
JOBS = 300
TOKENS = 30
MODEL = "mock?delay_ms=20"
LEASE = 2.0
CONCURRENCY = 120
RUNNING_AT_CUT = 5  # the cut host streams at least this many jobs when it is cut off
NO_NETNS_ENV = "TR_SCALEOUT_NO_NETNS"
TROUBLE = (
    "Couldn't ack",
    "cannot be acknowledged after a connection loss",
    "stopped renewing the lease",
    "Traceback",
)


class NetnsUnavailable(RuntimeError):
    """Network namespaces (or veth pairs) cannot be used here."""


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=15, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsUnavailable(f"`ip {' '.join(args)}`: {exc}") from None
    if done.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def _ns_run(netns: str, args: Sequence[str], timeout: float = 15) -> bool:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, *args],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode == 0


def _unused_octets(count: int) -> list[int]:
    """Third octets of ``10.231.X.0/30`` subnets no interface or route uses yet."""
    taken = _ip("-4", "-o", "addr", "show") + _ip("-4", "route", "show", "table", "all")
    free = [x for x in range(1, 255) if f"10.231.{x}." not in taken]
    if len(free) < count:
        raise NetnsUnavailable("no free 10.231.X.0/30 subnets")
    rng = secrets.SystemRandom()
    return sorted(rng.sample(free, count))


@dataclass
class Host:
    index: int
    netns: str | None = None
    link: str | None = None  # the host side of the veth pair
    host_ip: str = "127.0.0.1"  # the address this host reaches Redis at
    mock: Process | None = None
    mock_url: str = ""
    worker: Process | None = None

    def command(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args] if self.netns else list(args)


@dataclass
class Cluster:
    directory: Path
    api_key: str = field(default_factory=lambda: "sk-scaleout-" + secrets.token_hex(16))
    prefix: str = field(default_factory=lambda: "trscale" + secrets.token_hex(4))
    hosts: list[Host] = field(default_factory=list)
    redis: RedisServer | None = None
    netns_refused: str | None = None  # why namespaces are not used, if they are not
    setup_seconds: float = 0.0

    @property
    def uses_netns(self) -> bool:
        return self.netns_refused is None

    # --- the network -----------------------------------------------------------------------

    def build_network(self) -> None:
        tag = secrets.token_hex(3)
        self.hosts = [Host(index) for index in range(1, HOSTS + 1)]
        if os.environ.get(NO_NETNS_ENV):
            self.netns_refused = f"{NO_NETNS_ENV} is set"
            return
        try:
            octets = _unused_octets(HOSTS)
            for host, octet in zip(self.hosts, octets, strict=True):
                self._join(host, tag, octet)
            for host in self.hosts:
                self._check_reachable(host)
        except NetnsUnavailable as exc:
            self.netns_refused = f"not permitted here: {exc}"
            self.remove_network()
            self.hosts = [Host(index) for index in range(1, HOSTS + 1)]

    def _join(self, host: Host, tag: str, octet: int) -> None:
        """A namespace for ``host``, joined to the root namespace by a veth pair."""
        netns = f"tokenrelay-test-{host.index}-{tag}"
        _ip("netns", "add", netns)
        host.netns = netns
        _ip("-n", netns, "link", "set", "lo", "up")
        link, peer = f"trh{host.index}-{tag}", f"trn{host.index}-{tag}"
        _ip("link", "add", link, "type", "veth", "peer", "name", peer, "netns", netns)
        host.link = link
        host.host_ip = f"10.231.{octet}.1"
        _ip("addr", "add", f"{host.host_ip}/30", "dev", link)
        _ip("link", "set", link, "up")
        _ip("-n", netns, "addr", "add", f"10.231.{octet}.2/30", "dev", peer)
        _ip("-n", netns, "link", "set", peer, "up")

    def _check_reachable(self, host: Host) -> None:
        """Something inside the namespace can open a TCP connection to the host side."""
        assert host.netns is not None
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind((host.host_ip, 0))
            listener.listen(1)
            port = listener.getsockname()[1]
            probe = f"import socket; socket.create_connection(({host.host_ip!r}, {port}), 3)"
            try:
                reached = _ns_run(host.netns, [sys.executable, "-c", probe])
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise NetnsUnavailable(f"`ip netns exec` failed: {exc}") from None
            if not reached:
                raise NetnsUnavailable(f"namespace {host.netns} cannot reach {host.host_ip}")

    def remove_network(self) -> None:
        for host in self.hosts:
            if host.link:
                with contextlib.suppress(NetnsUnavailable):
                    _ip("link", "del", host.link)
                host.link = None
            if host.netns:
                with contextlib.suppress(NetnsUnavailable):
                    _ip("netns", "del", host.netns)
                host.netns = None

    # --- the processes ---------------------------------------------------------------------

    def start_redis(self) -> None:
        (self.directory / "redis").mkdir()
        bind = ["127.0.0.1", *(h.host_ip for h in self.hosts if h.netns)]
        extra = ["--bind", *bind, "--protected-mode", "no"] if self.uses_netns else []
        self.redis = RedisServer(directory=self.directory / "redis", extra=extra).start()

    def worker_env(self, host: Host) -> dict[str, str]:
        assert self.redis is not None
        url = f"redis://{host.host_ip}:{self.redis.port}/0"
        return worker_env(
            url,
            self.prefix,
            broker_url=url,
            upstream_url=host.mock_url,
            upstream_api_key=self.api_key,
            upstream_dialect="together",
            lease_seconds=str(LEASE),
            upstream_connect_timeout="2",
            upstream_read_timeout="5",
            shutdown_grace="1",
        )

    @property
    def settings(self) -> Settings:
        assert self.redis is not None
        return Settings.from_env(
            {
                "TOKENRELAY_REDIS_URL": self.redis.url,
                "TOKENRELAY_PREFIX": self.prefix,
                "TOKENRELAY_DEFAULT_MODEL": "mock",
            }
        )

    def start_hosts(self) -> None:
        for host in self.hosts:
            port = free_port()  # free on 127.0.0.1 here, and in a new namespace anyway
            args = [sys.executable, "-m", "producer.cli", "mock-upstream", "--port", str(port)]
            host.mock = Process(
                host.command(args),
                env={"MOCK_UPSTREAM_API_KEY": self.api_key},
                log_path=self.directory / f"mock-{host.index}.log",
            )
            host.mock_url = f"http://127.0.0.1:{port}"
        for host in self.hosts:
            self._wait_for_mock(host)
        for host in self.hosts:
            # The devservers' worker command line, inside the host's namespace when it has one.
            args = worker_args(CONCURRENCY, "gevent", f"scale{host.index}@%h")
            host.worker = Process(
                host.command(args),
                env=self.worker_env(host),
                log_path=self.directory / f"worker-{host.index}.log",
            )
        for host in self.hosts:
            self._wait_for_worker(host)

    def _wait_for_mock(self, host: Host, timeout: float = 30) -> None:
        probe = (
            "import sys; from producer.devservers import http_answers; "
            f"sys.exit(0 if http_answers({host.mock_url + '/healthz'!r}) else 1)"
        )
        deadline = time.monotonic() + timeout
        while True:
            assert host.mock is not None
            assert host.mock.alive(), f"mock upstream {host.index} exited:\n{host.mock.output()}"
            done = subprocess.run(
                host.command([sys.executable, "-c", probe]), capture_output=True, check=False
            )
            if done.returncode == 0:
                return
            assert time.monotonic() < deadline, f"mock upstream {host.index} not ready"
            time.sleep(0.1)

    def _wait_for_worker(self, host: Host, timeout: float = 40) -> None:
        assert host.worker is not None
        wait_worker_ready(host.worker, timeout, name=f"worker {host.index}")

    def trouble(self) -> dict[str, int]:
        """Counts of the worker log lines that explain lost or restarted jobs."""
        logs = "".join(h.worker.output() for h in self.hosts if h.worker is not None)
        return {line: logs.count(line) for line in TROUBLE}

    def host_of_pid(self, pid: int) -> Host:
        found = [h for h in self.hosts if h.worker is not None and h.worker.pid == pid]
        assert found, f"no host's worker has pid {pid}"
        return found[0]

    def stop(self) -> None:
        processes = [p for h in self.hosts for p in (h.worker, h.mock) if p is not None]
        with ThreadPoolExecutor(len(processes) or 1) as pool:  # warm shutdowns side by side
            list(pool.map(lambda process: process.stop(timeout=5), processes))
        if self.redis is not None:
            self.redis.stop()
        self.remove_network()


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    built = Cluster(tmp_path)
    started = time.monotonic()
    try:
        built.build_network()
        built.start_redis()
        built.start_hosts()
        built.setup_seconds = time.monotonic() - started
        yield built
    finally:
        built.stop()


def worker_pid(worker_id: str) -> int:
    """The pid in a worker id (``{hostname}-{pid}-{random}``) or a lease owner (``{id}:{n}``)."""
    return int(worker_id.split(":")[0].rsplit("-", 2)[1])


def say(request: pytest.FixtureRequest, text: str) -> None:
    """Show ``text`` in the run's output (even under -q, past output capture) and its report."""
    line = f"[scale-out] {text}"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(line)
    else:
        print(line)
    request.node.add_report_section("call", "scale-out", text)


def statuses(client: Client, ids: Sequence[str]) -> list[tuple[str, str]]:
    """Each job's (status, lease owner)."""
    pipe = client.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(client.keys.state(job_id), ["status", "owner"])
    return [((status or b"").decode(), (owner or b"").decode()) for status, owner in pipe.execute()]


def read_logs(client: Client, ids: Sequence[str]) -> list[list[Event]]:
    pipe = client.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.xrange(client.keys.log(job_id))
    return [events_from_log(entries) for entries in pipe.execute()]


def starts(events: list[Event]) -> list[Event]:
    return [e for e in events if e.type is EventType.START]


def assert_complete(events: list[Event], job_id: str) -> list[list[Event]]:
    """Seq from 0 without a gap, one terminal event at the end, and an attempt that starts with
    a start event after each restart; return the attempts (each after the first begins with its
    restart event)."""
    assert [e.seq for e in events] == list(range(len(events))), (job_id, "seq has a gap")
    assert all(e.job == job_id for e in events), job_id
    assert [e.terminal for e in events].count(True) == 1 and events[-1].terminal, job_id
    parts: list[list[Event]] = [[]]
    for event in events:
        if event.type is EventType.RESTART:
            parts.append([])
        parts[-1].append(event)
    final = [e for e in parts[-1] if e.type is not EventType.RESTART]
    assert final and final[0].type is EventType.START, (job_id, "the last attempt never started")
    assert len(starts(parts[-1])) == 1, job_id
    return parts


def stale_attempts_ended(host: Host, job_ids: Sequence[str]) -> bool:
    """The host's worker logged the end of its (fenced) attempt at each of ``job_ids``."""
    assert host.worker is not None
    log = host.worker.output()
    return all(re.search(rf"job {i}\b[^\n]*\b(fenced|ended)\b", log) for i in job_ids)


def _restarted(events: list[Event]) -> bool:
    return any(e.type is EventType.RESTART for e in events)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> float:
    """Wait until ``predicate()``; return how long it took, fail with ``what`` after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(what if isinstance(what, str) else what())
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.timeout(180)
def test_three_hosts_share_300_jobs_and_cutting_one_off_loses_none(
    cluster: Cluster, request: pytest.FixtureRequest, record_property: Any
) -> None:
    test_started = time.monotonic()
    if cluster.uses_netns:
        say(request, f"{HOSTS} hosts in network namespaces, joined to Redis by veth pairs")
    else:
        say(
            request,
            f"network namespaces not used ({cluster.netns_refused}): "
            f"the {HOSTS} hosts are plain processes on 127.0.0.1, and the cut is a SIGKILL",
        )
    record_property("network_namespaces", cluster.uses_netns)
    cut_host = cluster.hosts[CUT - 1]
    assert cut_host.worker is not None

    client = Client(settings=cluster.settings)
    try:
        tag = secrets.token_hex(4)
        prompts = [f"[scale-{tag}-{i}] Alan Turing was" for i in range(JOBS)]
        submit_started = time.monotonic()
        jobs = [client.submit(prompt=p, model=MODEL, max_tokens=TOKENS) for p in prompts]
        submitted_in = time.monotonic() - submit_started
        ids = [job.id for job in jobs]

        # Cut the host off once every job has been claimed, while it streams several of them.
        def streaming_on_cut_host(snapshot: list[tuple[str, str]]) -> int:
            pid = cut_host.worker.pid if cut_host.worker else -1
            return sum(1 for s, o in snapshot if s == "running" and o and worker_pid(o) == pid)

        deadline = time.monotonic() + 30
        while True:
            snapshot = statuses(client, ids)
            unclaimed = sum(1 for status, _ in snapshot if status in ("", "queued"))
            streaming_on_cut = streaming_on_cut_host(snapshot)
            if not unclaimed and streaming_on_cut >= RUNNING_AT_CUT:
                break
            if time.monotonic() > deadline:
                never = [i for i, (status, _) in zip(ids, snapshot, strict=True) if not status]
                never += [i for i, (st, _) in zip(ids, snapshot, strict=True) if st == "queued"]
                pytest.fail(
                    f"no moment to cut host {CUT} in 30 s: it streams {streaming_on_cut} jobs; "
                    f"statuses {dict(Counter(s for s, _ in snapshot))}; "
                    f"never claimed: {never[:5]}; "
                    f"broker queue length {client.redis.llen(client.keys.queue)}; "
                    f"worker logs: {cluster.trouble()}"
                )
            time.sleep(0.02)
        cut_wall = time.time()
        if cluster.uses_netns:
            assert cut_host.link is not None
            _ip("link", "set", cut_host.link, "down")
        else:
            cut_host.worker.kill()
            assert cut_host.mock is not None
            cut_host.mock.kill()

        terminal = {"done", "error", "cancelled"}
        finished_in = wait_for(
            lambda: all(s in terminal for s, _ in statuses(client, ids)),
            90,
            lambda: (
                f"not every job finished after the cut: "
                f"{Counter(s for s, _ in statuses(client, ids))}; worker logs: {cluster.trouble()}"
            ),
        )

        # Every job: done, seq without gaps, one terminal event, the expected text.
        logs = read_logs(client, ids)
        starts_per_host = {h.index: 0 for h in cluster.hosts}
        takeovers: list[float] = []
        silent = 0  # taken over before the first attempt's start event reached Redis
        for job, prompt, events in zip(jobs, prompts, logs, strict=True):
            expected = "".join(generate(prompt, TOKENS)[0])
            parts = assert_complete(events, job.id)
            assert events[-1].type is EventType.DONE, (job.id, events[-1])
            assert token_text(parts[-1]) == expected, job.id
            assert job.text(timeout=10) == expected, job.id  # the library drops attempt 1
            state = client.status(job.id)
            # Attempts taken over before their start event reached Redis left no event (the
            # next attempt publishes no restart then): the first start names the attempt.
            unseen = int(starts(parts[0])[0].fields["attempt"]) - 1
            assert state.status is Status.DONE and state.attempt == unseen + len(parts), job.id
            hosts = [
                [cluster.host_of_pid(worker_pid(str(e.fields["worker"]))) for e in starts(part)]
                for part in parts
            ]
            for host in (h for started in hosts for h in started):
                starts_per_host[host.index] += 1
            if state.attempt > 1:
                # Only the cut host's jobs are started again, after the cut, on another host.
                earlier = [h.index for started in hosts[:-1] for h in started]
                restarted = float(starts(parts[-1])[0].fields["ts"]) - cut_wall
                why = f"job {job.id} restarted; worker logs: {cluster.trouble()}"
                assert all(h == CUT for h in earlier), f"{why}; its attempts ran on {earlier}"
                assert restarted > 0, f"{why} {-restarted:.2f} s before the cut"
                assert hosts[-1] != [cut_host], f"{why} on the host that was cut off"
                silent += bool(unseen)
                takeovers.append(restarted)

        assert all(starts_per_host.values()), f"a host started no job: {starts_per_host}"
        assert takeovers, f"host {CUT} was cut off streaming jobs, yet none was taken over"

        # Bring the link back: the partitioned worker's late publishes must all be fenced.
        restored = ""
        if cluster.uses_netns:
            assert cut_host.link is not None
            _ip("link", "set", cut_host.link, "up")
            # Each stale attempt ends once its blocked Redis calls get through (TCP retransmits).
            stale = [job.id for job, events in zip(jobs, logs, strict=True) if _restarted(events)]
            wait_for(
                lambda: stale_attempts_ended(cut_host, stale),
                45,
                f"host {CUT}'s stale attempts never ended after its link came back",
            )
            after = read_logs(client, ids)
            changed = [job.id for job, a, b in zip(jobs, logs, after, strict=True) if a != b]
            assert not changed, f"finished jobs changed after the link came back: {changed[:5]}"
            restored = (
                f"; link restored: its {len(stale)} stale attempts ended fenced, "
                f"every job's log unchanged"
            )

        report = (
            f"{JOBS} jobs submitted in {submitted_in:.2f} s; starts per host {starts_per_host}; "
            f"host {CUT} cut off streaming {streaming_on_cut} jobs; "
            f"{len(takeovers)} taken over ({silent} before their start event reached Redis), "
            "restarted "
            f"{min(takeovers):.2f}/{statistics.median(takeovers):.2f}/{max(takeovers):.2f} s "
            f"(min/median/max) after the cut; all done {finished_in:.2f} s after the cut"
            f"{restored}; setup {cluster.setup_seconds:.1f} s, "
            f"run {time.monotonic() - test_started:.1f} s"
        )
        say(request, report)
        record_property("takeovers", len(takeovers))
        record_property("takeover_median_s", round(statistics.median(takeovers), 2))
        record_property("takeover_max_s", round(max(takeovers), 2))
    finally:
        client.close()

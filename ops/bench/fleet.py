"""The processes a bench run starts: a private redis-server, the mock upstream, one worker and,
for the fan-out scenario, one gateway. All on loopback; ``stop`` ends every one of them, and it
runs at interpreter exit too, so an error or Ctrl-C leaves nothing behind."""

from __future__ import annotations

import atexit
import contextlib
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

import redis

from producer.devservers import (
    Process,
    RedisServer,
    free_port,
    http_answers,
    mock_upstream,
    start_worker,
    wait_until,
    worker_args,
    worker_env,
)
from producer.fleet import live_workers
from producer.protocol import Keys
from producer.settings import Settings

WORKER_READY_S = 40.0
GATEWAY_READY_S = 30.0
WORKER_STOP_S = 1.0


# The gateway's own entry point under cProfile. uvicorn ends gracefully on SIGTERM, then raises
# the signal again for the previous handler: this one exits through ``finally``, which writes
# the stats.
_PROFILED_GATEWAY = """
import cProfile, signal, sys, time
from producer.gateway import serve
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
profiler = cProfile.Profile(time.thread_time)
profiler.enable()
try:
    serve(port={port})
finally:
    profiler.disable()
    profiler.dump_stats({path!r})
"""


# The worker with its publish script's XADD line removed: everything else (fencing, state,
# PUBLISH) as in production.
_WITHOUT_LOG = """
import sys
from producer import scripts
for name in ("PUBLISH", "PUBLISH_MANY"):
    setattr(scripts, name, "\\n".join(
        line for line in getattr(scripts, name).splitlines() if "'XADD'" not in line
    ))
    assert "XADD" not in getattr(scripts, name)
sys.argv = ["celery", *sys.argv[1:]]
from celery.__main__ import main
main()
"""


class _Stoppable(Protocol):
    def stop(self) -> object: ...


def _multi_mock(port: int, processes: int, log_path: Path) -> tuple[Process, str]:
    """The mock upstream under uvicorn with ``processes`` worker processes on one port."""
    code = (
        "import uvicorn; uvicorn.run('producer.mock_upstream:create_app', factory=True, "
        f"host='127.0.0.1', port={port}, workers={processes}, log_level='warning', "
        "access_log=False)"
    )
    process = Process([sys.executable, "-c", code], log_path=log_path)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_answers(url + "/healthz"), 30, "mock upstream")
    return process, url


class BenchFleet:
    """One bench run's processes. ``start`` brings up Redis and the mock; workers and the
    gateway are started (and restarted) by the scenarios that need them."""

    def __init__(
        self,
        workdir: Path,
        *,
        mock_processes: int = 1,
        dialect: str = "together",
        redis_pool: int = 0,
    ) -> None:
        self.workdir = workdir
        self.mock_processes = mock_processes
        self.redis_pool = redis_pool
        self.dialect = dialect
        self.prefix = "bench" + secrets.token_hex(4)
        self.redis_server = RedisServer(directory=workdir / "redis")
        self.mock: Process | None = None
        self.mock_url = ""
        self.workers: list[Process] = []
        self.gateway: Process | None = None
        self.gateway_url = ""
        self._started: list[_Stoppable] = []
        self._workers_started = 0
        atexit.register(self.stop)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> BenchFleet:
        (self.workdir / "redis").mkdir(parents=True, exist_ok=True)
        self.redis_server.start()
        self._started.append(self.redis_server)
        log = self.workdir / "mock.log"
        if self.mock_processes > 1:
            self.mock, self.mock_url = _multi_mock(free_port(), self.mock_processes, log)
        else:
            self.mock, self.mock_url = mock_upstream(log_path=log)
        self._started.append(self.mock)
        return self

    def stop(self) -> None:
        self.stop_worker()
        while self._started:
            thing = self._started.pop()
            with contextlib.suppress(Exception):
                thing.stop()
        self.gateway = None

    def __enter__(self) -> BenchFleet:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- settings ---------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    @property
    def worker_env(self) -> dict[str, str]:
        """``env``, with the worker's Redis pool size in its URL when ``redis_pool`` is set
        (redis-py reads ``max_connections`` from the URL; the broker keeps the plain URL)."""
        env = self.env
        if self.redis_pool:
            env["TOKENRELAY_BROKER_URL"] = self.redis_url
            env["TOKENRELAY_REDIS_URL"] = f"{self.redis_url}?max_connections={self.redis_pool}"
        return env

    @property
    def env(self) -> dict[str, str]:
        """A process's environment: this run's Redis, prefix and mock, nothing inherited."""
        return worker_env(
            self.redis_url,
            self.prefix,
            upstream_url=self.mock_url,
            upstream_dialect=self.dialect,
            upstream_read_timeout="30",
            upstream_connect_timeout="5",
        )

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=10)

    # --- worker and gateway -----------------------------------------------------------------

    def start_worker(
        self, concurrency: int, *, without_log: bool = False, count: int = 1
    ) -> Process:
        """Fresh worker processes, ``count`` of them (those before are stopped first); with
        ``without_log`` their publish script leaves out the XADD (the log's cost, measured).
        Returns the first."""
        self.stop_worker()
        for _ in range(count):
            self._workers_started += 1
            log = self.workdir / f"worker-{self._workers_started}.log"
            name = f"bench{self._workers_started}@%h"
            if without_log:
                # ``python -m celery ARGS`` with the script patched first (before Celery starts
                # and patches the standard library for gevent; producer.scripts imports nothing).
                args = worker_args(concurrency, name=name)
                assert args[1:3] == ["-m", "celery"], args
                args = [args[0], "-c", _WITHOUT_LOG, *args[3:]]
                worker = Process(args, env=self.worker_env, log_path=log)
            else:
                worker = start_worker(
                    self.worker_env, concurrency=concurrency, name=name, log_path=log
                )
            self._started.append(worker)
            self.workers.append(worker)
        client = self.redis()
        try:
            deadline = time.monotonic() + WORKER_READY_S
            for worker in self.workers:
                while not any(w.pid == worker.pid for w in live_workers(client, self.keys)):
                    if not worker.alive():
                        raise RuntimeError(f"the worker exited:\n{worker.output()[-3000:]}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"a worker was not ready after {WORKER_READY_S:g} s")
                    time.sleep(0.05)
        finally:
            client.close()
        return self.workers[0]

    @property
    def worker(self) -> Process | None:
        """The first worker process, if one runs."""
        return self.workers[0] if self.workers else None

    def worker_log(self) -> str:
        return "".join(worker.output() for worker in self.workers)

    def stop_worker(self) -> None:
        """Between scenarios nothing runs on the workers and their orderly shutdown takes
        seconds: Celery's cold shutdown (SIGQUIT), then SIGKILL to the process group after a
        second."""
        workers, self.workers = self.workers, []
        for worker in workers:
            self._forget(worker)
            worker.signal(signal.SIGQUIT)
        for worker in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.popen.wait(WORKER_STOP_S)
            worker.kill()
            worker.stop()

    def start_gateway(self, profile_to: Path | None = None) -> str:
        """The gateway on a free port; with ``profile_to`` it runs under cProfile (CPU clock)
        and writes its stats there when stopped."""
        if self.gateway is not None:
            return self.gateway_url
        port = free_port()
        env = {k: v for k, v in self.env.items() if k != "TOKENRELAY_UPSTREAM_URL"}
        args = [sys.executable, "-m", "producer.cli", "gateway", "--port", str(port)]
        if profile_to is not None:
            args = [sys.executable, "-c", _PROFILED_GATEWAY.format(port=port, path=str(profile_to))]
        self.gateway = Process(args, env=env, log_path=self.workdir / "gateway.log")
        self._started.append(self.gateway)
        self.gateway_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_answers(self.gateway_url + "/healthz"), GATEWAY_READY_S, "gateway")
        return self.gateway_url

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self._forget(self.gateway)
            self.gateway.stop()
            self.gateway = None

    def _forget(self, thing: _Stoppable) -> None:
        with contextlib.suppress(ValueError):
            self._started.remove(thing)

    # --- facts ------------------------------------------------------------------------------

    def pids(self) -> dict[str, int]:
        """Root pids of the processes that do the work now (the meter adds their children)."""
        found: dict[str, int] = {}
        if self.redis_server.process is not None:
            found["redis"] = self.redis_server.process.pid
        if self.mock is not None:
            found["mock"] = self.mock.pid
        for index, worker in enumerate(self.workers):
            found["worker" if index == 0 else f"worker{index + 1}"] = worker.pid
        if self.gateway is not None:
            found["gateway"] = self.gateway.pid
        return found

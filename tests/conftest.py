"""Shared fixtures: a private redis-server, the mock upstream and real Celery workers, all on
loopback ports of their own, started once per session and stopped at its end.

Two worker fleets run side by side under different key prefixes (and so different queues):
``main`` streams from the mock upstream, which refuses any request without the session's API key;
``unreachable`` points at a port nobody listens on and keeps finished jobs for two seconds only.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from producer import Client
from producer.devservers import (
    Process,
    RedisServer,
    free_port,
    http_answers,
    mock_upstream,
    start_worker,
    wait_until,
    wait_worker_ready,
    worker_env,
)
from producer.settings import Settings

SHORT_TTL = 2


@dataclass
class Fleet:
    """One worker process and the settings it runs with."""

    name: str
    env: dict[str, str]
    process: Process

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def client(self) -> Client:
        return Client(settings=self.settings)

    def log(self) -> str:
        return self.process.output()


@dataclass
class Mock:
    url: str
    process: Process

    def stats(self) -> list[dict[str, object]]:
        response = requests.get(self.url + "/_stats", timeout=5)
        response.raise_for_status()
        records: list[dict[str, object]] = response.json()["requests"]
        return records

    def record(self, marker: str) -> dict[str, object]:
        """The newest request whose prompt starts with ``marker``."""
        found = [r for r in self.stats() if str(r.get("prompt_head", "")).startswith(marker)]
        assert found, f"the mock upstream saw no request for {marker!r}"
        return found[-1]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="session")
def redis_server(run_dir: Path) -> Iterator[RedisServer]:
    (run_dir / "redis").mkdir()
    server = RedisServer(directory=run_dir / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def api_key() -> str:
    return "sk-tokenrelay-test-" + secrets.token_hex(16)


@pytest.fixture(scope="session")
def mock(run_dir: Path, api_key: str) -> Iterator[Mock]:
    process, url = mock_upstream(api_key=api_key, log_path=run_dir / "mock.log")
    yield Mock(url, process)
    process.stop()


def _base_env(redis_url: str, prefix: str) -> dict[str, str]:
    return worker_env(
        redis_url,
        prefix,
        upstream_dialect="together",
        upstream_read_timeout="5",
        upstream_connect_timeout="2",
    )


def _start_fleet(name: str, env: dict[str, str], run_dir: Path, concurrency: int) -> Fleet:
    process = start_worker(env, concurrency=concurrency, name=f"{name}@%h",
                           log_path=run_dir / f"worker-{name}.log")  # fmt: skip
    fleet = Fleet(name, env, process)
    wait_worker_ready(process, name=f"worker {name}")
    return fleet


@pytest.fixture(scope="session")
def fleet(redis_server: RedisServer, mock: Mock, api_key: str, run_dir: Path) -> Iterator[Fleet]:
    env = _base_env(redis_server.url, "trmain")
    env.update(TOKENRELAY_UPSTREAM_URL=mock.url, TOKENRELAY_UPSTREAM_API_KEY=api_key)
    started = _start_fleet("main", env, run_dir, concurrency=100)
    yield started
    started.process.stop()


@pytest.fixture(scope="session")
def unreachable_fleet(redis_server: RedisServer, run_dir: Path) -> Iterator[Fleet]:
    env = _base_env(redis_server.url, "trdown")
    env.update(
        TOKENRELAY_UPSTREAM_URL=f"http://127.0.0.1:{free_port()}",
        TOKENRELAY_JOB_TTL=str(SHORT_TTL),
    )
    started = _start_fleet("down", env, run_dir, concurrency=4)
    yield started
    started.process.stop()


@pytest.fixture(scope="session")
def client(fleet: Fleet) -> Iterator[Client]:
    with fleet.client() as session_client:
        yield session_client


def marker(name: str) -> str:
    """A unique prompt head, so a test can find its own request in the mock's records."""
    return f"[{name}-{secrets.token_hex(4)}]"


@dataclass
class Gateway:
    url: str
    process: Process
    keys: tuple[str, ...] = ()

    def log(self) -> str:
        return self.process.output()


def _start_gateway(name: str, fleet: Fleet, run_dir: Path, extra: dict[str, str]) -> Gateway:
    port = free_port()
    # The gateway never calls the upstream: it gets no upstream key.
    env = {k: v for k, v in fleet.env.items() if k != "TOKENRELAY_UPSTREAM_API_KEY"}
    env.update(extra)
    args = [sys.executable, "-m", "producer.cli", "gateway", "--port", str(port)]
    process = Process(args, env=env, log_path=run_dir / f"gateway-{name}.log")
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_answers(url + "/healthz"), 30, f"gateway {name}")
    keys = tuple(extra.get("TOKENRELAY_API_KEYS", "").split(",")) if extra else ()
    return Gateway(url, process, tuple(k for k in keys if k))


@pytest.fixture(scope="session")
def gateway(fleet: Fleet, run_dir: Path) -> Iterator[Gateway]:
    """An open gateway (no client keys) in front of the main fleet."""
    started = _start_gateway("open", fleet, run_dir, {})
    yield started
    started.process.stop()


@pytest.fixture(scope="session")
def keyed_gateway(fleet: Fleet, run_dir: Path) -> Iterator[Gateway]:
    """A gateway with two client keys, i.e. two tenants."""
    keys = "tenant-one-" + secrets.token_hex(8), "tenant-two-" + secrets.token_hex(8)
    extra = {"TOKENRELAY_API_KEYS": ",".join(keys), "TOKENRELAY_MAX_BODY_BYTES": "65536"}
    started = _start_gateway("keyed", fleet, run_dir, extra)
    yield started
    started.process.stop()

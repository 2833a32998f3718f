"""The worker fleet as Redis sees it: heartbeats, running jobs, queue depth; and the health
checks built on them (``tokenrelay health``, ``tokenrelay workers``)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import redis

from producer.connection import reply_text
from producer.protocol import Keys, StateField


@dataclass(frozen=True)
class Worker:
    id: str
    host: str
    pid: int
    pool: str
    concurrency: int
    active: int
    tokens: int
    version: str
    started: float
    at: float

    @classmethod
    def from_json(cls, raw: bytes | str) -> Worker:
        data = json.loads(raw)
        return cls(
            id=str(data["id"]),
            host=str(data.get("host", "")),
            pid=int(data.get("pid", 0)),
            pool=str(data.get("pool", "")),
            concurrency=int(data.get("concurrency", 0)),
            active=int(data.get("active", 0)),
            tokens=int(data.get("tokens", 0)),
            version=str(data.get("version", "")),
            started=float(data.get("started", 0)),
            at=float(data.get("at", 0)),
        )


def live_workers(client: redis.Redis, keys: Keys) -> list[Worker]:
    """Every worker whose heartbeat has not expired, by id."""
    names = sorted(client.scan_iter(match=keys.worker_pattern, count=1000))
    # On a cluster the heartbeat keys live on different slots: one MGET per slot.
    mget = getattr(client, "mget_nonatomic", client.mget)
    values = mget(names) if names else []
    workers = []
    for value in values:
        if value is None:
            continue  # expired between SCAN and MGET
        try:
            workers.append(Worker.from_json(value))
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(workers, key=lambda w: w.id)


@dataclass(frozen=True)
class RunningJob:
    id: str
    status: str
    model: str
    attempt: int
    tokens: int
    started: float | None

    def rate(self, now: float) -> float:
        if not self.started or now <= self.started:
            return 0.0
        return self.tokens / (now - self.started)


def running_jobs(client: redis.Redis, keys: Keys, limit: int = 200) -> list[RunningJob]:
    ids = [reply_text(i) for i in client.zrange(keys.running, 0, limit - 1)]
    pipe = client.pipeline(transaction=False)
    fields = [
        StateField.STATUS,
        StateField.MODEL,
        StateField.ATTEMPT,
        StateField.TOKENS,
        StateField.STARTED,
    ]
    for job_id in ids:
        pipe.hmget(keys.state(job_id), fields)
    jobs = []
    for job_id, values in zip(ids, pipe.execute(), strict=True):
        status, model, attempt, tokens, started = (
            v.decode() if isinstance(v, bytes) else v for v in values
        )
        if status != "running":
            continue
        jobs.append(
            RunningJob(
                job_id,
                status,
                model or "",
                int(attempt or 0),
                int(tokens or 0),
                int(started) / 1000 if started else None,
            )
        )
    return jobs


def queue_depth(broker: redis.Redis | None, keys: Keys) -> int | None:
    """Messages waiting in the Celery queue, when the broker is a Redis."""
    if broker is None:
        return None
    return int(broker.llen(keys.queue))


def check_local(client: redis.Redis, keys: Keys) -> tuple[bool, str]:
    """Is a worker on this host alive (its heartbeat fresh)? For container health checks."""
    host = socket.gethostname()
    mine = [w for w in live_workers(client, keys) if w.host == host]
    if not mine:
        return False, f"no live worker on {host}"
    return True, ", ".join(f"{w.id} ({w.active} streams)" for w in mine)


def check_fleet(client: redis.Redis, keys: Keys) -> tuple[bool, str]:
    workers = live_workers(client, keys)
    if not workers:
        return False, "no live workers"
    streams = sum(w.active for w in workers)
    return True, f"{len(workers)} live workers, {streams} streams"


def check_url(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except OSError as exc:
        return False, f"{url}: {exc}"


def describe(workers: list[Worker]) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {**w.__dict__, "uptime_s": round(now - w.started, 1), "seen_s_ago": round(now - w.at, 1)}
        for w in workers
    ]

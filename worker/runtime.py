"""What one worker process shares between its streams.

One Redis client (pooled), one upstream HTTP client (pooled), the registry of running jobs, and two
background threads (greenlets under gevent): the control listener, which hears cancel requests on
one pub/sub connection for the whole process, and the keeper, which renews every running job's
lease in one pipelined round trip and enforces deadlines. Both interrupt a job by shutting its
upstream socket, which wakes the read it is blocked in.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Final

import redis

from producer.connection import sync_redis
from producer.protocol import Keys, decode_control
from producer.settings import Settings
from worker.publisher import Scripts
from worker.upstream import UpstreamClient, UpstreamStream

log = logging.getLogger("tokenrelay.worker")

TICK: Final = 0.1


@dataclass(eq=False)
class ActiveJob:
    """A job this process is running, as the background threads see it."""

    job_id: str
    owner: str
    deadline: float  # time.monotonic() value
    stream: UpstreamStream | None = None
    interrupted: str | None = None  # cancelled | deadline | fenced | shutdown
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def interrupt(self, reason: str) -> None:
        with self._lock:
            if self.interrupted is None:
                self.interrupted = reason
            stream = self.stream
        if stream is not None:
            stream.abort()

    def attach(self, stream: UpstreamStream | None) -> None:
        with self._lock:
            self.stream = stream
            interrupted = self.interrupted
        if stream is not None and interrupted is not None:
            stream.abort()


class Runtime:
    """The per-process state of a worker; create with ``Runtime.get()``."""

    _instance: Runtime | None = None
    _instance_pid: int | None = None
    _instance_lock = threading.Lock()

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.redis: redis.Redis = sync_redis(settings.redis_url)
        self.scripts = Scripts(self.redis)
        self.upstream = UpstreamClient(
            settings.upstream_url,
            settings.upstream_api_key,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
        )
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.jobs: dict[str, ActiveJob] = {}
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._listen, name="tokenrelay-control", daemon=True),
            threading.Thread(target=self._keep, name="tokenrelay-keeper", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @classmethod
    def get(cls) -> Runtime:
        """This process's runtime, created on first use (after a fork, anew)."""
        with cls._instance_lock:
            if cls._instance is None or cls._instance_pid != os.getpid():
                cls._instance = Runtime(Settings.from_env())
                cls._instance_pid = os.getpid()
            return cls._instance

    def new_owner(self) -> str:
        return f"{self.worker_id}:{uuid.uuid4().hex[:8]}"

    def register(self, job: ActiveJob) -> None:
        self.jobs[job.job_id] = job

    def unregister(self, job: ActiveJob) -> None:
        if self.jobs.get(job.job_id) is job:
            del self.jobs[job.job_id]

    def interrupt_all(self, reason: str) -> None:
        for job in list(self.jobs.values()):
            job.interrupt(reason)

    def stop(self) -> None:
        self._stopping.set()

    def _listen(self) -> None:
        """Hear cancel requests for jobs of this process, reconnecting after any failure."""
        backoff = 0.05
        while not self._stopping.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.keys.control)
                backoff = 0.05
                # A reconnect may have missed a message: the keeper's renewals report the
                # cancel flag as a backstop.
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._on_control(message["data"])
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("control channel lost (%s); reconnecting", type(exc).__name__)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                pubsub.close()

    def _on_control(self, data: bytes) -> None:
        job_id = decode_control(data)
        job = self.jobs.get(job_id) if job_id else None
        if job is not None:
            job.interrupt("cancelled")

    def _keep(self) -> None:
        """Enforce deadlines every tick; renew every lease a few times per lease period."""
        renew_every = max(self.settings.lease_seconds / 4, TICK)
        next_renewal = time.monotonic()
        while not self._stopping.wait(TICK):
            now = time.monotonic()
            for job in list(self.jobs.values()):
                if now >= job.deadline:
                    job.interrupt("deadline")
            if now >= next_renewal:
                next_renewal = now + renew_every
                try:
                    self._renew()
                except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    log.warning("lease renewal failed (%s); will retry", type(exc).__name__)

    def _renew(self) -> None:
        jobs = list(self.jobs.values())
        if not jobs:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            self.scripts.renew(
                keys=[self.keys.state(job.job_id), self.keys.lease(job.job_id)],
                args=[job.owner, self.lease_ms],
                client=pipe,
            )
        for job, result in zip(jobs, pipe.execute(), strict=True):
            if result == -1:
                job.interrupt("fenced")
            elif result == 1:
                job.interrupt("cancelled")

"""What one worker process shares between its streams.

One Redis client (pooled), one upstream HTTP client (pooled), the registry of running jobs, and two
background threads (greenlets under gevent): the control listener, which hears cancel requests on
one pub/sub connection for the whole process, and the keeper, which renews every running job's
lease in one pipelined round trip and enforces deadlines. Both interrupt a job by shutting its
upstream socket, which wakes the read it is blocked in.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import redis
from prometheus_client import REGISTRY

from producer.connection import is_cluster, publish_command, reply_text, sync_redis
from producer.protocol import TASK_NAME, Keys, decode_control
from producer.settings import Settings
from worker import metrics
from worker.flusher import Flusher
from worker.publisher import Scripts, now_ms
from worker.upstream import UpstreamClient, UpstreamStream

log = logging.getLogger("tokenrelay.worker")


def _version() -> str:
    try:
        return importlib.metadata.version("tokenrelay")
    except importlib.metadata.PackageNotFoundError:  # a checkout that is not installed
        return "unknown"


_VERSION: Final = _version()

TICK: Final = 0.1
# Connections per worker process, for all its streams. On a single Redis they are shared (a
# command waits for a free one): the flusher holds one per write and the rest carry job starts,
# leases and acks, each one round trip; every connection costs memory (mostly hiredis's read
# buffer). On a cluster each stream calls the publish script itself, per node, so the pool
# grows as needed.
REDIS_CONNECTIONS: Final = 32
# The worker's replies are small (the publish script answers an integer: a flush of 500 jobs'
# calls is read back as ~2 KB), so each connection reads in 8 KiB, not redis-py's 32 KiB.
REDIS_READ_SIZE: Final = 8 * 1024
CLUSTER_CONNECTIONS: Final = 1024  # per node
REAP_EVERY: Final = 1.0  # seconds between looks for jobs whose worker died
REAP_BATCH: Final = 1000
# The longest wait between two re-enqueues of a job that stays unclaimed, in queued graces.
QUEUED_BACKOFF_LIMIT: Final = 8


@dataclass(eq=False)
class ActiveJob:
    """A job this process is running, as the background threads see it."""

    job_id: str
    owner: str
    deadline: float  # time.monotonic() value
    stream: UpstreamStream | None = None
    model: str = ""
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
        self.sharded = is_cluster(settings.redis_url)
        # Hundreds of streams share a bounded pool: a command waits for a free connection.
        self.redis: redis.Redis = sync_redis(
            settings.redis_url,
            max_connections=CLUSTER_CONNECTIONS if self.sharded else REDIS_CONNECTIONS,
            blocking=True,
            read_size=REDIS_READ_SIZE,
        )
        self.publish_command = publish_command(settings.redis_url)
        self.scripts = Scripts(self.redis)
        # On a single Redis every stream's events go out pipelined by one flusher; on a cluster
        # the jobs live on different shards and each stream calls the script itself.
        self.flusher = None if self.sharded else Flusher(self.redis)
        self.upstream = UpstreamClient(
            settings.upstream_url,
            settings.upstream_api_key,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
        )
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.jobs: dict[str, ActiveJob] = {}
        self.pool, self.concurrency = "unknown", 0
        self._handing_back = False
        self.started_at = time.time()
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

    @classmethod
    def current(cls) -> Runtime | None:
        """This process's runtime if one was created."""
        instance = cls._instance
        return instance if instance is not None and cls._instance_pid == os.getpid() else None

    def new_owner(self) -> str:
        return f"{self.worker_id}:{uuid.uuid4().hex[:8]}"

    def register(self, job: ActiveJob) -> None:
        self.jobs[job.job_id] = job
        metrics.ACTIVE.set(len(self.jobs))

    def unregister(self, job: ActiveJob) -> None:
        if self.jobs.get(job.job_id) is job:
            del self.jobs[job.job_id]
        metrics.ACTIVE.set(len(self.jobs))

    def describe(self, pool: str, concurrency: int) -> None:
        """What the heartbeat says about this worker's pool (known once Celery is ready)."""
        self.pool, self.concurrency = pool, concurrency
        self._beat()

    def heartbeat(self) -> dict[str, object]:
        return {
            "id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pool": self.pool,
            "concurrency": self.concurrency,
            "active": len(self.jobs),
            "tokens": int(REGISTRY.get_sample_value("tokenrelay_tokens_published_total") or 0),
            "version": _VERSION,
            "started": self.started_at,
            "at": time.time(),
        }

    def _beat(self) -> None:
        ttl = max(1, round(self.settings.heartbeat_seconds * 3))
        self.redis.set(self.keys.worker(self.worker_id), json.dumps(self.heartbeat()), ex=ttl)

    def interrupt_all(self, reason: str) -> None:
        for job in list(self.jobs.values()):
            job.interrupt(reason)

    def stop(self) -> None:
        """Stop the background threads and withdraw the heartbeat."""
        self._stopping.set()
        if self.flusher is not None:
            self.flusher.stop()
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, OSError):
            self.redis.delete(self.keys.worker(self.worker_id))

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
        """Enforce deadlines every tick; renew every lease a few times per lease period; look
        for jobs whose worker died every ``REAP_EVERY`` seconds."""
        renew_every = max(self.settings.lease_seconds / 4, TICK)
        next_renewal = next_reap = next_beat = time.monotonic()
        while not self._stopping.wait(TICK):
            now = time.monotonic()
            for job in list(self.jobs.values()):
                if now >= job.deadline:
                    job.interrupt("deadline")
            try:
                if now >= next_renewal:
                    next_renewal = now + renew_every
                    self._renew()
                if now >= next_reap:
                    next_reap = now + REAP_EVERY
                    self._reap()
                    self._requeue_stranded()
                if now >= next_beat:
                    next_beat = now + self.settings.heartbeat_seconds
                    self._beat()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("lease keeping failed (%s); will retry", type(exc).__name__)
            except Exception:
                log.exception("lease keeping failed; will retry")

    def _reap(self) -> None:
        """Re-enqueue running jobs whose lease lapsed (their worker died): a live worker takes
        each over within a lease period, not after the broker's visibility timeout."""
        ids = [reply_text(i) for i in self.redis.zrange(self.keys.running, 0, REAP_BATCH - 1)]
        ids = [job_id for job_id in ids if job_id not in self.jobs]
        verdicts = [reply_text(v) for v in self._judge(self.scripts.takeover, ids)]
        for job_id, verdict in zip(ids, verdicts, strict=True):
            if verdict in ("gone", "finished"):
                self.redis.zrem(self.keys.running, job_id)
            elif verdict == "requeue":
                metrics.TAKEOVERS.inc()
                log.warning("job %s: its worker stopped renewing the lease; re-enqueued", job_id)
                self.requeue(job_id)

    def _requeue_stranded(self) -> None:
        """Put back on the queue the jobs left unclaimed past the queued grace: their message was
        lost (a producer that died between creating the job and queueing it, a worker killed
        between taking a message off the queue and recording it, a takeover's message lost on
        its way). A job whose message was only slow is delivered twice; its claim drops the
        second delivery. A job still waiting after that is looked at again after a wait as
        long as its age (at most ``QUEUED_BACKOFF_LIMIT`` graces): a backlog longer than the
        grace gets a few extra messages per job, not one per grace."""
        now = now_ms()
        grace = int(self.settings.queued_grace * 1000)
        cutoff = now - grace
        due = self.redis.zrangebyscore(self.keys.queued, "-inf", cutoff, start=0, num=REAP_BATCH)
        ids = [reply_text(i) for i in due]
        waiting: list[tuple[str, int]] = []
        gone: list[str] = []  # claimed, ended or expired
        for job_id, created in zip(ids, self._judge(self.scripts.stranded, ids), strict=True):
            if created is None:
                gone.append(job_id)
            else:
                waiting.append((job_id, int(created)))
        if gone:
            self.redis.zrem(self.keys.queued, *gone)
        for job_id, created in waiting:
            age = max(0, now - created)
            wait = min(max(grace, age), QUEUED_BACKOFF_LIMIT * grace)
            # The entry's score is when its grace began: the next look comes ``wait`` from now.
            if self.scripts.requeue_due(
                keys=[self.keys.queued], args=[job_id, cutoff, now + wait - grace]
            ):
                metrics.REQUEUED.inc()
                log.warning(
                    "job %s: not taken by any worker %.1f s after its creation; re-enqueued "
                    "(next look in %.1f s)",
                    job_id,
                    age / 1000,
                    wait / 1000,
                )
                self._send(job_id)  # its entry in the queued set was just moved on

    def _judge(self, script: Any, ids: list[str]) -> list[Any]:
        """``script``'s reply for each job, from its state and lease (keys of one slot)."""
        if not ids:
            return []
        calls: list[tuple[list[str], list[Any]]] = [
            ([self.keys.state(job_id), self.keys.lease(job_id)], []) for job_id in ids
        ]
        return self._each(script, calls)

    def _each(self, script: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run ``script`` once per (keys, args): one pipelined round trip on a single Redis; one
        call each on a cluster, where the jobs' keys live on different shards."""
        if self.sharded:
            return [script(keys=keys, args=args) for keys, args in calls]
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in calls:
            script(keys=keys, args=args, client=pipe)
        return list(pipe.execute())

    def requeue(self, job_id: str) -> None:
        """Put a job back on the queue; its next claim starts a new attempt. It (re)joins the
        queued set, so a message lost on the way is sent again after the queued grace."""
        self.redis.zadd(self.keys.queued, {job_id: now_ms()}, nx=True)
        self._send(job_id)

    def _send(self, job_id: str) -> None:
        from worker.app import app

        app.send_task(TASK_NAME, kwargs={"job_id": job_id}, queue=self.keys.queue)

    @property
    def stopping(self) -> bool:
        """True once the shutdown grace has run out: new deliveries are sent back."""
        return self._handing_back

    def hand_back_all(self) -> None:
        """Shutdown grace is over: interrupt every running job so it is handed back."""
        self._handing_back = True
        if self.jobs:
            log.warning("shutdown grace over: handing back %d running jobs", len(self.jobs))
        self.interrupt_all("shutdown")

    def _renew(self) -> None:
        jobs = list(self.jobs.values())
        if not jobs:
            return
        results = self._each(
            self.scripts.renew,
            [
                ([self.keys.state(j.job_id), self.keys.lease(j.job_id)], [j.owner, self.lease_ms])
                for j in jobs
            ],
        )
        for job, result in zip(jobs, results, strict=True):
            if result == -1:
                job.interrupt("fenced")
            elif result == 1:
                job.interrupt("cancelled")

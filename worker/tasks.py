"""The Celery task ``tokenrelay.stream``: thin, it hands the job to the runner."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Final

import redis
from celery.signals import (
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from producer.heap import freeze_startup
from producer.protocol import TASK_NAME, ProtocolError, validate_job_id
from worker import metrics
from worker.app import app
from worker.runner import run_job
from worker.runtime import Runtime, log

RETRY_BASE: Final = 0.5  # seconds before the first redelivery after a Redis error, doubling
RETRY_CAP: Final = 30.0


@app.task(name=TASK_NAME, ignore_result=True, bind=True)  # type: ignore[untyped-decorator]
def stream(self: Any, job_id: str, spec: Mapping[str, Any] | None = None) -> str:
    """Stream job ``job_id``; ``spec`` is its request (read from the job's state if omitted)."""
    try:
        validate_job_id(job_id)
    except ProtocolError:
        # No key can be built from a bad id: nothing to publish to, so refuse loudly here.
        log.error("refused a job with an invalid id %r", str(job_id)[:80])
        return "invalid"
    try:
        return run_job(Runtime.get(), job_id, spec)
    except redis.RedisError as exc:
        # Redis failed under this delivery (after the client's own retries). Before the claim
        # the job would otherwise stay queued for ever; after it, its lease lapses. Deliver it
        # again: CLAIM decides (a live lease drops the copy, a finished job too).
        retries = self.request.retries
        pause = min(RETRY_CAP, RETRY_BASE * 2**retries)
        log.warning(
            "job %s: Redis failed (%s); delivered again in %.1f s",
            job_id,
            type(exc).__name__,
            pause,
            extra={"job": job_id, "event": "job_redelivered"},
        )
        raise self.retry(exc=exc, countdown=pause, max_retries=None) from None


# The task keeps no result (``result_backend=None``), yet Celery's tracer asks for the backend
# on every run, and Celery builds one per thread: under gevent every job is a thread of its own,
# so every job built a backend (an environment read and a class lookup, ~4% of a job's start).
# The one backend is shared; it does nothing.
stream.backend = app.backend


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _hand_back_after_grace(**_: Any) -> None:
    """On SIGTERM Celery stops taking jobs and waits for running ones; after the grace period
    the streams still running are handed back to the queue instead of being cut off or lost."""
    runtime = Runtime.current()
    if runtime is None:
        return
    grace = runtime.settings.shutdown_grace
    log.warning("shutting down: running streams get %.0f s to finish", grace)
    # This runs inside a signal handler; under gevent that is the event loop, where starting a
    # thread would block: schedule a greenlet instead.
    if _gevent_patched():
        import gevent

        gevent.spawn_later(grace, runtime.hand_back_all)
        return
    timer = threading.Timer(grace, runtime.hand_back_all)
    timer.daemon = True
    timer.start()


def _gevent_patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("threading"))


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_runtime(sender: Any = None, **_: Any) -> None:
    """Start the runtime (control listener, lease keeper, reaper) before the first job, so an
    idle worker takes over the jobs of dead ones too. Prefork children start their own."""
    pool = getattr(sender, "pool", None)
    if pool is not None and "prefork" in type(pool).__module__:
        return
    runtime = Runtime.get()
    name = type(pool).__module__.rsplit(".", 1)[-1] if pool is not None else "unknown"
    concurrency = int(getattr(pool, "limit", 0) or 0)
    runtime.describe(name, concurrency)
    runtime.upstream.size_pool(concurrency)
    metrics.serve(runtime.settings.metrics_port)
    freeze_startup(log)


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_runtime(**_: Any) -> None:
    runtime = Runtime.current()
    if runtime is not None:
        runtime.stop()


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _start_child_runtime(**_: Any) -> None:
    Runtime.get()
    freeze_startup(log)

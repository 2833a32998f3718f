"""Running one job: claim it, stream it from the upstream, publish every token, end it once.

Every path out of ``run_job`` publishes exactly one terminal event, unless another attempt owns
the job (then that attempt will) or the job was handed back to the queue.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from producer import scripts
from producer.protocol import EventType, StateField
from producer.spec import InvalidJob, JobSpec
from worker import dialects
from worker.dialects import Continuation
from worker.errors import (
    DeadlineExceeded,
    Fenced,
    InvalidJobError,
    JobCancelled,
    JobFailed,
    JobStop,
    TooManyAttempts,
    UpstreamError,
)
from worker.publisher import JobPublisher, claim, now_ms
from worker.runtime import ActiveJob, Runtime

log = logging.getLogger("tokenrelay.worker")


def run_job(runtime: Runtime, job_id: str, spec_data: Mapping[str, Any] | None) -> str:
    """Run one delivery of a job; return how it ended (for logs and tests)."""
    settings, keys = runtime.settings, runtime.keys
    owner = runtime.new_owner()
    taken = claim(runtime.scripts, keys, job_id, owner, runtime.lease_ms)
    if taken.outcome == "missing" and spec_data is not None:
        # Enqueued by a plain Celery client that did not create the job's state first.
        _create_state(runtime, job_id, spec_data)
        taken = claim(runtime.scripts, keys, job_id, owner, runtime.lease_ms)
    if taken.outcome != "claimed":
        log.info("job %s: not run, %s", job_id, taken.outcome)
        return taken.outcome
    publisher = JobPublisher(
        runtime.scripts,
        keys,
        job_id,
        owner,
        next_seq=taken.last_seq + 1,
        lease_ms=runtime.lease_ms,
        ttl=settings.job_ttl,
    )
    active = ActiveJob(job_id, owner, deadline=time.monotonic() + settings.job_deadline)
    runtime.register(active)
    started = time.monotonic()
    try:
        return _run_claimed(runtime, active, publisher, taken.attempt, taken.cancel, spec_data)
    finally:
        runtime.unregister(active)
        log.info(
            "job %s: attempt %d ended after %.3f s with %d tokens",
            job_id,
            taken.attempt,
            time.monotonic() - started,
            publisher.tokens,
        )


def _run_claimed(
    runtime: Runtime,
    active: ActiveJob,
    publisher: JobPublisher,
    attempt: int,
    cancel: bool,
    spec_data: Mapping[str, Any] | None,
) -> str:
    try:
        if attempt > 1:
            publisher.event(EventType.RESTART, attempt=attempt)
        spec = _spec(runtime, active.job_id, spec_data)
        active.deadline = time.monotonic() + (spec.deadline or runtime.settings.job_deadline)
        publisher.event(EventType.START, attempt=attempt, model=spec.model, ts=time.time())
        if attempt > runtime.settings.max_attempts:
            raise TooManyAttempts(f"the job was started {attempt} times; its workers kept dying")
        if cancel:
            raise JobCancelled()
        finish_reason, usage = _stream(runtime, active, publisher, spec)
        publisher.finish(EventType.DONE, finish_reason=finish_reason, usage=usage)
        return "done"
    except JobCancelled:
        publisher.finish(EventType.CANCELLED)
        return "cancelled"
    except JobFailed as exc:
        publisher.finish(
            EventType.ERROR, code=exc.code, message=exc.message, status=_status_of(exc)
        )
        return "error"
    except Fenced:
        return "fenced"
    except Exception:
        log.exception("job %s: unexpected failure", active.job_id)
        publisher.finish(EventType.ERROR, code="internal", message="the worker failed unexpectedly")
        return "error"


def _status_of(exc: JobFailed) -> int | None:
    return exc.status if isinstance(exc, UpstreamError) else None


def _spec(runtime: Runtime, job_id: str, spec_data: Mapping[str, Any] | None) -> JobSpec:
    settings = runtime.settings
    if spec_data is None:
        raw = runtime.redis.hget(runtime.keys.state(job_id), StateField.SPEC)
        try:
            spec_data = json.loads(raw) if raw else None
        except ValueError:
            spec_data = None
        if not isinstance(spec_data, dict):
            raise InvalidJobError("the job's request is missing from its state")
    try:
        return JobSpec.from_dict(
            spec_data,
            default_model=settings.default_model,
            default_dialect=settings.upstream_dialect,
            max_prompt_bytes=settings.max_prompt_bytes,
        )
    except InvalidJob as exc:
        raise InvalidJobError(str(exc)) from None


def _create_state(runtime: Runtime, job_id: str, spec_data: Mapping[str, Any]) -> None:
    runtime.redis.eval(
        scripts.CREATE,
        1,
        runtime.keys.state(job_id),
        now_ms(),
        runtime.settings.job_ttl + int(runtime.settings.visibility_timeout),
        StateField.SPEC,
        json.dumps(spec_data),
    )


def _check(active: ActiveJob, publisher: JobPublisher) -> None:
    """Raise the job's interruption, if any: cancel, deadline, lost lease."""
    if publisher.cancel_requested and active.interrupted is None:
        active.interrupt("cancelled")
    reason = active.interrupted
    if reason is None:
        return
    if reason == "cancelled":
        raise JobCancelled()
    if reason == "deadline":
        raise DeadlineExceeded("the job ran past its deadline")
    if reason == "fenced":
        raise Fenced(active.job_id)
    raise JobStop(reason)


def _stream(
    runtime: Runtime, active: ActiveJob, publisher: JobPublisher, spec: JobSpec
) -> tuple[str | None, dict[str, int] | None]:
    dialect = dialects.get(spec.dialect)

    def before_read() -> None:
        publisher.flush()
        _check(active, publisher)

    before_read()
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    try:
        stream = runtime.upstream.open(dialect, spec, Continuation(), before_read=before_read)
    except UpstreamError:
        _check(active, publisher)
        raise
    active.attach(stream)
    try:
        for delta in stream.deltas():
            if delta.text:
                publisher.token(delta.text)
            if delta.finish_reason:
                finish_reason = delta.finish_reason
            if delta.usage:
                usage = dict(delta.usage)
        _check(active, publisher)
    except UpstreamError:
        _check(active, publisher)
        raise
    finally:
        active.attach(None)
        stream.close()
    return finish_reason, usage

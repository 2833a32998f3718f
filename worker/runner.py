"""Running one job: claim it, stream it from the upstream, publish every token, end it once.

Every path out of ``run_job`` publishes exactly one terminal event, unless another attempt owns
the job (then that attempt will) or the job was handed back to the queue.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import redis

from producer import scripts
from producer.protocol import EventType, StateField
from producer.spec import InvalidJob, JobSpec
from worker import dialects, metrics
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
    if runtime.stopping:
        # This worker is shutting down: a job it receives now belongs to another worker.
        runtime.requeue(job_id)
        log.info("job %s: not run, this worker is stopping; re-enqueued", job_id)
        return "requeued"
    owner = runtime.new_owner()
    # The running set is what reapers watch. On a single Redis the claim and the final publish
    # keep it (atomically, no extra round trip); on a cluster it lives on another shard: the job
    # is registered before the claim, so a reaper sees it even if this worker dies right after.
    tracked = not runtime.sharded
    if not tracked:
        runtime.redis.zadd(keys.running, {job_id: now_ms()})
        runtime.redis.zrem(keys.queued, job_id)  # the delivery has arrived
    lease_ms = runtime.lease_ms
    taken = claim(runtime.scripts, keys, job_id, owner, lease_ms, track=tracked)
    if taken.outcome == "missing" and spec_data is not None:
        # Enqueued by a plain Celery client that did not create the job's state first.
        _create_state(runtime, job_id, spec_data)
        taken = claim(runtime.scripts, keys, job_id, owner, lease_ms, track=tracked)
    if taken.outcome != "claimed":
        # Finished, or running elsewhere under a live lease: this delivery is dropped (and
        # acknowledged), so a redelivered message never runs a job twice.
        if taken.outcome in ("finished", "missing") and not tracked:
            runtime.redis.zrem(keys.running, job_id)
        log.info("job %s: not run, %s", job_id, taken.outcome)
        return taken.outcome
    active = ActiveJob(job_id, owner, deadline=time.monotonic() + settings.job_deadline)
    publisher = JobPublisher(
        runtime.scripts,
        keys,
        job_id,
        owner,
        next_seq=taken.last_seq + 1,
        lease_ms=runtime.lease_ms,
        ttl=settings.job_ttl,
        publish_command=runtime.publish_command,
        flusher=runtime.flusher,
        on_signal=active.interrupt,
        track_running=tracked,
    )
    runtime.register(active)
    started = time.monotonic()
    log.info(
        "job %s started: model %s, attempt %d",
        job_id,
        _model_of(spec_data),
        taken.attempt,
        extra={"job": job_id, "attempt": taken.attempt, "event": "job_started"},
    )
    outcome = "error"
    try:
        try:
            outcome = _run_claimed(
                runtime, active, publisher, taken.attempt, taken.cancel, spec_data
            )
        except Fenced:
            # Another attempt owns the job now, learnt while publishing the terminal event in a
            # handler of ``_run_claimed`` (its sibling handlers do not catch what it raises).
            outcome = "fenced"
        if publisher.finished and outcome != "fenced" and not tracked:
            runtime.redis.zrem(keys.running, job_id)
        return outcome
    finally:
        runtime.unregister(active)
        duration = time.monotonic() - started
        ttft = publisher.first_token_after
        log.info(
            "job %s finished: %s after %.3f s, attempt %d, %d tokens, ttft %s",
            job_id,
            outcome,
            duration,
            taken.attempt,
            publisher.tokens,
            "-" if ttft is None else f"{ttft:.3f} s",
            extra={
                "event": "job_finished",
                "job": job_id,
                "model": active.model,
                "attempt": taken.attempt,
                "tokens": publisher.tokens,
                "ttft_s": None if ttft is None else round(ttft, 4),
                "duration_s": round(duration, 4),
                "outcome": outcome,
            },
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
            metrics.RESTARTS.inc()
            if publisher.next_seq > 0:
                # Readers drop what they have of the earlier attempt (if it published anything).
                publisher.event(EventType.RESTART, attempt=attempt)
        spec = _spec(runtime, active.job_id, spec_data)
        active.model = spec.model
        active.deadline = time.monotonic() + (spec.deadline or runtime.settings.job_deadline)
        publisher.event(
            EventType.START,
            attempt=attempt,
            model=spec.model,
            ts=time.time(),
            worker=runtime.worker_id,
        )
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
        if isinstance(exc, UpstreamError):
            metrics.UPSTREAM_ERRORS.labels(exc.code).inc()
        publisher.finish(
            EventType.ERROR, code=exc.code, message=exc.message, status=_status_of(exc)
        )
        return "error"
    except Fenced:
        return "fenced"
    except JobStop as stop:
        if str(stop) != "shutdown":
            raise
        return _hand_back(runtime, active, publisher)
    except redis.RedisError:
        # Publishing failed past the client's retries: no terminal event can be written now.
        # The attempt is abandoned; its lease lapses and the job starts again (a restart).
        raise
    except Exception:
        log.exception("job %s: unexpected failure", active.job_id)
        publisher.finish(EventType.ERROR, code="internal", message="the worker failed unexpectedly")
        return "error"


def _hand_back(runtime: Runtime, active: ActiveJob, publisher: JobPublisher) -> str:
    """The worker is stopping: publish what was produced, release the job, queue it again."""
    keys = runtime.keys
    try:
        publisher.sync()
    except Fenced:
        return "fenced"
    released = runtime.scripts.release(
        keys=[keys.state(active.job_id), keys.lease(active.job_id)], args=[active.owner]
    )
    if released:
        runtime.requeue(active.job_id)
        log.warning("job %s: handed back to the queue at shutdown", active.job_id)
    return "released"


def _model_of(spec_data: Mapping[str, Any] | None) -> str:
    model = spec_data.get("model") if isinstance(spec_data, Mapping) else None
    return str(model)[:100] if model else "(default)"


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
        job_id,
        "",  # no message to queue: this one is being delivered
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
    """Stream the job from the upstream, retrying what may succeed on a second try.

    Before the first token, retryable failures (connection errors, 429, 5xx) are retried with
    exponential backoff and jitter, honouring ``Retry-After``, within ``upstream_retries`` and
    ``upstream_retry_wait``. After it, a broken stream ends the job in ``error`` unless the job
    asked for ``on_interrupt="continue"``: then the stream is reopened from the text so far.
    """
    settings = runtime.settings
    dialect = dialects.get(spec.dialect)
    retry = Backoff(settings.upstream_retries, settings.upstream_retry_wait)
    done = Continuation()
    texts: list[str] = []
    resumes = 0

    def before_read() -> None:
        publisher.flush()
        _check(active, publisher)

    while True:
        try:
            return _stream_once(runtime, active, publisher, spec, dialect, done, texts, before_read)
        except UpstreamError as exc:
            _check(active, publisher)
            if not exc.retryable:
                raise
            if not texts:
                pause = retry.next_pause(exc.retry_after)
                if pause is None:
                    raise _exhausted(exc, retry) from None
                metrics.RETRIES.labels(exc.code).inc()
                log.info("job %s: upstream %s; retry in %.2f s", active.job_id, exc.code, pause)
                _pause(pause, before_read)
            elif spec.on_interrupt == "continue" and resumes < MAX_RESUMES:
                resumes += 1
                done = Continuation("".join(texts), len(texts))
                runtime.redis.hincrby(runtime.keys.state(active.job_id), StateField.RESUMED, 1)
                log.info(
                    "job %s: upstream broke after %d tokens; continuing", active.job_id, len(texts)
                )
            else:
                raise


def _stream_once(
    runtime: Runtime,
    active: ActiveJob,
    publisher: JobPublisher,
    spec: JobSpec,
    dialect: dialects.Dialect,
    done: Continuation,
    texts: list[str],
    before_read: Callable[[], None],
) -> tuple[str | None, dict[str, int] | None]:
    before_read()
    if done.tokens >= spec.max_tokens:
        return "length", None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    stream = runtime.upstream.open(dialect, spec, done, before_read=before_read)
    active.attach(stream)
    try:
        for delta in stream.deltas():
            if delta.text:
                publisher.token(delta.text)
                texts.append(delta.text)
            if delta.finish_reason:
                finish_reason = delta.finish_reason
            if delta.usage:
                usage = dict(delta.usage)
        _check(active, publisher)
    finally:
        active.attach(None)
        stream.close()
    return finish_reason, usage


MAX_RESUMES: Final = 3


class Backoff:
    """Exponential backoff with full jitter, capped in attempts and in total wait."""

    def __init__(self, retries: int, max_wait: float, base: float = 0.25, cap: float = 8.0) -> None:
        self.retries, self.max_wait, self.base, self.cap = retries, max_wait, base, cap
        self.attempts = 0
        self.waited = 0.0

    def next_pause(self, retry_after: float | None) -> float | None:
        """Seconds to wait before the next try, or ``None`` when out of retries or time."""
        if self.attempts >= self.retries:
            return None
        if retry_after is not None:
            pause = max(0.0, retry_after)
        else:
            pause = random.uniform(0, min(self.cap, self.base * 2**self.attempts))
        if self.waited + pause > self.max_wait:
            return None
        self.attempts += 1
        self.waited += pause
        return pause


def _exhausted(exc: UpstreamError, retry: Backoff) -> UpstreamError:
    if retry.attempts:
        exc.message = f"{exc.message} (gave up after {retry.attempts} retries)"
    return exc


def _pause(seconds: float, before_read: Callable[[], None]) -> None:
    """Sleep, still noticing a cancel or the deadline every 100 ms."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
        before_read()

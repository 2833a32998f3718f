"""The producer library: submit jobs, follow them, read their state, cancel them.

    client = Client(redis_url="redis://127.0.0.1:6379/0")
    job = client.submit(prompt="Alan Turing was", max_tokens=64)
    for token in job.tokens():
        print(token, end="", flush=True)

Jobs are enqueued by task name as Celery tasks (``producer.enqueue``); this package never imports
the worker. A reader gets every event once and in order whenever it joins (``Subscription``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis

from producer import scripts
from producer.connection import is_cluster, publish_command, sync_redis
from producer.enqueue import Enqueuer
from producer.protocol import (
    VERSION,
    Event,
    EventType,
    Keys,
    ProtocolError,
    StateField,
    encode_cancel,
    validate_job_id,
)
from producer.reading import (
    JobFailedError,
    JobNotFound,
    JobState,
    Sequencer,
    Transcript,
    Verdict,
    decode_live,
    events_from_log,
)
from producer.settings import Settings
from producer.spec import InvalidJob, JobSpec

LOG_BATCH = 1000
POLL_INTERVAL = 1.0
_SUBSCRIBED = ("subscribe", "ssubscribe")
_MESSAGES = ("message", "smessage")


def new_job_id() -> str:
    return uuid.uuid4().hex


def prepare(settings: Settings, request: dict[str, Any], job_id: str | None) -> tuple[str, JobSpec]:
    """Validate a job request and its id; raise ``InvalidJob`` naming the field."""
    spec = JobSpec.from_dict(
        {k: v for k, v in request.items() if v is not None},
        default_model=settings.default_model,
        default_dialect=settings.upstream_dialect,
        max_prompt_bytes=settings.max_prompt_bytes,
    )
    if job_id is None:
        return new_job_id(), spec
    try:
        return validate_job_id(job_id), spec
    except ProtocolError:
        raise InvalidJob("job_id", "must be 1 to 64 letters, digits, '-' or '_'") from None


def create_call(
    settings: Settings,
    keys: Keys,
    job_id: str,
    spec: JobSpec,
    tenant: str | None,
    *,
    sharded: bool,
    enqueuer: Enqueuer | None = None,
) -> tuple[list[str], list[Any]]:
    """Keys and arguments of the CREATE script for a new job.

    On a single Redis the job joins the queued set in the same call (on a cluster the set lives
    on another slot: the producer adds the job to it before creating it). Given an
    ``enqueuer`` (the broker is this Redis: ``Enqueuer.in_script``), the call also pushes the
    job's message onto the broker's queue."""
    spec_dict = spec.to_dict()
    fields: list[Any] = [
        StateField.MODEL,
        spec.model,
        StateField.DIALECT,
        spec.dialect,
        StateField.SPEC,
        json.dumps(spec_dict, ensure_ascii=False),
    ]
    if tenant is not None:
        fields += (StateField.TENANT, tenant)
    script_keys = [keys.state(job_id)] if sharded else [keys.state(job_id), keys.queued]
    message = ""
    if enqueuer is not None:
        assert not sharded, "a cluster is never the broker"
        script_keys.append(enqueuer.queue)
        message = enqueuer.message(job_id, spec_dict)
    # A queued job is kept long enough to run; once it ends its keys expire after job_ttl.
    ttl = settings.visibility_timeout + settings.job_ttl
    return script_keys, [int(time.time() * 1000), ttl, job_id, message, *fields]


def create_caller(
    settings: Settings, enqueuer: Enqueuer, *, sharded: bool
) -> Callable[[str, JobSpec, str | None], tuple[list[str], list[Any]]]:
    """``create_call`` for one client: (job id, spec, tenant) -> keys and arguments, the job's
    message included when the broker is the jobs' own Redis."""
    return functools.partial(
        create_call,
        settings,
        Keys(settings.prefix),
        sharded=sharded,
        enqueuer=enqueuer if enqueuer.in_script else None,
    )


def cancelled_prefix(job_id: str) -> str:
    """The start of a ``cancelled`` event, completed with its seq by the CANCEL script."""
    return f'{{"v":{VERSION},"job":"{job_id}","seq":'


def cancel_call(settings: Settings, keys: Keys, job_id: str) -> tuple[list[str], list[Any]]:
    """Keys and arguments of the CANCEL script for one job."""
    return [keys.state(job_id), keys.log(job_id), keys.channel(job_id)], [
        publish_command(settings.redis_url),
        settings.job_ttl,
        int(time.time() * 1000),
        job_id,
        cancelled_prefix(job_id),
    ]


class Client:
    """A blocking client. Safe to share between threads; cooperative under gevent."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        broker_url: str | None = None,
        prefix: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        base = settings or Settings.from_env()
        self.settings = override_settings(base, redis_url, broker_url, prefix)
        self.keys = Keys(self.settings.prefix)
        self.redis: redis.Redis = sync_redis(self.settings.redis_url)  # or a RedisCluster
        self._create = self.redis.register_script(scripts.CREATE)
        self._cancel = self.redis.register_script(scripts.CANCEL)
        self.sharded = is_cluster(self.settings.redis_url)
        self._enqueuer = Enqueuer(self.settings)
        self._create_call = create_caller(self.settings, self._enqueuer, sharded=self.sharded)

    def close(self) -> None:
        self._enqueuer.close()
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def submit(
        self,
        prompt: str | None = None,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        messages: list[dict[str, str]] | None = None,
        dialect: str | None = None,
        on_interrupt: str | None = None,
        deadline: float | None = None,
        job_id: str | None = None,
        follow: bool = False,
        tenant: str | None = None,
    ) -> Job:
        """Validate and enqueue a job; with an existing ``job_id``, return that job instead.

        With ``follow=True`` the returned job is subscribed before it is enqueued.
        """
        request = {
            "prompt": prompt,
            "model": model,
            "max_tokens": max_tokens,
            "stop": list(stop) if isinstance(stop, list | tuple) else stop,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "repetition_penalty": repetition_penalty,
            "messages": messages,
            "dialect": dialect,
            "on_interrupt": on_interrupt,
            "deadline": deadline,
        }
        job_id, spec = prepare(self.settings, request, job_id)
        job = Job(self, job_id)
        if follow:
            job.subscription.open()
        if self.sharded:  # the queued set is on another slot: join it first (see CREATE)
            self.redis.zadd(self.keys.queued, {job_id: int(time.time() * 1000)}, nx=True)
        keys, args = self._create_call(job_id, spec, tenant)
        created = self._create(keys=keys, args=args)
        if created and not self._enqueuer.in_script:
            try:
                self._enqueuer.send(job_id, spec)
            except Exception:
                # Not accepted: leave no queued job behind that no worker will ever run.
                self.redis.delete(self.keys.state(job_id))
                self.redis.zrem(self.keys.queued, job_id)
                raise
        return job

    def subscribe(self, job_id: str, *, after: int = -1, wait: float = 0.0) -> Job:
        """A job to read from event ``after + 1`` on; ``JobNotFound`` if it does not exist.

        ``wait`` is how many seconds to wait for a job that is not created yet (one enqueued by
        another Celery client exists once a worker takes it).
        """
        validate_job_id(job_id)
        deadline = time.monotonic() + wait
        keys = self.keys.state(job_id), self.keys.log(job_id)
        while not self.redis.exists(*keys):
            if time.monotonic() >= deadline:
                raise JobNotFound(job_id)
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return Job(self, job_id, after=after)

    def status(self, job_id: str) -> JobState:
        validate_job_id(job_id)
        raw = self.redis.hgetall(self.keys.state(job_id))
        if not raw:
            raise JobNotFound(job_id)
        return JobState.from_hash(job_id, raw)

    def cancel(self, job_id: str) -> JobState:
        """Cancel a job: a queued one ends at once, a running one within 250 ms."""
        validate_job_id(job_id)
        keys, args = cancel_call(self.settings, self.keys, job_id)
        status = self._cancel(keys=keys, args=args)
        if status is None:
            raise JobNotFound(job_id)
        if status == b"running":
            self.redis.publish(self.keys.control, encode_cancel(job_id))
        return self.status(job_id)


class Subscription:
    """Every event of one job, once and in order, whenever the reader joined."""

    def __init__(self, client: Client, job_id: str, after: int = -1) -> None:
        self._client = client
        self.job_id = job_id
        self.sequencer = Sequencer(last=after)
        self._pubsub: Any = None
        self.reconnects = 0  # times the live connection was lost and the log filled the gap

    def open(self) -> None:
        """Subscribe, and wait until Redis confirms it: only then is reading the log safe."""
        if self._pubsub is None:
            self._pubsub = self._client.redis.pubsub()  # type: ignore[no-untyped-call]
            channel = self._client.keys.channel(self.job_id)
            if self._client.sharded:
                self._pubsub.ssubscribe(channel)
            else:
                self._pubsub.subscribe(channel)
            deadline = time.monotonic() + 5.0
            while (left := deadline - time.monotonic()) > 0:
                message = self._get(left)
                if message is not None and message["type"] in _SUBSCRIBED:
                    return

    def _get(self, timeout: float) -> Any:
        assert self._pubsub is not None
        if self._client.sharded:
            return self._pubsub.get_sharded_message(timeout=timeout)
        return self._pubsub.get_message(timeout=timeout)

    def close(self) -> None:
        if self._pubsub is not None:
            self._pubsub.close()
            self._pubsub = None

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events up to and including the terminal one; ``TimeoutError`` past ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.open()
            yield from self._catch_up()
            if not self.sequencer.done and self.sequencer.last >= 0:
                # Resuming after the last event of a job that has ended: nothing more to come.
                state = self._client.status(self.job_id)
                if state.terminal and state.last_seq <= self.sequencer.last:
                    return
            while not self.sequencer.done:
                wait = POLL_INTERVAL
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError(f"job {self.job_id}: no terminal event in {timeout} s")
                yield from self._next_live(wait)
        finally:
            self.close()

    def _next_live(self, wait: float) -> Iterator[Event]:
        try:
            message = self._get(wait)
        except (redis.ConnectionError, redis.TimeoutError):
            # Resubscribe and let the log fill whatever was missed meanwhile.
            self.reconnects += 1
            self.close()
            time.sleep(0.05)
            self.open()
            message = None
        if message is not None and message["type"] not in _MESSAGES:
            if message["type"] in _SUBSCRIBED:
                # redis-py reconnected and subscribed again: the log holds what was missed.
                self.reconnects += 1
            message = None
        event = decode_live(message["data"]) if message else None
        if event is None:
            # Idle or unreadable: the log is the truth (and heals a lost message).
            yield from self._catch_up()
            return
        verdict = self.sequencer.judge(event)
        if verdict is Verdict.NEXT:
            yield self.sequencer.deliver(event)
        elif verdict is Verdict.GAP:
            yield from self._catch_up()

    def _catch_up(self) -> Iterator[Event]:
        log_key = self._client.keys.log(self.job_id)
        while not self.sequencer.done:
            entries = self._client.redis.xrange(
                log_key, min=self.sequencer.log_start, count=LOG_BATCH
            )
            for event in events_from_log(entries or []):
                if self.sequencer.judge(event) is Verdict.NEXT:
                    yield self.sequencer.deliver(event)
            if len(entries or []) < LOG_BATCH:
                return


class Job:
    """A handle on one job: its events, its tokens, its text."""

    def __init__(self, client: Client, job_id: str, after: int = -1) -> None:
        self.client = client
        self.id = job_id
        self._after = after
        self.subscription = Subscription(client, job_id, after)
        self.transcript = Transcript()
        self._read = False

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Every event up to the terminal one (see ``Subscription.events``).

        Each call reads the job afresh (the first one through the subscription opened at
        submit), so iterating a job twice gives the same events twice.
        """
        if self._read:
            self.subscription = Subscription(self.client, self.id, self._after)
        self._read = True
        self.transcript = Transcript()
        for event in self.subscription.events(timeout):
            self.transcript.add(event)
            yield event

    def tokens(self, timeout: float | None = None) -> Iterator[str]:
        """Token texts as they arrive; raise ``JobFailedError`` if the job errs or is cancelled.

        After a ``restart`` (its worker died) the tokens of the new attempt follow; ``restarts``
        counts them, and ``text()`` holds only the final attempt's text.
        """
        for event in self.events(timeout):
            if event.type is EventType.TOKEN:
                yield event.text
            elif event.type in (EventType.ERROR, EventType.CANCELLED):
                raise _failed(event, self.transcript)

    @property
    def restarts(self) -> int:
        return self.transcript.restarts

    def text(self, timeout: float | None = 300.0) -> str:
        """Wait for the job and return its whole text; ``JobFailedError`` if it did not finish."""
        for _ in self.tokens(timeout):
            pass
        return self.transcript.text

    def status(self) -> JobState:
        return self.client.status(self.id)

    def cancel(self) -> JobState:
        return self.client.cancel(self.id)


def _failed(event: Event, transcript: Transcript) -> JobFailedError:
    error = JobFailedError(event)
    error.partial_text = transcript.text
    return error


def override_settings(
    settings: Settings, redis_url: str | None, broker_url: str | None, prefix: str | None
) -> Settings:
    changes: dict[str, Any] = {}
    if redis_url is not None:
        changes["redis_url"] = redis_url
        if broker_url is None and settings.broker_url == settings.redis_url:
            changes["broker_url"] = redis_url
    if broker_url is not None:
        changes["broker_url"] = broker_url
    if prefix is not None:
        changes["prefix"] = prefix
    return dataclasses.replace(settings, **changes) if changes else settings

"""The Celery app: the only place Celery is configured.

Start a worker the Celery way: ``celery -A worker worker -P gevent -c 200``. Settings come from
``TOKENRELAY_*`` variables (``producer.settings``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from celery import Celery
from celery.exceptions import CPendingDeprecationWarning
from celery.signals import worker_ready

from producer import logs
from producer.protocol import Keys
from producer.settings import Settings

BROKER_CONNECTIONS = 1024

settings = Settings.from_env()
logs.configure(settings.log_format)

app = Celery("tokenrelay", broker=settings.broker_url, include=["worker.tasks"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    result_backend=None,
    task_default_queue=Keys(settings.prefix).queue,
    # A job is acknowledged only after it ended, and re-delivered if its worker died.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # A task that fails without a retry (e.g. the retry itself could not be published while
    # Redis was away) is not acknowledged: the broker delivers it again after the visibility
    # timeout, and CLAIM drops it if the job ran meanwhile.
    task_acks_on_failure_or_timeout=False,
    worker_prefetch_multiplier=1,
    # Longer than any job may run, so the broker never hands a running job to a second worker.
    # kombu's Redis transport allows 10 connections by default; under gevent hundreds of
    # running tasks acknowledge at once, and running out of connections made Celery drop its
    # consumer and cancel the running tasks. (For redis:// brokers, worker/broker.py keeps a
    # few connections instead, and a command waits for a free one.)
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout,
        "max_connections": BROKER_CONNECTIONS,
    },
    # A lost broker connection does not stop the streams: a job needs the broker only to be
    # delivered and acknowledged. (Celery's own default from 6.0 on cancels tasks with late
    # acknowledgement, so that the broker's redelivery is their only copy; here that would start
    # every running stream over, and a redelivered message of a job that ran is dropped at its
    # claim.)
    worker_cancel_long_running_tasks_on_connection_loss=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _quiet_connection_loss_notice(**_: Any) -> None:
    """Celery warns at every broker connection loss that the setting above will default to True
    in 6.0; it is off on purpose. (Filtered once the worker is up: Celery's logging setup turns
    its deprecation warnings back on.)"""
    warnings.filterwarnings(
        "ignore",
        message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss",
        category=CPendingDeprecationWarning,
    )


@worker_ready.connect  # type: ignore[untyped-decorator]
def _quiet_per_task_lines(**_: Any) -> None:
    """Celery logs two INFO lines per task (received, succeeded) besides the job's own two
    (``job ... started`` / ``finished``, with the model, attempt, tokens and TTFT). At hundreds
    of jobs a second they are half the log and about 40 µs of CPU per job; a task that fails
    is still logged (warnings and errors)."""
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)


if settings.broker_url.startswith("redis://"):
    # kombu's Redis transport with one client for its per-message commands (worker/broker.py).
    app.conf.broker_transport = "worker.broker:Transport"

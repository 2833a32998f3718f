"""Enqueueing by task name: the producer's side of the broker.

A minimal Celery client used only for ``send_task`` (the worker's app in ``worker/app.py`` is
where Celery is configured); any Celery client can enqueue the same way:
``send_task("tokenrelay.stream", kwargs={"job_id": J, "spec": {...}}, queue="tokenrelay.jobs")``.
"""

from __future__ import annotations

from celery import Celery

from producer.protocol import TASK_NAME, Keys
from producer.settings import Settings
from producer.spec import JobSpec


class Enqueuer:
    def __init__(self, settings: Settings) -> None:
        self._app = Celery("tokenrelay-producer", broker=settings.broker_url, set_as_current=False)
        self._app.conf.update(task_serializer="json", accept_content=["json"])
        self._queue = Keys(settings.prefix).queue

    def send(self, job_id: str, spec: JobSpec) -> None:
        """Put one job on the queue; raise if the broker refuses it."""
        self._app.send_task(
            TASK_NAME,
            kwargs={"job_id": job_id, "spec": spec.to_dict()},
            queue=self._queue,
            ignore_result=True,
        )

    def close(self) -> None:
        self._app.close()

"""Enqueueing by task name: the producer's side of the broker.

A minimal Celery client (the worker's app in ``worker/app.py`` is where Celery is configured);
any Celery client can enqueue the same way:
``send_task("tokenrelay.stream", kwargs={"job_id": J, "spec": {...}}, queue="tokenrelay.jobs")``.

When the broker is the Redis that holds the jobs (the default), the producer does not send the
message through kombu: ``message`` builds the very message ``send_task`` would put on the queue
(Celery's own task message, in kombu's Redis envelope), and the ``CREATE`` script pushes it in
the same call that creates the job. A submit is then one round trip instead of two, costs the
producer a fraction of the CPU, and a job is never created without its message.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename

from producer.connection import is_cluster
from producer.protocol import TASK_NAME, Keys
from producer.settings import Settings
from producer.spec import JobSpec


def queued_in_script(settings: Settings) -> bool:
    """Whether CREATE queues the job's message itself: the broker is the jobs' own single
    Redis. Any other broker (another Redis, RabbitMQ) gets the message through Celery."""
    return settings.broker_url == settings.redis_url and not is_cluster(settings.redis_url)


class Enqueuer:
    def __init__(self, settings: Settings) -> None:
        self._app = Celery("tokenrelay-producer", broker=settings.broker_url, set_as_current=False)
        self._app.conf.update(task_serializer="json", accept_content=["json"])
        self.queue = Keys(settings.prefix).queue
        #: CREATE pushes the job's message itself (``message``); else ``send`` sends it.
        self.in_script = queued_in_script(settings)

    def send(self, job_id: str, spec: JobSpec) -> None:
        """Put one job on the queue through Celery; raise if the broker refuses it."""
        self._app.send_task(
            TASK_NAME,
            kwargs={"job_id": job_id, "spec": spec.to_dict()},
            queue=self.queue,
            ignore_result=True,
        )

    def message(self, job_id: str, spec: dict[str, Any]) -> str:
        """The text ``send`` would push onto a Redis broker's queue for this job.

        Celery builds the task message (protocol 2, the task by name); the envelope around it
        is what kombu's virtual channel adds before its Redis transport's ``LPUSH``: the body
        as base64, the delivery info of the default exchange, a fresh delivery tag."""
        task_id = str(uuid.uuid4())
        task = self._app.amqp.as_task_v2(
            task_id,
            TASK_NAME,
            kwargs={"job_id": job_id, "spec": spec},
            ignore_result=True,
            origin=anon_nodename(),  # as send_task names the sender: gen<pid>@<host>
            argsrepr="()",
            kwargsrepr=_kwargsrepr(job_id),
        )
        body = json.dumps(task.body).encode()
        return json.dumps(
            {
                "body": base64.b64encode(body).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": task.headers,
                "properties": {
                    **task.properties,
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": "", "routing_key": self.queue},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": str(uuid.uuid4()),
                },
            }
        )

    def close(self) -> None:
        self._app.close()


def _kwargsrepr(job_id: str) -> str:
    """What the worker logs of a task's arguments: the job, not its prompt (Celery's default
    would repr the whole spec into the message's headers and the worker's failure logs)."""
    return f"{{'job_id': {job_id!r}, 'spec': ...}}"

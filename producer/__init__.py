"""tokenrelay's producer library: what other services import to submit and read jobs."""

from producer.aio import AsyncClient, AsyncJob
from producer.client import Client, Job
from producer.protocol import Event, EventType, Status
from producer.reading import JobFailedError, JobNotFound, JobState
from producer.spec import InvalidJob

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Event",
    "EventType",
    "InvalidJob",
    "Job",
    "JobFailedError",
    "JobNotFound",
    "JobState",
    "Status",
]

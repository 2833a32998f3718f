"""tokenrelay's worker: ``celery -A worker worker -P gevent -c 200``."""

from worker.app import app

__all__ = ["app"]

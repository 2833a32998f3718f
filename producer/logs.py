"""Log output of tokenrelay's processes: plain lines, or one JSON object per line.

``TOKENRELAY_LOG_FORMAT=json`` gives structured logs: ``ts``, ``level``, ``logger``,
``message`` and the record's extra fields (``job``, ``attempt``, ``tokens``, ...). Nothing here
logs a prompt or a key: callers pass only ids, counts and outcomes.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Final

_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(log_format: str, level: int = logging.INFO) -> None:
    """Send the ``tokenrelay`` loggers' records to stderr in ``log_format`` (once)."""
    logger = logging.getLogger("tokenrelay")
    if any(getattr(h, "_tokenrelay", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._tokenrelay = True  # type: ignore[attr-defined]
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/%(name)s] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

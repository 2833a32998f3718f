"""Why a job stops early. One small tree; the runner maps each leaf to a terminal event.

JobStop
 ├── JobFailed                 -> `error` event with `code` and `message`
 │    ├── InvalidJobError       invalid_job
 │    ├── DeadlineExceeded      deadline_exceeded
 │    ├── TooManyAttempts       too_many_attempts
 │    └── UpstreamError         retryable or not, with the upstream's HTTP status
 │         ├── UpstreamHTTPError     upstream_http (status, Retry-After)
 │         ├── UpstreamUnavailable   upstream_unreachable (before the stream began)
 │         ├── UpstreamDisconnected  upstream_disconnected (the stream broke off)
 │         ├── UpstreamTimeout       upstream_timeout
 │         ├── UpstreamStreamError   upstream_error (an error object in the stream)
 │         └── UpstreamProtocolError upstream_protocol (a malformed event)
 ├── JobCancelled              -> `cancelled` event
 └── Fenced                    another attempt owns the job: stop without publishing
"""

from __future__ import annotations


class JobStop(Exception):
    """Base of every reason a job stops before its upstream finished."""


class JobFailed(JobStop):
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidJobError(JobFailed):
    code = "invalid_job"


class DeadlineExceeded(JobFailed):
    code = "deadline_exceeded"


class TooManyAttempts(JobFailed):
    code = "too_many_attempts"


class UpstreamError(JobFailed):
    """The upstream failed. ``retryable`` says whether asking again may succeed."""

    code = "upstream_error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.retry_after = retry_after


RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class UpstreamHTTPError(UpstreamError):
    code = "upstream_http"

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.status in RETRYABLE_STATUSES


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unreachable"
    retryable = True


class UpstreamDisconnected(UpstreamError):
    code = "upstream_disconnected"
    retryable = True


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"
    retryable = True


class UpstreamStreamError(UpstreamError):
    code = "upstream_error"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol"


class JobCancelled(JobStop):
    """A cancel was requested."""


class Fenced(JobStop):
    """This attempt lost the job's lease; another attempt owns it now."""

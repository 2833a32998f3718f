"""Settings: one frozen dataclass read from ``TOKENRELAY_*`` environment variables.

Every variable is named here and nowhere else; a bad value fails loudly at start with the
variable's name. The upstream API key is kept out of ``repr`` and is never written anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, TypeVar

from producer.protocol import DEFAULT_PREFIX, DIALECTS, ProtocolError, validate_prefix

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
DEFAULT_UPSTREAM_URL: Final = "https://api.together.xyz"
DEFAULT_DIALECT: Final = "together"
DEFAULT_MODEL: Final = "mistralai/Mixtral-8x7B-v0.1"
DEFAULT_JOB_TTL: Final = 3600
DEFAULT_MAX_PROMPT_BYTES: Final = 1024 * 1024
DEFAULT_JOB_DEADLINE: Final = 900.0
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
DEFAULT_READ_TIMEOUT: Final = 60.0
DEFAULT_LEASE_SECONDS: Final = 10.0
DEFAULT_MAX_ATTEMPTS: Final = 3
DEFAULT_SHUTDOWN_GRACE: Final = 30.0
#: Seconds a created job may wait unclaimed before a worker puts it on the queue again.
DEFAULT_QUEUED_GRACE: Final = 300.0
DEFAULT_UPSTREAM_RETRIES: Final = 4
DEFAULT_UPSTREAM_RETRY_WAIT: Final = 30.0
DEFAULT_METRICS_PORT: Final = 9808
DEFAULT_HEARTBEAT_SECONDS: Final = 5.0
LOG_FORMATS: Final = ("text", "json")
DEFAULT_KEEPALIVE_SECONDS: Final = 15.0
DEFAULT_MAX_BODY_BYTES: Final = 4 * 1024 * 1024

#: Every environment variable the settings read, for checks of deployment files.
ENV_PREFIX: Final = "TOKENRELAY_"


class SettingsError(ValueError):
    """A ``TOKENRELAY_*`` variable has a value that cannot be used."""


T = TypeVar("T")


def _parse(env: Mapping[str, str], name: str, default: T, convert: Callable[[str], T]) -> T:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name}: {exc}") from None


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def convert(raw: str) -> T:
        value = kind(raw)
        if not value > 0:  # type: ignore[operator]
            raise ValueError(f"must be greater than 0, got {raw!r}")
        return value

    return convert


def _non_negative(kind: Callable[[str], T]) -> Callable[[str], T]:
    def convert(raw: str) -> T:
        value = kind(raw)
        if value < 0:  # type: ignore[operator]
            raise ValueError(f"must be 0 or more, got {raw!r}")
        return value

    return convert


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"unknown value {raw!r}; expected one of {', '.join(choices)}")
        return raw

    return convert


def _dialect(raw: str) -> str:
    if raw not in DIALECTS:
        raise ValueError(f"unknown dialect {raw!r}; expected one of {', '.join(DIALECTS)}")
    return raw


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        if raw.split("://", 1)[0] not in schemes or "://" not in raw:
            raise ValueError(
                f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}"
            )
        return raw

    return convert


def _prefix(raw: str) -> str:
    try:
        return validate_prefix(raw)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


def _read_key(env: Mapping[str, str]) -> str | None:
    key = env.get("TOKENRELAY_UPSTREAM_API_KEY") or env.get("TOGETHER_API_KEY")
    path = env.get("TOKENRELAY_UPSTREAM_API_KEY_FILE")
    if not key and path:
        try:
            with open(path, encoding="utf-8") as handle:
                key = handle.read().strip()
        except OSError as exc:
            raise SettingsError(
                f"TOKENRELAY_UPSTREAM_API_KEY_FILE: cannot read the file: {exc.strerror}"
            ) from None
    return key or None


def _read_gateway_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """Client keys of the gateway: a comma- or space-separated list, or a file of them."""
    raw = env.get("TOKENRELAY_API_KEYS") or ""
    path = env.get("TOKENRELAY_API_KEYS_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                raw += "\n" + handle.read()
        except OSError as exc:
            raise SettingsError(
                f"TOKENRELAY_API_KEYS_FILE: cannot read the file: {exc.strerror}"
            ) from None
    keys = tuple(dict.fromkeys(k for k in raw.replace(",", " ").split() if not k.startswith("#")))
    for key in keys:
        if len(key) < 16:
            raise SettingsError("TOKENRELAY_API_KEYS: every key must be at least 16 characters")
    return keys


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


_REDIS_SCHEMES: Final = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


_http_url: Final = _url(("http", "https"))


def _upstream_url(raw: str) -> str:
    return _http_url(raw).rstrip("/")


#: The ``Settings`` fields read from one variable each, in the order they are read: the variable
#: and how its value is read. A field's default is the dataclass's; the keys are read apart.
_VARIABLES: Final[dict[str, tuple[str, Callable[[str], Any]]]] = {
    "redis_url": ("TOKENRELAY_REDIS_URL", _url(_REDIS_SCHEMES)),
    "broker_url": ("TOKENRELAY_BROKER_URL", str),
    "prefix": ("TOKENRELAY_PREFIX", _prefix),
    "upstream_url": ("TOKENRELAY_UPSTREAM_URL", _upstream_url),
    "upstream_dialect": ("TOKENRELAY_UPSTREAM_DIALECT", _dialect),
    "default_model": ("TOKENRELAY_DEFAULT_MODEL", str),
    "job_ttl": ("TOKENRELAY_JOB_TTL", _positive(int)),
    "max_prompt_bytes": ("TOKENRELAY_MAX_PROMPT_BYTES", _positive(int)),
    "job_deadline": ("TOKENRELAY_JOB_DEADLINE", _positive(float)),
    "connect_timeout": ("TOKENRELAY_UPSTREAM_CONNECT_TIMEOUT", _positive(float)),
    "read_timeout": ("TOKENRELAY_UPSTREAM_READ_TIMEOUT", _positive(float)),
    "lease_seconds": ("TOKENRELAY_LEASE_SECONDS", _positive(float)),
    "max_attempts": ("TOKENRELAY_MAX_ATTEMPTS", _positive(int)),
    "shutdown_grace": ("TOKENRELAY_SHUTDOWN_GRACE", _positive(float)),
    "queued_grace": ("TOKENRELAY_QUEUED_GRACE", _positive(float)),
    "upstream_retries": ("TOKENRELAY_UPSTREAM_RETRIES", _non_negative(int)),
    "upstream_retry_wait": ("TOKENRELAY_UPSTREAM_RETRY_WAIT", _positive(float)),
    "metrics_port": ("TOKENRELAY_METRICS_PORT", _non_negative(int)),
    "heartbeat_seconds": ("TOKENRELAY_HEARTBEAT_SECONDS", _positive(float)),
    "log_format": ("TOKENRELAY_LOG_FORMAT", _one_of(LOG_FORMATS)),
    "cancel_on_disconnect": ("TOKENRELAY_CANCEL_ON_DISCONNECT", _boolean),
    "keepalive_seconds": ("TOKENRELAY_KEEPALIVE_SECONDS", _positive(float)),
    "max_body_bytes": ("TOKENRELAY_MAX_BODY_BYTES", _positive(int)),
}


@dataclass(frozen=True)
class Settings:
    """The whole configuration of producers, workers and the gateway."""

    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str = DEFAULT_REDIS_URL
    prefix: str = DEFAULT_PREFIX
    upstream_url: str = DEFAULT_UPSTREAM_URL
    upstream_dialect: str = DEFAULT_DIALECT
    upstream_api_key: str | None = field(default=None, repr=False, compare=False)
    default_model: str = DEFAULT_MODEL
    job_ttl: int = DEFAULT_JOB_TTL
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    job_deadline: float = DEFAULT_JOB_DEADLINE
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    queued_grace: float = DEFAULT_QUEUED_GRACE
    upstream_retries: int = DEFAULT_UPSTREAM_RETRIES
    upstream_retry_wait: float = DEFAULT_UPSTREAM_RETRY_WAIT
    metrics_port: int = DEFAULT_METRICS_PORT
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    log_format: str = "text"
    # The gateway's.
    api_keys: tuple[str, ...] = field(default=(), repr=False, compare=False)
    cancel_on_disconnect: bool = True
    keepalive_seconds: float = DEFAULT_KEEPALIVE_SECONDS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every ``TOKENRELAY_*`` variable, failing with the variable's name."""
        env = os.environ if env is None else env
        defaults = {f.name: f.default for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, (variable, read) in _VARIABLES.items():
            # The broker is the jobs' Redis unless it is set.
            default = values["redis_url"] if name == "broker_url" else defaults[name]
            values[name] = _parse(env, variable, default, read)
        return cls(**values, upstream_api_key=_read_key(env), api_keys=_read_gateway_keys(env))

    @property
    def visibility_timeout(self) -> int:
        """Broker visibility timeout: longer than the longest job may run, so no double run."""
        return int(self.job_deadline + self.shutdown_grace + 3600)


#: The variables ``Settings.from_env`` reads (for checks of deployment files).
KNOWN_VARIABLES: Final = frozenset(
    [variable for variable, _ in _VARIABLES.values()]
    + [
        "TOKENRELAY_UPSTREAM_API_KEY",
        "TOKENRELAY_UPSTREAM_API_KEY_FILE",
        "TOKENRELAY_API_KEYS",
        "TOKENRELAY_API_KEYS_FILE",
    ]
)

"""The README's configuration table is the settings' truth: every variable, every default."""

from __future__ import annotations

import re
from pathlib import Path

from producer.settings import KNOWN_VARIABLES, Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_table() -> dict[str, str]:
    rows = re.findall(r"^\| `(TOKENRELAY_\w+)` \| ([^|]+) \|", README.read_text(), re.M)
    return {name: default.strip() for name, default in rows}


def test_every_setting_is_documented_and_nothing_else() -> None:
    assert set(readme_table()) == set(KNOWN_VARIABLES)


def test_documented_numeric_defaults_are_the_real_ones() -> None:
    defaults = Settings.from_env({})
    table = readme_table()
    for name, field in [
        ("TOKENRELAY_JOB_TTL", "job_ttl"),
        ("TOKENRELAY_MAX_PROMPT_BYTES", "max_prompt_bytes"),
        ("TOKENRELAY_JOB_DEADLINE", "job_deadline"),
        ("TOKENRELAY_UPSTREAM_CONNECT_TIMEOUT", "connect_timeout"),
        ("TOKENRELAY_UPSTREAM_READ_TIMEOUT", "read_timeout"),
        ("TOKENRELAY_LEASE_SECONDS", "lease_seconds"),
        ("TOKENRELAY_MAX_ATTEMPTS", "max_attempts"),
        ("TOKENRELAY_SHUTDOWN_GRACE", "shutdown_grace"),
        ("TOKENRELAY_KEEPALIVE_SECONDS", "keepalive_seconds"),
        ("TOKENRELAY_UPSTREAM_RETRIES", "upstream_retries"),
        ("TOKENRELAY_METRICS_PORT", "metrics_port"),
        ("TOKENRELAY_HEARTBEAT_SECONDS", "heartbeat_seconds"),
        ("TOKENRELAY_UPSTREAM_RETRY_WAIT", "upstream_retry_wait"),
        ("TOKENRELAY_MAX_BODY_BYTES", "max_body_bytes"),
    ]:
        assert float(table[name].strip("`")) == float(getattr(defaults, field)), name
    assert table["TOKENRELAY_DEFAULT_MODEL"] == f"`{defaults.default_model}`"
    assert table["TOKENRELAY_PREFIX"] == f"`{defaults.prefix}`"
    assert table["TOKENRELAY_UPSTREAM_URL"] == f"`{defaults.upstream_url}`"
    assert table["TOKENRELAY_REDIS_URL"] == f"`{defaults.redis_url}`"


def test_readme_opens_with_the_two_setup_commands() -> None:
    text = README.read_text()
    assert text.index("make demo") < text.index("## From Python")
    assert text.index("make test") < text.index("## From Python")


def test_readme_shows_every_gateway_route() -> None:
    from producer.gateway.app import Gateway

    text = README.read_text()
    for route in Gateway.routes(Gateway.__new__(Gateway)):
        path = route.path.replace("{job_id}", "JOB_ID")
        if path != "/":
            assert f"$G{path}" in text, f"no curl example for {route.path}"

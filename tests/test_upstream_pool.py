"""The worker's upstream connections are pooled: a stream that ended well leaves its connection
for the next job (one TLS handshake saved per job on a real API); a broken one is not reused."""

from __future__ import annotations

import secrets

import pytest

from producer.spec import JobSpec
from tests.conftest import Mock
from worker import dialects
from worker.dialects import Continuation
from worker.errors import UpstreamError
from worker.upstream import UpstreamClient


def _stream(client: UpstreamClient, dialect: str, model: str) -> tuple[str, str]:
    """Run one stream to its end; return its text and its prompt marker."""
    marker = f"pool-{secrets.token_hex(4)}"
    spec = JobSpec.from_dict(
        {"prompt": marker, "dialect": dialect, "model": model, "max_tokens": 5},
        default_model="mock",
        default_dialect=dialect,
        max_prompt_bytes=1000,
    )
    stream = client.open(dialects.get(dialect), spec, Continuation(), before_read=lambda: None)
    try:
        text = "".join(delta.text for delta in stream.deltas())
    finally:
        stream.close()
    return text, marker


@pytest.mark.parametrize("dialect", ["together", "openai-chat", "tgi", "ollama"])
def test_a_finished_stream_leaves_its_connection_to_the_next(
    mock: Mock, api_key: str, dialect: str
) -> None:
    client = UpstreamClient(mock.url, api_key, connect_timeout=2, read_timeout=5)
    try:
        runs = [_stream(client, dialect, "mock") for _ in range(3)]
    finally:
        client.close()
    assert all(text for text, _ in runs)
    peers = {mock.record(marker)["client"] for _, marker in runs}
    assert len(peers) == 1, peers


def test_a_broken_stream_is_not_reused(mock: Mock, api_key: str) -> None:
    client = UpstreamClient(mock.url, api_key, connect_timeout=2, read_timeout=5)
    try:
        with pytest.raises(UpstreamError):
            _stream(client, "together", "mock?drop_after=2")
        broken = [r for r in mock.stats() if "drop_after" in str(r["model"])][-1]
        text, marker = _stream(client, "together", "mock")
    finally:
        client.close()
    assert text
    assert mock.record(marker)["client"] != broken["client"]

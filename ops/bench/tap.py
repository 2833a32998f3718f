"""A separate subscriber to every job channel of a bench run: when each stamped token reached
Redis's pub/sub, as a process of its own saw it (``python -m ops.bench.tap URL PATTERN OUT``).

The fan-out scenario subtracts these times from its SSE readers' to tell the gateway's share of
a token's latency from the worker's. The tap does little work (one small message per token, not
per reader), so it is rarely late; when it is, the gateway's share looks smaller, not larger.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import redis

STAMP = b'"text":"|'
READY = "subscribed"


def main(argv: list[str]) -> None:
    """``URL PATTERN OUT``: subscribe to ``PATTERN`` until SIGTERM, then write what came."""
    url, pattern, out = argv[0], argv[1], Path(argv[2])
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.psubscribe(pattern)
    print(READY, flush=True)
    seen: list[str] = []
    while not stopping:
        message = pubsub.get_message(timeout=0.2)
        if message is None:
            continue
        now = time.time_ns()
        data = message["data"]
        at = data.find(STAMP)
        if at >= 0:
            end = data.find(b'"', at + len(STAMP))
            seen.append(f"{data[at + len(STAMP) - 1 : end].decode()} {now}")
    out.write_text("\n".join(seen))


class Tap:
    """The tap as a child process: ``start`` returns once it is subscribed; ``stop`` returns
    ``{token text: ns it reached the tap}``."""

    def __init__(self, url: str, prefix: str, out: Path) -> None:
        code = "import sys; from ops.bench.tap import main; main(sys.argv[1:])"
        self.args = [sys.executable, "-c", code, url, f"{prefix}:job:*", str(out)]
        self.out = out
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> Tap:
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the tap's first line, or "" if it died
        self.process.stdout.close()  # it prints nothing more
        if line.strip() != READY:
            self.process.kill()
            self.process.wait(5)
            raise RuntimeError(f"the pub/sub tap did not start: {line!r}")
        return self

    def stop(self) -> dict[str, int]:
        if self.process is None:
            return {}
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            return {}
        self.process = None
        seen: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self.out.read_text().splitlines():
                text, _, ns = line.rpartition(" ")
                seen[text] = int(ns)
        return seen

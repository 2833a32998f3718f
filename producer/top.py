"""``tokenrelay top``: a live terminal view of the fleet, refreshed in place (rich)."""

from __future__ import annotations

import time

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from producer.fleet import live_workers, queue_depth, running_jobs
from producer.protocol import Keys


class Top:
    def __init__(self, client: redis.Redis, broker: redis.Redis | None, keys: Keys) -> None:
        self.client, self.broker, self.keys = client, broker, keys
        self._last: tuple[float, int] | None = None

    def render(self) -> Group:
        now = time.time()
        workers = live_workers(self.client, self.keys)
        jobs = running_jobs(self.client, self.keys)
        depth = queue_depth(self.broker, self.keys)
        total = sum(w.tokens for w in workers)
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = max(0, total - self._last[1]) / (now - self._last[0])
        self._last = (now, total)

        head = Text.assemble(
            ("tokenrelay ", "bold"),
            f"prefix {self.keys.prefix}   workers {len(workers)}   running {len(jobs)}   ",
            f"queued {'?' if depth is None else depth}   fleet {rate:,.0f} tokens/s",
        )
        fleet = Table(title="workers", expand=True)
        for column in ("id", "host", "pid", "pool", "conc.", "streams", "tokens", "version"):
            fleet.add_column(column)
        for w in workers:
            fleet.add_row(
                w.id,
                w.host,
                str(w.pid),
                w.pool,
                str(w.concurrency),
                str(w.active),
                f"{w.tokens:,}",
                w.version,
            )
        running = Table(title="running jobs", expand=True)
        for column in ("job", "model", "attempt", "tokens", "tokens/s"):
            running.add_column(column)
        for job in sorted(jobs, key=lambda j: -j.tokens)[:30]:
            running.add_row(
                job.id, job.model[:40], str(job.attempt), f"{job.tokens:,}", f"{job.rate(now):,.1f}"
            )
        return Group(head, fleet, running)


def run(
    client: redis.Redis, broker: redis.Redis | None, keys: Keys, *, interval: float, once: bool
) -> None:
    top = Top(client, broker, keys)
    console = Console()
    if once:
        console.print(top.render())
        return
    with Live(top.render(), console=console, refresh_per_second=4, screen=False) as live:
        while True:
            time.sleep(interval)
            live.update(top.render())

"""What the kernel says about a process: CPU seconds and resident memory, from ``/proc``."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Final

_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PROC: Final = Path("/proc")


def _stat_fields(pid: int) -> list[str]:
    text = (_PROC / str(pid) / "stat").read_text()
    # The command name is in parentheses and may hold spaces: split after its closing one.
    return text.rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` (its own threads, not its children)."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / _TICKS


def parent_of(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def tree(pid: int) -> list[int]:
    """``pid`` and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            parent = parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 if it is gone)."""
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class CpuMeter:
    """CPU seconds used by a set of processes (each with its descendants) between two reads."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.pids = {name: tree(pid) for name, pid in roots.items()}
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}

    def used(self) -> dict[str, float]:
        now = self._read()
        return {name: now[name] - self.start[name] for name in now}


class RssSampler:
    """Samples one process's RSS on a thread until stopped; keeps the peak. Bounded by ``limit``
    seconds, so a sampler left running by a failure ends on its own."""

    def __init__(self, pid: int, interval: float = 0.05, limit: float = 900.0) -> None:
        self.pid = pid
        self.interval = interval
        self.limit = limit
        self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_kib(self.pid))

    def _run(self) -> None:
        waited = 0.0
        while waited < self.limit and not self._stop.wait(self.interval):
            waited += self.interval
            self.peak = max(self.peak, rss_kib(self.pid))

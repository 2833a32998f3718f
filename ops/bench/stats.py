"""Small statistics: percentiles and medians, with ``None`` for "nothing measured"."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass(frozen=True)
class Summary:
    count: int
    p50: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(
            len(values),
            percentile(values, 50),
            percentile(values, 99),
            max(values) if values else None,
        )

    @classmethod
    def median_of(cls, summaries: Sequence[Summary]) -> Summary:
        """Per-field medians of repeated runs."""
        return cls(
            int(median(s.count for s in summaries) or 0),
            median(s.p50 for s in summaries),
            median(s.p99 for s in summaries),
            median(s.max for s in summaries),
        )

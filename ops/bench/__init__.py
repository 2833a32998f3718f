"""``make bench``: tokenrelay's throughput, latency and cost on this machine, against its limits.

``python -m ops.bench`` starts a private redis-server, the mock upstream and a worker on loopback,
measures the limits (Redis's own PUBLISH rate, redis-py's, the raw upstream and SSE parse rates),
runs the scenarios and prints the tables. ``run_bench(BenchConfig.quick())`` is the smoke run the
test suite uses. See ``ops/PERFORMANCE.md`` for a full run's results.
"""

from ops.bench.config import BenchConfig
from ops.bench.run import BenchResults, run_bench

__all__ = ["BenchConfig", "BenchResults", "run_bench"]

"""``python -m ops.bench [--quick] [--scenarios ...]``: run the bench, print its tables.

Exit status: 0 when every job of every scenario delivered every token once and in order, 1 if
any did not, 130 on Ctrl-C. Speed never fails the run: the targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ops.bench.config import BenchConfig
from ops.bench.report import render
from ops.bench.run import run_bench

SCENARIO_KEYS = tuple(scenario.key for scenario in BenchConfig.full().live)
OTHER_KEYS = ("late", "fanout", "limits", "profile")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="the smoke run: a few seconds, checks correctness"
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        metavar="NAME",
        choices=SCENARIO_KEYS + OTHER_KEYS,
        help=f"run only these: {', '.join(SCENARIO_KEYS + OTHER_KEYS)}",
    )
    parser.add_argument(
        "--redis-pool",
        type=int,
        default=0,
        metavar="N",
        help="force the worker's Redis pool to N connections (max_connections in its Redis "
        "URL, which redis-py lets override the code's setting); default: as the worker sets it",
    )
    parser.add_argument(
        "--mock-processes", type=int, metavar="N", help="uvicorn processes of the mock upstream"
    )
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep logs and data in DIR")
    parser.add_argument("--output", type=Path, metavar="FILE", help="also write the tables here")
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through run_bench's cleanup


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = BenchConfig.quick() if args.quick else BenchConfig.full()
    if args.scenarios:
        config = config.only(set(args.scenarios))
    if args.redis_pool or args.mock_processes:
        from dataclasses import replace

        config = replace(
            config,
            redis_pool=args.redis_pool or config.redis_pool,
            mock_processes=args.mock_processes or config.mock_processes,
        )
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminate)
    began = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {message}", file=sys.stderr, flush=True)

    try:
        results = run_bench(config, progress=progress, keep_dir=args.keep)
    except KeyboardInterrupt:
        print("interrupted: everything the bench started is stopped", file=sys.stderr)
        return 130
    text = render(results)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0 if results.clean else 1


if __name__ == "__main__":
    sys.exit(main())

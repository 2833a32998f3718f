"""The bench's output: Markdown tables, so a run can be pasted into ``ops/PERFORMANCE.md``."""

from __future__ import annotations

from collections.abc import Sequence

from ops.bench.fanout import FanoutResult
from ops.bench.limits import HOP_INTERVAL_S
from ops.bench.profile import Profile
from ops.bench.run import BenchResults
from ops.bench.scenarios import LiveResult
from ops.bench.stats import Summary
from worker.flusher import JOBS_PER_CALL

LIVE_COLUMNS = (
    "scenario",
    "mode",
    "runs",
    "jobs",
    "peak streams",
    "tok/s",
    "% ideal",
    "TTFT+ p50 ms",
    "TTFT+ p99 ms",
    "queued p50 ms",
    "tok lat p50 ms",
    "tok lat p99 ms",
    "lost",
    "dup",
    "reord",
    "failed",
    "restarts",
    "worker CPU ms/1k tok",
    "RSS KiB/stream",
)

LIVE_DEFINITIONS = """\
- scenario: streams at once x the upstream's time between tokens (a steady cadence: token i is
  due (i + 1) intervals after its stream began, however late the one before it was written);
  jobs of 200 tokens (20 in the smoke run).
- peak streams: the most jobs streaming at once, as the reader saw them (from a job's first
  token to its last); below N when the worker takes jobs more slowly than they end.
- mode `loop` (full speed): each of the N lanes submits a new job as soon as its last one ends;
  tok/s counts tokens received after a warm-up. Mode `wave` (paced): N jobs submitted at once;
  tok/s counts tokens received while all N were streaming (from the last job's first token to
  the first job's last token). Medians over `runs`.
- % ideal: paced, of N x 1000/interval tok/s; full speed, of what the mock upstream streams to a
  bare client at the same load (the raw upstream limit below; with fewer slots than lanes, as
  many streams at once as the worker has slots).
- TTFT+: from calling `AsyncClient.submit` to the first token in the reader, minus the
  upstream's own interval before it. queued: the part of it from the job's creation to its claim
  by the worker (the state's `created` and `started`, ms resolution): the broker's queue and
  Celery's dispatch. tok lat: the reader's `time.time_ns()` at receipt minus the
  upstream's `time.time_ns()` stamp taken right before it wrote the token (same clock).
- lost / dup / reord: tokens missing (a failed job's missing tokens included), seen twice, or
  arriving after a later one: each job must give indices 0..n-1 once, in order. failed: jobs
  that did not end `done`, or not within the scenario's time limit. restarts: `restart` events
  (an attempt lost its lease and the job started over; its tokens are then counted once more
  from 0, as a reader that follows the protocol drops what it had).
- worker CPU: user+system time of the worker process per 1,000 tokens delivered. RSS/stream:
  (peak RSS during the scenario - RSS after a warm-up job) / peak streams."""


def _n(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def _pct(part: float | None, whole: float | None) -> str:
    if part is None or not whole:
        return "-"
    return f"{100 * part / whole:.0f}%"


def _fraction(part: float | None, whole: float | None) -> str:
    if part is None or not whole:
        return "-"
    return f"{part / whole:.3f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded; text left-aligned, numbers right-aligned."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def numeric(column: int) -> bool:
        cells = [r[column] for r in rows if r[column] not in ("-", "")]
        return bool(cells) and all(c[0].isdigit() or c[0] in "-+<" for c in cells)

    right = [numeric(i) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if r else ("-" * (w + 2))
            for w, r in zip(widths, right, strict=True)
        )
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _key(result: LiveResult) -> str:
    """The raw upstream limit's key: the same load, with or without the log."""
    slots = f"-{result.load.slots}slots" if result.load.slots else ""
    return f"{result.load.concurrency}x{result.load.delay_ms:g}{slots}"


def _ideal(results: BenchResults, result: LiveResult) -> float | None:
    if result.load.ideal is not None:
        return result.load.ideal
    raw = results.limits.raw_upstream.get(_key(result))
    return raw.rate if raw is not None else None


def live_rows(results: BenchResults) -> list[list[str]]:
    rows = []
    for r in results.live:
        c = r.counts
        rows.append(
            [
                r.load.label,
                "loop" if r.load.closed else "wave",
                str(r.runs),
                str(c.jobs),
                str(r.peak_streams),
                _n(r.rate),
                _pct(r.rate, _ideal(results, r)),
                _ms(r.ttft.p50),
                _ms(r.ttft.p99),
                _ms(r.queued.p50),
                _ms(r.latency.p50),
                _ms(r.latency.p99),
                str(c.lost),
                str(c.duplicated),
                str(c.reordered),
                str(c.failed),
                str(c.restarts),
                _n(r.cpu_ms_per_1k.get("worker"), 0),
                _n(r.rss_per_stream_kib, 0),
            ]
        )
    return rows


def _section_machine(results: BenchResults) -> str:
    cfg = results.config
    facts = table(["machine", ""], [[k, v] for k, v in results.machine.items()])
    pool = (
        f"max_connections={cfg.redis_pool} forced in its Redis URL"
        if cfg.redis_pool
        else "as the worker configures it"
    )
    setup = (
        f"Setup: one worker process (`celery -A worker worker -P gevent -c "
        f"{cfg.worker_concurrency}`, dialect `together`, Redis pool {pool}); the mock upstream "
        f"as {cfg.mock_processes} uvicorn process(es); a private redis-server; the reader is "
        "the producer library (one `AsyncClient`, one pub/sub connection) in the bench "
        "process. All on this machine, on loopback."
    )
    return f"## Machine\n\n{facts}\n\n{setup}"


def _section_limits(results: BenchResults) -> str:
    lim = results.limits
    rows = [[f"redis-benchmark {k}", f"{_n(v)} msg/s"] for k, v in lim.redis_benchmark.items()]
    if lim.redis_py_publish is not None:
        rows.append(
            [
                "redis-py PUBLISH, 1 connection, 100 per pipeline",
                f"{_n(lim.redis_py_publish)} msg/s",
            ]
        )
    for (counter, chunking), rate in lim.parse.items():
        rows.append([f"in memory: {counter}, {chunking}", f"{_n(rate)} /s"])
    out = ["## Limits", "", table(["limit", "rate"], rows) if rows else "(not measured)"]
    if lim.raw_upstream:
        raw_rows = [
            [
                raw.load.label,
                _n(raw.rate),
                _pct(raw.rate, raw.load.ideal),
                _n(raw.stream_rate, 1),
                _ms(raw.ttft.p50),
                _ms(raw.ttft.p99),
                _ms(raw.latency.p50),
                _ms(raw.latency.p99),
                str(raw.problems),
            ]
            for raw in lim.raw_upstream.values()
        ]
        out += [
            "",
            "Raw upstream: a bare asyncio client (no worker, no Redis) reading the mock's SSE "
            "directly, under each scenario's load and measured the same way.",
            "",
            table(
                [
                    "load",
                    "tok/s",
                    "% ideal",
                    "tok/s per stream",
                    "TTFT+ p50 ms",
                    "TTFT+ p99 ms",
                    "lat p50 ms",
                    "lat p99 ms",
                    "problems",
                ],
                raw_rows,
            ),
        ]
    floors = _floor_rows(results)
    if floors:
        out += [
            "",
            "Latency floors: the process-to-process legs of a token's path, timed with no "
            f"tokenrelay code on either side, at one message per {HOP_INTERVAL_S * 1000:g} ms. "
            "A token crosses both "
            "(the upstream to the worker, then the worker through Redis to the reader), so "
            "their sum is what any relay through Redis pays on this machine at an idle pace.",
            "",
            table(["leg", "p50 ms", "p99 ms"], floors),
        ]
    return "\n".join(out)


def _floor_rows(results: BenchResults) -> list[list[str]]:
    """The two legs, their sum, and tokenrelay's per-token latency at the same (lightest paced)
    load."""
    lim = results.limits
    paced = [raw for raw in lim.raw_upstream.values() if raw.load.delay_ms > 0]
    raw = min(paced, key=lambda r: r.load.concurrency, default=None)
    legs: list[tuple[str, Summary]] = []
    if raw is not None:
        legs.append((f"the mock upstream -> a bare client ({raw.load.label})", raw.latency))
    if lim.pubsub_hop is not None:
        legs.append(("redis-py PUBLISH -> Redis -> a subscriber process", lim.pubsub_hop))
    rows = [[name, _ms(leg.p50), _ms(leg.p99)] for name, leg in legs]
    p50s = [leg.p50 for _, leg in legs if leg.p50 is not None]
    if raw is not None and len(p50s) == 2:
        rows.append(["both legs (sum of the p50s)", _ms(sum(p50s)), "-"])
        live = results.live_result(raw.load.key)
        if live is not None:
            rows.append(
                [
                    f"tokenrelay's tok lat at {raw.load.label} (live scenarios)",
                    _ms(live.latency.p50),
                    _ms(live.latency.p99),
                ]
            )
    return rows


def _section_live(results: BenchResults) -> str:
    if not results.live:
        return "## Live scenarios\n\n(none run)"
    return "\n".join(
        [
            "## Live scenarios (reader: the producer library)",
            "",
            table(LIVE_COLUMNS, live_rows(results)),
            "",
            LIVE_DEFINITIONS,
        ]
    )


def _section_resources(results: BenchResults) -> str:
    names = ("worker", "redis", "mock", "reader")
    rows = []
    for r in results.live:
        problems = ", ".join(f"{k} {v}" for k, v in sorted(r.worker_problems.items())) or "-"
        rows.append(
            [
                r.load.label,
                *(f"{r.cpu.get(n, 0.0):.2f}" for n in names),
                *(_n(r.cpu_ms_per_1k.get(n)) for n in names),
                f"{r.rss_idle_kib / 1024:.1f}",
                f"{r.rss_peak_kib / 1024:.1f}",
                problems,
            ]
        )
    headers = [
        "scenario",
        *(f"{n} cores" for n in names),
        *(f"{n} ms/1k tok" for n in names),
        "worker RSS idle MiB",
        "peak MiB",
        "worker log",
    ]
    text = (
        "Cores: CPU seconds per second while tokens flowed (1.00 = one core busy); ms/1k tok: "
        "CPU per 1,000 tokens delivered; worker log: errors and warnings the worker logged "
        "during the scenario. The machine has "
        f"{results.machine.get('cores', '?')} cores for all four processes."
    )
    return "\n".join(["## Where the CPU goes", "", text, "", table(headers, rows)])


def _section_fractions(results: BenchResults) -> str:
    lim = results.limits
    lua = lim.log_cost("lua-xadd-publish", 1)
    rows = []
    for r in results.live:
        raw = lim.raw_upstream.get(_key(r))
        rows.append(
            [
                r.load.label,
                _n(r.rate),
                _fraction(r.rate, raw.rate if raw else None),
                _fraction(r.rate, lim.redis_publish),
                _fraction(r.rate, lim.redis_py_publish),
                _fraction(r.rate, lua.server_capacity if lua else None),
                _fraction(r.rate, lim.parse_rate("1 event/read")),
            ]
        )
    headers = [
        "scenario",
        "tok/s",
        "/ raw upstream",
        "/ redis-benchmark PUBLISH",
        "/ redis-py PUBLISH",
        "/ Redis capacity, XADD+PUBLISH script, batch 1",
        "/ parse_stream, 1 event/read",
    ]
    return "\n".join(["## Results as a fraction of the limits", "", table(headers, rows)])


def _section_late(results: BenchResults) -> str:
    rows = [
        [
            str(r.readers),
            str(r.jobs),
            _n(r.rate),
            _n(r.reader_ms_per_1k),
            str(r.counts.lost),
            str(r.counts.duplicated),
            str(r.counts.reordered),
            str(r.counts.failed),
        ]
        for r in results.late
    ]
    headers = [
        "readers at once",
        "jobs",
        "tok/s read",
        "reader ms/1k tok",
        "lost",
        "dup",
        "reord",
        "failed",
    ]
    text = "Readers that join after their job ended read its whole log (XRANGE, 1,000 per call)."
    return "\n".join(["## Late readers", "", text, "", table(headers, rows)])


def _fanout_row(f: FanoutResult) -> list[str]:
    s = f.spec
    growth = (f.gateway_rss_kib - f.gateway_rss_idle_kib) / max(f.connected, 1)
    return [
        str(s.readers),
        str(f.connected),
        str(s.jobs),
        f"{s.delay_ms:g}",
        "spread" if s.spread else "together",
        _n(f.rate),
        _pct(f.rate, s.ideal),
        _ms(f.latency.p50),
        _ms(f.latency.p99),
        _ms(f.latency.max),
        _ms(f.to_redis.p99),
        _ms(f.gateway_latency.p50),
        _ms(f.gateway_latency.p99),
        str(f.redis_connections_max),
        f"{f.gateway_cpu:.2f}",
        _n(f.cpu_ms_per_1k.get("gateway")),
        _n(growth, 1),
        str(f.problems),
    ]


def _section_fanout(results: BenchResults) -> str:
    headers = [
        "readers",
        "connected",
        "jobs",
        "ms between tokens",
        "job starts",
        "frames/s",
        "% ideal",
        "lat p50 ms",
        "lat p99 ms",
        "lat max ms",
        "to Redis p99 ms",
        "gateway lat p50 ms",
        "gateway lat p99 ms",
        "gateway Redis conns (max)",
        "gateway cores",
        "gateway µs/frame",
        "gateway KiB/reader",
        "problems",
    ]
    text = (
        "One gateway process; SSE readers of `GET /v1/jobs/{id}/events` (a minimal asyncio "
        "HTTP/1.1 client in the bench process), connected before the jobs start, so every "
        "token is live. lat: upstream stamp to the reader's socket read, i.e. worker, Redis "
        "and gateway together. to Redis: upstream stamp to the moment a separate pub/sub "
        "subscriber (a process of its own) got the token: the worker and Redis. gateway lat: "
        "from that moment to each reader's socket read, per frame: the gateway's own share "
        "(if the subscriber is late, this share looks smaller). Redis connections: "
        "`CLIENT LIST` entries named `tokenrelay-gateway`, sampled every 250 ms. Job starts: "
        "`together`, all jobs submitted at once, so their tokens reach the gateway in the same "
        "millisecond (the worst case: one burst of as many frames as readers); `spread`, "
        "submitted evenly over one token interval, as independent jobs are."
    )
    rows = [_fanout_row(f) for f in results.fanout]
    return "\n".join(["## Gateway fan-out", "", text, "", table(headers, rows)])


def _triple(values: Sequence[float | None], digits: int) -> str:
    return " / ".join("-" if v is None else f"{v:,.{digits}f}" for v in values)


def _section_log_cost(results: BenchResults) -> str:
    lim = results.limits
    rows = []
    for batch, depth in sorted({(c.batch, c.depth) for c in lim.log_costs}):
        costs = [
            lim.log_cost(m, batch, depth) for m in ("publish", "lua-publish", "lua-xadd-publish")
        ]
        pub, lua, log = costs
        if pub is None or log is None:
            continue
        rows.append(
            [
                log.label,
                _triple([c.client_rate if c else None for c in costs], 0),
                _triple([c.server_us_per_token if c else None for c in costs], 2),
                _triple([c.command_us_per_token if c else None for c in costs], 2),
                _fraction(log.server_capacity, pub.server_capacity),
                "-"
                if lua is None
                else f"{log.command_us_per_token - lua.command_us_per_token:.2f}",
                _fraction(log.client_rate, pub.client_rate),
            ]
        )
    headers = [
        "tokens per call (per job)",
        "client tok/s: PUBLISH / Lua PUBLISH / Lua XADD+PUBLISH",
        "Redis CPU µs/tok (same order)",
        "Redis command µs/tok (same order)",
        "capacity ratio (CPU)",
        "XADD's own µs/tok",
        "client ratio",
    ]
    text = (
        "The worker's real publish scripts (`producer/scripts.py`: XADD to the log and PUBLISH "
        "per event, plus the state hash) against PUBLISH alone (pipelined, the same number per "
        "round trip), same payloads (token events of ~90 bytes), one redis-py connection, one "
        "subscriber on every channel; the methods take turns in 4 rounds. Client tok/s: what "
        "that connection achieves. Redis CPU: redis-server's user+system time (INFO used_cpu, "
        "I/O included) per token; capacity ratio: tokens/s one Redis core takes with the log "
        "divided by without it. Command µs: Redis's time inside the commands (INFO "
        "commandstats), I/O excluded. Lua PUBLISH: the same script without its XADD line, to "
        "separate Lua's cost from the log's; XADD's own cost is the difference of their "
        'command times. "1 per job, N jobs per round trip" is how the worker\'s flusher sends: '
        f"each job's new token, N jobs in one round trip, in PUBLISH_MANY calls of "
        f"{JOBS_PER_CALL} jobs (N PUBLISHes per round trip for PUBLISH alone)."
    )
    return "\n".join(
        ["## The log's cost: XADD + PUBLISH vs PUBLISH alone", "", text, "", table(headers, rows)]
    )


def _section_profile(profile: Profile) -> str:
    scale = (
        profile.us_per_token / profile.profiled_us_per_token if profile.profiled_us_per_token else 0
    )
    rows = [
        [
            h.function,
            f"{h.calls_per_token:.2f}",
            f"{h.self_us:.1f}",
            f"{h.total_us:.1f}",
            f"{100 * h.self_us / profile.profiled_us_per_token:.1f}%",
            f"{h.self_us * scale:.1f}",
        ]
        for h in profile.hotspots
    ]
    own = [
        [
            h.function,
            f"{h.calls_per_token:.2f}",
            f"{h.total_us:.1f}",
            f"{100 * h.total_us / profile.profiled_us_per_token:.1f}%",
            f"{h.total_us * scale:.1f}",
        ]
        for h in profile.own_code
    ]
    areas = [
        [area, f"{us:.1f}", f"{100 * us / profile.profiled_us_per_token:.1f}%", f"{us * scale:.1f}"]
        for area, us in profile.areas
        if us >= 0.05
    ]
    head = (
        f"### {profile.name}\n\n{profile.tokens:,} tokens; CPU per token "
        f"{profile.us_per_token:.1f} µs without the profiler, {profile.profiled_us_per_token:.1f} "
        "µs under it. est. µs = share x the unprofiled figure (the profiler inflates functions "
        "with many small calls most)."
    )
    if profile.us_without_publish is not None:
        head += (
            f" With the Redis publish call replaced by a no-op: {profile.us_without_publish:.1f} "
            f"µs per token, so the publish round trip costs "
            f"{profile.us_per_token - profile.us_without_publish:.1f} µs of CPU per token."
        )
    return "\n".join(
        [
            head,
            "",
            table(
                [
                    "function (self time)",
                    "calls/tok",
                    "self µs/tok",
                    "total µs/tok",
                    "share",
                    "est. µs",
                ],
                rows,
            ),
            "",
            table(
                ["tokenrelay function (with callees)", "calls/tok", "µs/tok", "share", "est. µs"],
                own,
            ),
            "",
            table(["library (self time)", "µs/tok", "share", "est. µs"], areas),
        ]
    )


def _steady(latency: Summary | None, streams: int) -> str:
    if latency is None or latency.p50 is None:
        return ""
    return f"; while all {streams} streamed: p50 {_ms(latency.p50)}, p99 {_ms(latency.p99)} ms"


def targets(results: BenchResults) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target of the issue; met is None if not measured."""
    out: list[tuple[str, str, bool | None]] = []
    paced = results.live_result("500x20")
    if paced is not None:
        out.append(
            (
                "500 streams x 20 ms: >= 22,500 tok/s (90% of ideal)",
                f"{_n(paced.rate)} tok/s ({_pct(paced.rate, paced.load.ideal)}); at most "
                f"{paced.peak_streams} of the 500 streaming at once",
                paced.rate is not None and paced.rate >= 22_500,
            )
        )
        out.append(
            (
                "500 streams x 20 ms: p99 added latency per token < 10 ms",
                f"{_ms(paced.latency.p99)} ms (p50 {_ms(paced.latency.p50)})"
                + _steady(paced.steady_latency, paced.load.concurrency),
                paced.latency.p99 is not None and paced.latency.p99 < 10,
            )
        )
    for key in ("100x20", "100x0"):
        hundred = results.live_result(key)
        if hundred is not None:
            out.append(
                (
                    f"100 jobs at once ({hundred.load.label}): p50 added TTFT < 10 ms",
                    f"{_ms(hundred.ttft.p50)} ms",
                    hundred.ttft.p50 is not None and hundred.ttft.p50 < 10,
                )
            )
    full = results.live_result("100x0")
    if full is not None:
        out.append(
            (
                "100 jobs at once, upstream at full speed: >= 30,000 tok/s end to end",
                f"{_n(full.rate)} tok/s",
                full.rate is not None and full.rate >= 30_000,
            )
        )
    without = results.live_result("100x0-nolog")
    if full is not None and without is not None and full.rate and without.rate:
        ratio = full.rate / without.rate
        out.append(
            (
                "the log costs <= 1/3 of end-to-end throughput (100 x 0 ms, with vs without it)",
                f"{_n(full.rate)} tok/s with the log, {_n(without.rate)} without: {ratio:.2f}",
                ratio >= 2 / 3,
            )
        )
    # Paced waves only: their jobs live long enough for the streams to be held at once (at full
    # speed a lane's job ends in milliseconds and few are streaming at any moment).
    waves = [
        r
        for r in results.live
        if not r.load.closed and r.load.concurrency >= 100 and r.load.workers == 1
    ]
    biggest = max(waves, key=lambda r: (r.load.concurrency, r.peak_streams), default=None)
    if biggest is not None:
        per = biggest.rss_per_stream_kib
        out.append(
            (
                "worker RSS < 100 KiB per concurrent stream",
                f"{per:.0f} KiB per stream with {biggest.peak_streams} streaming at once "
                f"({biggest.load.label})",
                per < 100,
            )
        )
    big_fanout = [f for f in results.fanout if f.spec.readers >= 1000]
    if big_fanout:
        conns = max(f.redis_connections_max for f in big_fanout)
        out.append(
            (
                "gateway, 1,000 SSE readers: bounded Redis connections (8 pooled + 1 pub/sub)",
                f"at most {conns}",
                conns <= 9 and all(f.connected == f.spec.readers for f in big_fanout),
            )
        )
        for f in big_fanout:
            out.append(
                (
                    f"gateway, {f.spec.label}: p99 latency the gateway adds < 5 ms",
                    f"{_ms(f.gateway_latency.p99)} ms from Redis to the reader; "
                    f"{_ms(f.latency.p99)} ms from the upstream (worker + Redis + gateway)",
                    f.gateway_latency.p99 is not None and f.gateway_latency.p99 < 5,
                )
            )
    for batch, depth in sorted({(c.batch, c.depth) for c in results.limits.log_costs}):
        pub = results.limits.log_cost("publish", batch, depth)
        log = results.limits.log_cost("lua-xadd-publish", batch, depth)
        if pub is not None and log is not None:
            ratio = log.server_capacity / pub.server_capacity
            out.append(
                (
                    f"the log costs <= 1/3 of throughput vs PUBLISH alone (batch {log.label})",
                    f"Redis capacity with the log {ratio:.2f} of PUBLISH alone (one client's "
                    f"rate {log.client_rate / pub.client_rate:.2f})",
                    ratio >= 2 / 3,
                )
            )
    out.append(
        (
            "nothing lost, duplicated or reordered, every job ends done",
            "yes" if results.clean else "no: see the lost/dup/reord/failed columns",
            results.clean,
        )
    )
    out.append(
        (
            "the whole bench finishes in under 10 minutes",
            f"{results.elapsed_s:.0f} s",
            results.elapsed_s < 600,
        )
    )
    return out


def _section_targets(results: BenchResults) -> str:
    rows = [
        [target, measured, "-" if met is None else ("MET" if met else "NOT MET")]
        for target, measured, met in targets(results)
    ]
    return "\n".join(["## Targets", "", table(["target", "measured", "verdict"], rows)])


def render(results: BenchResults) -> str:
    sections = [
        "# tokenrelay bench",
        _section_machine(results),
        _section_limits(results),
        _section_live(results),
        _section_resources(results),
        _section_fractions(results),
    ]
    if results.late:
        sections.append(_section_late(results))
    if results.fanout:
        sections.append(_section_fanout(results))
    if results.limits.log_costs:
        sections.append(_section_log_cost(results))
    if results.profiles:
        sections.append("## Profiles")
        sections += [_section_profile(p) for p in results.profiles]
    sections.append(_section_targets(results))
    if results.skipped:
        sections.append("Skipped: " + "; ".join(results.skipped))
    if results.errors:
        sections.append(
            "Failed parts of the bench:\n\n" + "\n".join(f"- {e}" for e in results.errors)
        )
    sections.append(f"Bench wall time: {results.elapsed_s:.0f} s.")
    return "\n\n".join(sections) + "\n"


def summary_of(summary: Summary) -> str:
    return f"p50 {_ms(summary.p50)} / p99 {_ms(summary.p99)} ms"

"""The ``tokenrelay`` command line.

    tokenrelay demo [PROMPT]
    tokenrelay submit PROMPT [--model M] [--max-tokens N] [--follow] [--json]
    tokenrelay follow JOB_ID [--json]
    tokenrelay status JOB_ID
    tokenrelay cancel JOB_ID
    tokenrelay gateway [--host H] [--port P]
    tokenrelay mock-upstream [--host H] [--port P]

Exit status: 0 when the command (and a followed job) succeeded, 1 when a followed job ended in
error or was cancelled, 2 for bad input, 3 for an unknown job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from producer.protocol import EventType, ProtocolError
from producer.reading import JobNotFound
from producer.settings import Settings, SettingsError
from producer.spec import InvalidJob

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 1, 2, 3
DEMO_PROMPT = "Alan Turing was"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # A token may hold a lone surrogate (an upstream's broken UTF-16): print its escape.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        return int(args.run(args))
    except (InvalidJob, ProtocolError, SettingsError) as exc:
        print(f"tokenrelay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JobNotFound as exc:
        print(f"tokenrelay: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenrelay", description="LLM token streaming as a background job."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the whole pipeline locally and stream a prompt")
    demo.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.set_defaults(run=_demo)

    submit = commands.add_parser("submit", help="enqueue a prompt job and print its id")
    submit.add_argument("prompt")
    submit.add_argument("--model")
    submit.add_argument("--max-tokens", type=int)
    submit.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    submit.add_argument("--temperature", type=float)
    submit.add_argument("--top-p", type=float)
    submit.add_argument("--top-k", type=int)
    submit.add_argument("--repetition-penalty", type=float)
    submit.add_argument("--dialect")
    submit.add_argument("--job-id", help="choose the id; submitting it again is a no-op")
    submit.add_argument("--on-interrupt", choices=["error", "continue"])
    submit.add_argument("--follow", action="store_true", help="print the tokens as they arrive")
    submit.add_argument("--json", action="store_true", help="print one JSON event per line")
    submit.set_defaults(run=_submit)

    follow = commands.add_parser("follow", help="print a job's tokens, live or after the fact")
    follow.add_argument("job_id")
    follow.add_argument("--json", action="store_true", help="print one JSON event per line")
    follow.add_argument("--timeout", type=float, default=None)
    follow.set_defaults(run=_follow)

    status = commands.add_parser("status", help="print a job's state as JSON")
    status.add_argument("job_id")
    status.set_defaults(run=_status)

    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(run=_cancel)

    gateway = commands.add_parser("gateway", help="serve the HTTP gateway")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8000)
    gateway.set_defaults(run=_gateway)

    health = commands.add_parser(
        "health", help="exit 0 if this host's worker is alive (--all: any worker; --url: a URL)"
    )
    health.add_argument("--all", action="store_true", help="check the whole fleet")
    health.add_argument("--url", help="check that this URL answers 200 (the gateway's /healthz)")
    health.set_defaults(run=_health)

    workers = commands.add_parser("workers", help="list the live workers")
    workers.add_argument("--json", action="store_true")
    workers.set_defaults(run=_workers)

    top = commands.add_parser("top", help="live view of workers, running jobs and throughput")
    top.add_argument("--interval", type=float, default=1.0)
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(run=_top)

    mock = commands.add_parser("mock-upstream", help="serve the mock LLM API")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8001)
    mock.add_argument("--delay-ms", type=float, default=0.0, help="delay between tokens")
    mock.set_defaults(run=_mock_upstream)
    return parser


def _client() -> Any:
    from producer.client import Client

    return Client()


def _submit(args: argparse.Namespace) -> int:
    client = _client()
    job = client.submit(
        args.prompt,
        model=args.model,
        max_tokens=args.max_tokens,
        stop=args.stop,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        dialect=args.dialect,
        job_id=args.job_id,
        on_interrupt=args.on_interrupt,
        follow=args.follow,
    )
    if not args.follow:
        print(json.dumps({"job": job.id}) if args.json else job.id)
        return 0
    return _print_events(job, args.json, None, sys.stdout)


def _follow(args: argparse.Namespace) -> int:
    job = _client().subscribe(args.job_id)
    return _print_events(job, args.json, args.timeout, sys.stdout)


def _print_events(job: Any, as_json: bool, timeout: float | None, out: TextIO) -> int:
    """Print each token the moment it arrives (or each event as a JSON line)."""
    final = None
    for event in job.events(timeout=timeout):
        if as_json:
            out.write(json.dumps(event.as_dict(), ensure_ascii=False) + "\n")
        elif event.type is EventType.TOKEN:
            out.write(event.text)
        elif event.type is EventType.RESTART:
            print(
                f"\n[worker lost: restarting, attempt {event.fields['attempt']}]", file=sys.stderr
            )
        out.flush()
        final = event
    if not as_json:
        out.write("\n")
    if final is None or final.type is EventType.DONE:
        return 0
    if not as_json:
        code = final.fields.get("code", str(final.type))
        print(
            f"tokenrelay: job {job.id} {final.type}: [{code}] {final.fields.get('message', '')}",
            file=sys.stderr,
        )
    return EXIT_FAILED


def _status(args: argparse.Namespace) -> int:
    print(json.dumps(_client().status(args.job_id).as_dict(), indent=2))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    state = _client().cancel(args.job_id)
    print(json.dumps(state.as_dict(), indent=2))
    return 0


def _redis_and_keys() -> tuple[Any, Any, Settings]:
    from producer.connection import sync_redis
    from producer.protocol import Keys

    settings = Settings.from_env()
    return sync_redis(settings.redis_url), Keys(settings.prefix), settings


def _health(args: argparse.Namespace) -> int:
    from producer import fleet

    if args.url:
        ok, detail = fleet.check_url(args.url)
    else:
        client, keys, _ = _redis_and_keys()
        check = fleet.check_fleet if args.all else fleet.check_local
        ok, detail = check(client, keys)
    print(("ok: " if ok else "unhealthy: ") + detail)
    return 0 if ok else EXIT_FAILED


def _workers(args: argparse.Namespace) -> int:
    from producer import fleet

    client, keys, _ = _redis_and_keys()
    rows = fleet.describe(fleet.live_workers(client, keys))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':40} {'pool':8} {'conc':>5} {'streams':>7} {'tokens':>10} {'uptime':>8}")
    for row in rows:
        print(
            f"{row['id']:40} {row['pool']:8} {row['concurrency']:>5} {row['active']:>7} "
            f"{row['tokens']:>10} {row['uptime_s']:>7.0f}s"
        )
    if not rows:
        print("(no live workers)")
    return 0


def _top(args: argparse.Namespace) -> int:
    from producer import top
    from producer.connection import sync_redis

    client, keys, settings = _redis_and_keys()
    broker = sync_redis(settings.broker_url) if settings.broker_url.startswith("redis") else None
    top.run(client, broker, keys, interval=args.interval, once=args.once)
    return 0


def _gateway(args: argparse.Namespace) -> int:
    from producer.gateway import serve

    serve(host=args.host, port=args.port)
    return 0


def _mock_upstream(args: argparse.Namespace) -> int:
    from producer.mock_upstream import serve

    serve(
        host=args.host,
        port=args.port,
        delay_ms=args.delay_ms,
        api_key=os.environ.get("MOCK_UPSTREAM_API_KEY") or None,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Start what is missing (Redis, mock upstream, a worker), stream one prompt, stop it all."""
    from producer import devservers
    from producer.client import Client

    settings = Settings.from_env()
    workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-demo-"))
    started: list[Any] = []
    env: dict[str, str] = {}
    try:
        if devservers.redis_answers(settings.redis_url):
            _say(f"using the Redis at {settings.redis_url}")
        else:
            server = devservers.RedisServer(directory=workdir).start()
            started.append(server)
            env["TOKENRELAY_REDIS_URL"] = env["TOKENRELAY_BROKER_URL"] = server.url
            _say(f"started a private redis-server on {server.url}")
        model = None
        if settings.upstream_api_key:
            _say(f"streaming from {settings.upstream_url} ({settings.upstream_dialect})")
        else:
            process, url = devservers.mock_upstream(delay_ms=40, log_path=workdir / "mock.log")
            started.append(process)
            env.update(TOKENRELAY_UPSTREAM_URL=url, TOKENRELAY_UPSTREAM_DIALECT="together")
            model = "mock"
            _say(f"no API key set: started the mock upstream on {url}")
        os.environ.update(env)
        started.append(
            devservers.start_worker(os.environ, concurrency=20, log_path=workdir / "worker.log")
        )
        _say("started a worker (celery -A worker worker -P gevent)")
        with Client() as client:
            job = client.submit(args.prompt, model=model, max_tokens=args.max_tokens, follow=True)
            _say(f"job {job.id}: {args.prompt!r}\n")
            sys.stdout.write(args.prompt)
            return _print_events(job, False, 120.0, sys.stdout)
    finally:
        for thing in reversed(started):
            thing.stop()
        _say("stopped what the demo started")


def _say(message: str) -> None:
    print(f"tokenrelay demo: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

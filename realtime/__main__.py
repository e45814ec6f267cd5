"""CLI: ``python -m realtime [serve]`` runs the server; ``token`` mints a dev JWT;
``demo`` runs the server in dev mode with simulated technicians, customers and agents."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

from pydantic import ValidationError

from realtime.auth import ROLES, mint_token
from realtime.settings import ConfigError, Settings

if TYPE_CHECKING:
    from aiohttp import web

# Once the sessions are told goodbye, how long requests still in flight may
# take before the stores close (a service manager's stop timeout must cover
# this plus REALTIME_DRAIN_S: deploy/realtime@.service).
SHUTDOWN_TIMEOUT_S = 10.0


def _settings() -> Settings:
    """The settings, with the HS* secret in place; a refusal is one clear line and exit 2."""
    try:
        settings = Settings()
        settings.ensure_secret()
    except ValidationError as exc:
        for e in exc.errors():
            print(f"configuration error: {e['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def serve(args: argparse.Namespace) -> None:
    import uvloop
    from aiohttp import web

    from realtime.api import CTX
    from realtime.app import create_app
    from realtime.gcpolicy import run_policy, run_young, start_policy

    settings = _settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiohttp logs every request at INFO; keep access logs out unless asked.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    app = create_app(settings)

    async def collect_garbage(app: web.Application) -> AsyncIterator[None]:
        # Full collections would pause for 100+ ms with thousands of sockets
        # (realtime/gcpolicy.py); this process runs them on a schedule.
        start_policy()
        # Pauses are timed from here: the deliberate full collection at start
        # (before any client) is not one a client can meet.
        app[CTX].metrics.watch_gc()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(run_policy(settings.gc_freeze_s, settings.gc_full_s))]
        if settings.gc_young_ms:
            tasks.append(loop.create_task(run_young(settings.gc_young_ms / 1000)))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(collect_garbage)
    drain_on_sigterm(app, settings.drain_s)
    logging.getLogger("realtime").info(
        "listening on http://%s:%d (Socket.IO at /socket.io/)", settings.host, settings.port
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )


def drain_on_sigterm(app: web.Application, drain_s: float) -> None:
    """SIGTERM (systemd, a container runtime, an orchestrator) first drains the
    node: for `drain_s` seconds /readyz answers 503 `draining` and everything
    else is served as before, so that the load balancer marks the node down and
    sends new clients elsewhere while nobody is cut off; then the node stops as
    on SIGINT. A second SIGTERM while draining stops it at once; one after that,
    while it stops, is ignored (the stop is bounded: run_app's shutdown_timeout).

    run_app turns SIGINT and SIGTERM into GracefulExit (stop listening, tell
    every client goodbye, close the stores) with handlers it installs before
    the app starts; these, installed as the app starts, replace them. Until
    then (stores opening) SIGTERM stops at once: no client has come yet. A
    developer's Ctrl-C (SIGINT) never waits, and a second one interrupts a
    stop that hangs, as before."""
    from aiohttp import web

    from realtime.api import DRAIN

    drain = app[DRAIN]
    log = logging.getLogger("realtime")

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        timer: asyncio.TimerHandle | None = None

        def stop() -> NoReturn:
            nonlocal stopping
            stopping = True
            if timer is not None:
                timer.cancel()
            raise web.GracefulExit()  # as run_app's own handlers do

        def on_sigint() -> NoReturn:
            stop()

        def on_sigterm() -> None:
            nonlocal timer
            if stopping:
                log.info("SIGTERM: already stopping")
                return
            if drain.draining:
                log.info("SIGTERM again: the drain ends now")
                stop()
            if drain_s <= 0:
                stop()
            drain.begin()
            log.info("SIGTERM: draining for %g s (/readyz answers 503), then closing the "
                     "sessions", drain_s)
            timer = loop.call_later(drain_s, end_of_drain)

        def end_of_drain() -> None:
            if not stopping:
                log.info("drain over: closing sessions")
                stop()

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)

    app.on_startup.append(install)


def demo(args: argparse.Namespace) -> None:
    import uvloop

    from realtime.demo import run

    os.environ["REALTIME_DEV"] = "1"  # the demo signs people in through the dev form
    settings = _settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(settings))


def token(args: argparse.Namespace) -> None:
    settings = _settings()
    skills = [s.strip() for s in args.skills.split(",") if s.strip()] if args.skills else None
    try:
        minted = mint_token(settings, sub=args.sub, role=args.role, name=args.name,
                            skills=skills, ttl_s=args.ttl)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(minted)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m realtime")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the server (default)")
    sub.add_parser("demo", help="run the server in dev mode with a simulated city (pages demo)")
    t = sub.add_parser("token", help="print a JWT signed with the configured secret")
    t.add_argument("--role", required=True, choices=sorted(ROLES))
    t.add_argument("--sub", required=True, help="user id")
    t.add_argument("--name")
    t.add_argument("--skills", help="comma-separated")
    t.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    args = parser.parse_args(argv)
    if args.command == "token":
        token(args)
    elif args.command == "demo":
        demo(args)
    else:
        serve(args)


if __name__ == "__main__":
    main()

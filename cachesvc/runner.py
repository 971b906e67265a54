"""Running aiohttp apps until a signal, with a graceful stop.

On SIGINT or SIGTERM: stop accepting connections, let in-flight requests run
for up to ``grace`` seconds, then cancel what is left and run every app's
cleanup (fills cancelled, temp files removed, store order flushed). Several apps
share one loop: that is how ``cachesvc up`` runs a whole stack in one process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


async def start_app(app: web.Application, host: str, port: int, grace: float) -> web.AppRunner:
    # aiohttp reads a timeout of 0 as "wait forever": a grace of 0 means "don't wait".
    runner = web.AppRunner(app, shutdown_timeout=max(grace, 0.001), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner


async def run_until_signal(
    apps: list[tuple[web.Application, tuple[str, int]]],
    grace: float,
    banner: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    try:
        for app, (host, port) in apps:
            try:
                runners.append(await start_app(app, host, port, grace))
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
                return 1
            log.info("listening on %s:%d", host, port)
        if banner is not None:
            await banner()
        await stop.wait()
        log.info("signal received: draining for up to %.0fs", grace)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
    log.info("stopped cleanly")
    return 0

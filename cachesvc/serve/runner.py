"""Running aiohttp apps until a signal: several apps share one loop (that is how
``cachesvc up`` runs a stack in one process); an app that offers the hit fast
path is bound through it (:class:`FastSite`). Builds no app.

* On SIGINT or SIGTERM: stop accepting, let in-flight requests run up to
  ``grace`` s (0: no wait), then cancel the rest and run every app's cleanup.
* A failed start is one line: a directory or lock problem is a
  ``ConfigError`` naming the path; a bind failure exits 1 naming the address.
  Whatever had started is cleaned up first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from cachesvc.errors import ConfigError
from cachesvc.serve.fastpath import HIT_PATH, HitFactory, HitServer

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

Banner = Callable[[], Awaitable[None]]


class ListenError(Exception):
    """A service could not bind its address (in use, not ours, unknown host)."""


async def start_app(app: web.Application, host: str, port: int, grace: float) -> web.AppRunner:
    """Start ``app`` (its cleanup contexts: store, origin, ...) and bind it.

    Raises :class:`ConfigError` when start-up fails on a directory or another
    start-up check (the message names the path, not the address), and
    :class:`ListenError` only when the bind itself fails. Either way whatever
    had started is cleaned up first.
    """
    # aiohttp reads a timeout of 0 as "wait forever": a grace of 0 means "don't wait".
    runner = web.AppRunner(app, shutdown_timeout=max(grace, 0.001), access_log=None)
    try:
        await runner.setup()
    except (ConfigError, OSError) as exc:
        await _cleanup_quietly(runner)
        raise _start_error(exc) from exc
    offer = app.get(HIT_PATH)
    hits = offer() if offer is not None else None
    site = (
        web.TCPSite(runner, host, port, reuse_address=True)
        if hits is None
        else FastSite(runner, hits, host, port, grace)
    )
    try:
        await site.start()
    except OSError as exc:
        await _cleanup_quietly(runner)
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return runner


class FastSite(web.TCPSite):
    """A TCP site whose connections start on the L1-hit fast path
    (:mod:`cachesvc.serve.fastpath`) and are handed to aiohttp for anything else."""

    def __init__(
        self, runner: web.AppRunner, hits: HitFactory, host: str, port: int, grace: float
    ) -> None:
        super().__init__(runner, host, port, reuse_address=True)
        self._hits = hits
        self._grace = grace
        self.hit_server: HitServer | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        assert self._runner.server is not None
        self.hit_server = self._hits(self._runner.server)
        self._server = await asyncio.get_running_loop().create_server(
            self.hit_server, self._host, self._port, reuse_address=True
        )

    async def stop(self) -> None:
        await super().stop()
        if self.hit_server is not None:
            await self.hit_server.close(self._grace)


def _start_error(exc: ConfigError | OSError) -> ConfigError:
    """One line naming the path: an OSError of start-up is about a directory or
    file (the store's, the code dir's, a lock), never about the listen address."""
    if isinstance(exc, ConfigError):
        return exc
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return ConfigError(f"cannot start: {where}{exc.strerror or exc}")


async def _cleanup_quietly(runner: web.AppRunner) -> None:
    """Close what a failed start opened; its own errors only go to the log, so
    the start-up error stays the one line the operator sees."""
    try:
        await runner.cleanup()
    except Exception:
        log.exception("cleaning up after a failed start")


async def run_until_signal(
    apps: list[tuple[web.Application, tuple[str, int]]],
    grace: float,
    banner: Banner | None = None,
) -> int:
    """Serve ``apps`` until SIGINT/SIGTERM. Returns 1 when an address cannot be
    bound; raises :class:`ConfigError` when a service cannot start."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    try:
        for app, (host, port) in apps:
            try:
                runners.append(await start_app(app, host, port, grace))
            except ListenError as exc:
                log.error("%s", exc)
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


def serve(
    apps: list[tuple[web.Application, tuple[str, int]]],
    grace: float,
    log_level: str = "INFO",
    banner: Banner | None = None,
) -> int:
    """Log at ``log_level`` (a name: ``DEBUG`` ... ``ERROR``) to stderr, then run
    ``apps`` in a new event loop until SIGINT/SIGTERM (see
    :func:`run_until_signal`); blocks, and returns the exit status."""
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    return asyncio.run(run_until_signal(apps, grace, banner))

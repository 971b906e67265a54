"""The agent's bytecode: trees compiled for this host's runtimes (``--runtime``).

``POST /pkg/{digest}/unpack?modules=a,b`` answers as soon as the tree is in
place, then schedules its compile (the hinted modules first:
:mod:`cachesvc.unpack.hostcompile`); ``GET /pkg/{digest}/bytecode`` says how
far it got. An agent without ``--runtime`` or ``--code-dir`` compiles nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from cachesvc.config import Settings
from cachesvc.digest import Digest
from cachesvc.errors import ConfigError, InvalidRequest
from cachesvc.metrics import Metrics
from cachesvc.serve.http import route_digest, timed
from cachesvc.serve.service import CORE, SETTINGS
from cachesvc.unpack.bytecode import CompileBudget, CompileFailed, CompileReport, Runtime
from cachesvc.unpack.hostcompile import MAX_HINTS, HostCompiler, check_module

log = logging.getLogger(__name__)

COMPILER = web.AppKey("bytecode-compiler", HostCompiler)


def add_routes(app: web.Application) -> None:
    """The status route and the compiler's lifetime (after the unpacker's)."""
    app.router.add_get("/pkg/{digest}/bytecode", timed("bytecode", get_bytecode))
    app.cleanup_ctx.append(_compiler_lifetime)


def hints_of(request: web.Request) -> tuple[str, ...]:
    """The ``modules`` query (comma-separated, repeatable): what a start imports."""
    hints = [m for v in request.query.getall("modules", []) for m in v.split(",") if m]
    if len(hints) > MAX_HINTS:
        raise InvalidRequest(f"at most {MAX_HINTS} modules in the hint, not {len(hints)}")
    try:
        return tuple(check_module(m) for m in hints)
    except ValueError as exc:
        raise InvalidRequest(f"modules: {exc}") from None


def schedule(app: web.Application, digest: Digest, tree: Path, hints: tuple[str, ...]) -> None:
    """Compile ``tree`` in the background, if this agent has runtimes; never waits."""
    compiler = app.get(COMPILER)
    if compiler is not None:
        compiler.schedule(digest, tree, hints)


async def get_bytecode(request: web.Request) -> web.Response:
    digest = route_digest(request)
    compiler = request.app.get(COMPILER)
    if compiler is None:
        raise InvalidRequest("this agent has no --runtime (or no --code-dir): no bytecode")
    return web.json_response(compiler.status(digest))


async def runtimes_of(settings: Settings) -> list[Runtime]:
    """Each ``--runtime NAME=PATH``, asked for its cache tag; ConfigError if one fails."""
    found = []
    for item in settings.runtimes:
        name, _, path = item.partition("=")
        try:
            found.append(await Runtime.probe(name, Path(path)))
        except CompileFailed as exc:
            raise ConfigError(f"--runtime {item}: {exc}") from exc
    return found


async def _compiler_lifetime(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.code_dir is None or not settings.runtimes:
        yield
        return
    runtimes = await runtimes_of(settings)
    budget = CompileBudget(
        timeout=settings.unpack_timeout,
        memory=settings.unpack_memory,
        max_pyc_bytes=settings.max_unpacked_size,
    )
    compiler = HostCompiler(settings.code_dir, runtimes, budget, _counter(app[CORE].metrics))
    app[COMPILER] = compiler

    def on_evict(digest: Digest, _size: int) -> None:
        compiler.cancel(digest)

    app[CORE].store.on_evict.append(on_evict)
    try:
        yield
    finally:
        await compiler.aclose()


def _counter(metrics: Metrics) -> Callable[[Runtime, CompileReport], None]:
    def count(runtime: Runtime, report: CompileReport) -> None:
        metrics.bytecode_files.labels(runtime.name, "compiled").inc(report.compiled)
        metrics.bytecode_files.labels(runtime.name, "skipped").inc(report.skipped)
        for rel, why in report.skips[:5]:
            log.info("bytecode %s: skipped %s: %s", runtime.name, rel, why)

    return count

"""The agent's package endpoints, ``/pkg/{digest}/archive`` and ``/unpack``, and
the unpacker's lifetime (the code dir locked, then swept, before the first
unpack). Peels and extracts nothing itself (:mod:`cachesvc.unpack`).

* Both refuse a package over ``--max-package-size`` from its size (a HEAD
  through the tiers), before any download.
* ``archive`` makes the package present and verified in L1 first, then reads
  the open store file (``/proc/self/fd``): an eviction cannot pull it away.
* ``unpack`` extracts while the package arrives; its tree is shown only after
  the verdict. Without ``--code-dir`` it is refused (400); an evicted package
  takes its tree with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from cachesvc.config import Settings
from cachesvc.digest import Digest
from cachesvc.dirlock import DirLock
from cachesvc.errors import CachesvcError, ConfigError, InvalidRequest, TooLarge
from cachesvc.serve.http import route_digest, stream_body, timed
from cachesvc.serve.service import CORE, SETTINGS, Core
from cachesvc.store.castore import Blob
from cachesvc.unpack.codec import Limits, archive_stream
from cachesvc.unpack.unpacker import Unpacker
from cachesvc.unpack.worker import Budget
from node_agent import bytecode

log = logging.getLogger(__name__)

UNPACKER = web.AppKey("unpacker", Unpacker)


def add_routes(app: web.Application) -> None:
    """Register the routes and the unpacker's lifetime (after the core's)."""
    app.router.add_get("/pkg/{digest}/archive", timed("archive", get_archive))
    app.router.add_post("/pkg/{digest}/unpack", timed("unpack", post_unpack))
    app.cleanup_ctx.append(_unpacker_lifetime)
    bytecode.add_routes(app)


def limits_of(app: web.Application) -> Limits:
    s = app[SETTINGS]
    return Limits(s.max_package_size, s.max_unpacked_size, s.max_files)


async def _unpacker_lifetime(app: web.Application) -> AsyncIterator[None]:
    settings, core = app[SETTINGS], app[CORE]
    if settings.code_dir is None:
        yield
        return
    # One owner, before the sweep: it removes what another agent is unpacking.
    lock = await asyncio.to_thread(DirLock.acquire, settings.code_dir, "code dir")
    try:
        unpacker = make_unpacker(settings, limits_of(app))
    except BaseException:
        lock.release()
        raise
    loop = asyncio.get_running_loop()
    # Not asyncio.to_thread: the default pool is the store's (see cachesvc.unpack.unpacker).
    swept = await loop.run_in_executor(unpacker.disk, unpacker.sweep_temp)
    if swept:
        log.warning("unpack: removed %d leftovers in %s", swept, settings.code_dir)
    await unpacker.start()
    app[UNPACKER] = unpacker
    tasks: set[asyncio.Task[None]] = set()

    def on_evict(digest: Digest, _size: int) -> None:
        task = asyncio.get_running_loop().create_task(unpacker.remove(digest))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    core.store.on_evict.append(on_evict)
    try:
        yield
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        await unpacker.aclose()
        lock.release()


def make_unpacker(settings: Settings, limits: Limits) -> Unpacker:
    """The agent's :class:`Unpacker`; a bad unpack flag is a :class:`ConfigError` (the
    code dir itself was checked by its lock)."""
    assert settings.code_dir is not None
    try:
        budget = Budget(settings.unpack_timeout, settings.unpack_memory)
        return Unpacker(settings.code_dir, limits, settings.unpack_workers, budget)
    except ValueError as exc:
        raise ConfigError(
            f"--unpack-workers {settings.unpack_workers}, --unpack-timeout "
            f"{settings.unpack_timeout:g}, --unpack-memory {settings.unpack_memory}: {exc}"
        ) from exc


async def local_package(core: Core, digest: Digest, limit: int) -> Blob:
    """Lease the verified package from L1, fetching it through the tiers first."""
    size = await checked_size(core, digest, limit)
    await core.tiers.fetch(digest)
    blob = await core.store.lease(digest)
    if blob is None:
        raise TooLarge(f"{digest.short} ({size} bytes) could not be kept in L1 to work on")
    return blob


async def checked_size(core: Core, digest: Digest, limit: int) -> int:
    """The package's size (a HEAD through the tiers); TooLarge over ``limit``."""
    size, _tier = await core.tiers.head(digest)
    if size > limit:
        raise TooLarge(f"{digest.short} is {size} bytes, over --max-package-size {limit}")
    return size


def fd_path(blob: Blob) -> Path:
    """A path that reaches the open file even after it was unlinked."""
    return Path(f"/proc/self/fd/{blob.file.fileno()}")


async def get_archive(request: web.Request) -> web.StreamResponse:
    digest = route_digest(request)
    core, limits = request.app[CORE], limits_of(request.app)
    blob = await local_package(core, digest, limits.max_package_size)
    try:
        async with archive_stream(fd_path(blob), limits) as archive:
            resp = web.StreamResponse(headers={
                "X-Package-Layers": ",".join(archive.layers),
                "Content-Type": "application/zip" if archive.layers[-1] == "zip"
                else "application/x-tar",
                "ETag": f'"{digest}.{archive.layers[-1]}"',
            })  # fmt: skip
            await stream_body(request, resp, aiter(archive), resp.write, f"archive {digest.short}")
            return resp
    finally:
        core.store.release(blob)


async def post_unpack(request: web.Request) -> web.Response:
    unpacker = request.app.get(UNPACKER)
    if unpacker is None:
        raise InvalidRequest("this agent has no --code-dir: unpacking is off")
    digest = route_digest(request)
    hints = bytecode.hints_of(request)
    core = request.app[CORE]
    limit = unpacker.limits.max_package_size
    try:
        await checked_size(core, digest, limit)
        # The worker reads the package as it arrives; its tree becomes visible
        # only after the sha256 verdict (cachesvc.unpack.unpacker).
        async with core.tiers.open(digest) as package:
            result = await unpacker.unpack(digest, package)
    except CachesvcError as exc:
        core.metrics.unpacks.labels(exc.code).inc()
        raise
    core.metrics.unpacks.labels("ok").inc()
    bytecode.schedule(request.app, digest, result.path, hints)
    return web.json_response(result.as_json())

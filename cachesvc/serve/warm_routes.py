"""The operator routes (``/warm``, ``/warm/{job}``, ``/warm/unpin``), shared by
agent and peer: body validation, the bearer check, and on agents (``prefetch``
and ``Settings.prefetch_calls``) the reference refresher and the prefetch hook. No
warm logic lives here (:mod:`cachesvc.warm`); bodies, answers and codes:
docs/API.md; story: README "Operators".

* Every route needs ``Authorization: Bearer $CACHESVC_TOKEN``; a service
  without it refuses them all (401).
* A job holds at most :data:`~cachesvc.warm.jobs.MAX_ITEMS` digests, a
  tenant's packages and layers first, duplicates dropped.
* The prefetch hook is a dict lookup after a 200/206 ``GET``: no I/O, never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError, InvalidRequest, Unauthorized, UnknownTenant
from cachesvc.publish.upload import check_name
from cachesvc.serve.service import CORE, SETTINGS, Core, require_token
from cachesvc.tier import Role
from cachesvc.warm.jobs import MAX_ITEMS, SIGNALS, Scope, WarmJobs
from cachesvc.warm.prefetch import Prefetcher
from cachesvc.warm.references import ReferenceIndex

log = logging.getLogger(__name__)

REFRESH_EVERY = 60.0  # seconds between listings of tenants/ on agents


@dataclass
class Warm:
    """Per-app warm state, created when the core opens."""

    jobs: WarmJobs
    index: ReferenceIndex
    prefetcher: Prefetcher | None = None
    refresher: asyncio.Task[None] | None = None


WARM = web.AppKey("warm", Warm)


@dataclass(frozen=True)
class WarmRequest:
    tenant: str | None
    digests: list[Digest]
    pin: bool
    signal: str


def add_routes(app: web.Application, prefetch: bool = False) -> None:
    """Add the warm routes; ``prefetch`` (agents) also follows ``calls``."""
    app.cleanup_ctx.append(_lifetime_for(prefetch))
    app.router.add_post("/warm", post_warm)
    app.router.add_post("/warm/unpin", post_unpin)
    app.router.add_get("/warm/{job}", get_job)
    if prefetch:
        app.on_response_prepare.append(_after_serve)


def _lifetime_for(prefetch: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        warm = _open(app[CORE], prefetch)
        app[WARM] = warm
        yield
        await _close(warm)

    return lifetime


def _open(core: Core, prefetch: bool) -> Warm:
    index = ReferenceIndex(core.origin)
    index.on_change.append(core.metrics.references.set)
    jobs = WarmJobs(core.tiers, core.store, core.metrics, _scope(core), core.settings.pin_share)
    warm = Warm(jobs, index)
    if prefetch and core.settings.prefetch_calls:
        warm.prefetcher = Prefetcher(index, core.tiers, core.store, core.metrics)
        warm.prefetcher.start()
        warm.refresher = asyncio.get_running_loop().create_task(_refresh_forever(index))
    return warm


def _scope(core: Core) -> Scope:
    if core.role is Role.AGENT:
        return Scope()
    return Scope(core.ring, core.settings.advertise or core.settings.listen_url)


async def _refresh_forever(index: ReferenceIndex) -> None:
    while True:
        try:
            known = await index.refresh_all()
            log.debug("references: %d known", known)
        except CachesvcError as exc:
            log.warning("references: listing tenants/ failed: %s", exc)
        await asyncio.sleep(REFRESH_EVERY)


async def _close(warm: Warm) -> None:
    if warm.refresher is not None:
        warm.refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warm.refresher
    if warm.prefetcher is not None:
        await warm.prefetcher.close()
    await warm.jobs.close()


async def _after_serve(request: web.Request, response: web.StreamResponse) -> None:
    """Hand a served package's digest to the prefetcher: no I/O, never raises."""
    digest = request.match_info.get("digest")
    if digest is None or response.status not in (200, 206) or request.method == "HEAD":
        return
    prefetch_signal(request.app, digest)


def prefetch_signal(app: web.Application, digest: str) -> None:
    """A package (``sha256:<hex>`` or hex) was served: tell the prefetcher, if any."""
    warm = app.get(WARM)
    if warm is not None and warm.prefetcher is not None:
        warm.prefetcher.served(digest)


# -- handlers ----------------------------------------------------------------------


def _operator(request: web.Request) -> None:
    token = request.app[SETTINGS].token
    if token is None:
        raise Unauthorized("the operator API is disabled: start the service with CACHESVC_TOKEN")
    require_token(request, token, "the operator API")


async def post_warm(request: web.Request) -> web.Response:
    _operator(request)
    spec = parse_body(await _json(request), allow=("tenant", "digests", "pin", "signal"))
    warm = request.app[WARM]
    digests = await _digests(warm.index, spec)
    job = warm.jobs.start(digests, spec.tenant, spec.pin, spec.signal)
    return web.json_response(
        {"job": job.id, "total": len(job.items)},
        status=202,
        headers={"Location": f"/warm/{job.id}"},
    )


async def get_job(request: web.Request) -> web.Response:
    _operator(request)
    items = request.query.get("items", "all")
    if items not in ("all", "failed", "none"):
        raise InvalidRequest(f"items={items!r}: expected all, failed or none")
    jobs = request.app[WARM].jobs
    job = jobs.get(request.match_info["job"])
    return web.json_response(job.summary(jobs.now(), items))


async def post_unpin(request: web.Request) -> web.Response:
    _operator(request)
    spec = parse_body(await _json(request), allow=("tenant", "digests"))
    warm = request.app[WARM]
    digests = await _digests(warm.index, spec)
    unpinned = await warm.jobs.unpin(digests)
    return web.json_response({"unpinned": unpinned, "total": len(digests)})


async def _json(request: web.Request) -> object:
    try:
        return await request.json()
    except ValueError as exc:
        raise InvalidRequest(f"the body must be a JSON object: {exc}") from exc


def parse_body(body: object, allow: tuple[str, ...]) -> WarmRequest:
    """Validate a warm/unpin body; raises :class:`InvalidRequest`/``InvalidDigest``."""
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be a JSON object: {"tenant": T} or {"digests": [...]}')
    unknown = sorted(set(body) - set(allow))
    if unknown:
        raise InvalidRequest(f"unknown fields {unknown}; allowed: {list(allow)}")
    tenant = body.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise InvalidRequest("tenant must be a string")
    digests = _parse_digests(body.get("digests"))
    if tenant is None and not digests:
        raise InvalidRequest('give "tenant" or a non-empty "digests" list')
    pin, signal = body.get("pin", False), body.get("signal", "warm")
    if not isinstance(pin, bool):
        raise InvalidRequest("pin must be true or false")
    if signal not in SIGNALS:
        raise InvalidRequest(f"signal must be one of {list(SIGNALS)}")
    name = check_name("tenant", tenant) if tenant is not None else None
    return WarmRequest(name, digests, pin, signal)


def _parse_digests(value: object) -> list[Digest]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        raise InvalidRequest("digests must be a list of sha256:<hex> strings")
    if len(value) > MAX_ITEMS:
        raise InvalidRequest(f"{len(value)} digests: at most {MAX_ITEMS} per job")
    return [Digest.parse(d) for d in value]


async def _digests(index: ReferenceIndex, spec: WarmRequest) -> list[Digest]:
    """The request's digests: the tenant's packages and layers, then the explicit ones."""
    digests: list[Digest] = []
    if spec.tenant is not None:
        refs = await index.tenant(spec.tenant)
        if not refs:
            raise UnknownTenant(f"tenant {spec.tenant!r} has no references in the origin")
        digests = [d for ref in refs for d in ref.digests]
    unique = list(dict.fromkeys(digests + spec.digests))
    if len(unique) > MAX_ITEMS:
        raise InvalidRequest(f"{len(unique)} packages: at most {MAX_ITEMS} per job")
    return unique

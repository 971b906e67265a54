"""What the agent and the peer share: the :class:`Core` (origin, ring and
membership, peer client, store and scrubber, flights, tiers, egress bucket,
fan-out tracker and feeds), its lifetime in the app's ``cleanup_ctx``, the
order of the walk's sources per role (README "How a request is answered",
step 5), the bearer-token check, the hit fast path's offer, and
``/healthz`` ``/readyz`` ``/metrics`` ``/stats``. No package route here
(:mod:`cachesvc.peer.app`, :mod:`node_agent.app`).

* Shutdown closes in reverse: running fills cancelled (temp files removed),
  the store's access order flushed; it is also flushed every
  :data:`FLUSH_EVERY` s, a failed flush retried, never the end of flushing.
* Token comparison is constant-time; no token configured means open (callers
  decide whether that is allowed).
* The fast path is offered only without an egress limit (its bucket lives in
  the aiohttp path) and on loops with native ``sendfile``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from cachesvc.config import Settings
from cachesvc.digest import Digest
from cachesvc.errors import ConfigError, Unauthorized
from cachesvc.fanout.parents import Avoided, FanoutSource, Feeds
from cachesvc.fanout.tracker import Tracker
from cachesvc.metrics import Metrics
from cachesvc.readpath.flight import Flights
from cachesvc.readpath.tiers import OriginSource, PeerSource, Tiers
from cachesvc.serve.egress import TokenBucket
from cachesvc.serve.fastpath import HIT_PATH, HitFactory, HitRoute, HitServer, hit_path_available
from cachesvc.serve.http import METRICS, error_middleware, json_error
from cachesvc.serve.readiness import OriginCheck, Readiness
from cachesvc.store.castore import Store
from cachesvc.store.scrub import Scrubber
from cachesvc.tier import Role, Tier
from cachesvc.upstream.membership import Membership
from cachesvc.upstream.origin import Origin, make_origin
from cachesvc.upstream.peer_client import PeerClient
from cachesvc.upstream.ring import Ring
from cachesvc.upstream.source import Source

log = logging.getLogger(__name__)

FLUSH_EVERY = 30.0


@dataclass
class Core:
    """The objects a service is made of; created in the app's cleanup_ctx."""

    settings: Settings
    role: Role
    metrics: Metrics
    origin: Origin
    ring: Ring
    membership: Membership
    peer_client: PeerClient
    store: Store
    flights: Flights
    tiers: Tiers
    egress: TokenBucket
    tracker: Tracker  # fan-out trees of the digests this peer owns (peers)
    feeds: Feeds  # hosts this host feeds now, per digest (agents)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


CORE = web.AppKey("core", Core)
SETTINGS = web.AppKey("settings", Settings)
READINESS = web.AppKey("readiness", Readiness)


def make_base_app(
    settings: Settings, role: Role, on_core: Callable[[Core], None] | None = None
) -> web.Application:
    """An app with the ops routes and the core's lifetime wired up.

    ``role``: an agent's reads go to the ring's owners, then the origin; a
    peer's to the origin only (its ring is used for ownership, e.g. by warm).
    """
    app = web.Application(middlewares=[error_middleware], client_max_size=1 << 20)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        core = await _open_core(settings, app[METRICS], role)
        app[CORE] = core
        app[READINESS] = Readiness(core.store.root / "tmp", OriginCheck(core.origin))
        if on_core is not None:
            on_core(core)
        yield
        await app[READINESS].close()
        await _close_core(core)

    app.cleanup_ctx.append(lifetime)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/stats", stats)
    return app


async def _open_core(settings: Settings, metrics: Metrics, role: Role) -> Core:
    origin = make_origin(settings.origin, settings.s3_endpoint, settings.origin_timeout)
    await origin.start()
    ring = Ring()
    membership = Membership(ring, settings.peers, settings.dns_interval)
    await membership.start()
    peer_client = PeerClient(
        settings.peer_token,
        connect_timeout=settings.peer_connect_timeout,
        header_timeout=settings.origin_timeout + 10.0,
        read_timeout=settings.peer_read_timeout,
    )
    store, scrubber = await _open_store(settings, metrics)
    store.on_evict.append(lambda _d, _s: metrics.evictions.inc())
    metrics.bind_store(lambda: _usage(store))
    flights = Flights(store, settings.max_fetches, settings.max_queued)
    sources = _sources_for(settings, role, ring, peer_client, origin)
    tiers = Tiers(store, flights, sources, metrics, role.local_tier)
    me = settings.self_url or settings.listen_url
    core = Core(
        settings, role, metrics, origin, ring, membership, peer_client, store, flights, tiers,
        egress=TokenBucket(settings.egress_limit),
        tracker=Tracker(me, settings.fanout),
        feeds=Feeds(settings.fanout),
    )  # fmt: skip
    core.tasks.append(asyncio.get_running_loop().create_task(_flush_forever(store)))
    core.tasks.append(asyncio.get_running_loop().create_task(scrubber.run()))
    log.info(
        "%s ready: store %s (%d entries, %d bytes of %d), origin %s, peers %s",
        role.local_tier,
        settings.cache_dir,
        *_usage(store),
        origin.url,
        ring.nodes or "-",
    )
    return core


async def _open_store(settings: Settings, metrics: Metrics) -> tuple[Store, Scrubber]:
    """The store (locked, recovered) and its scrubber; closed again if the
    scrubber's settings are refused, so the directory's lock is not kept."""
    store = await Store.open(
        settings.cache_dir,
        settings.cache_size,
        on_corrupt=lambda found_by: metrics.corrupt.labels(found_by).inc(),
    )
    try:
        return store, Scrubber(store, settings.scrub_interval, settings.scrub_rate, metrics)
    except ConfigError:
        await store.close()
        raise


def _usage(store: Store) -> tuple[int, int, int]:
    u = store.usage()
    return u.entries, u.bytes, u.capacity


def _sources_for(
    settings: Settings, role: Role, ring: Ring, client: PeerClient, origin: Origin
) -> Callable[[Digest], Sequence[Source]]:
    origin_source = OriginSource(origin)
    if role is Role.PEER:
        return lambda _digest: (origin_source,)
    avoided = Avoided()
    me = settings.self_url

    def walk(digest: Digest) -> list[Source]:
        # Peers marked down come last but are still asked before the origin
        # (why: cachesvc.upstream.ring). The first is asked as the digest's
        # fan-out tracker: it may name another agent to use.
        owners = ring.owners(digest)
        peers: list[Source] = [PeerSource(client, ring, url) for url in owners[1:]]
        if owners:
            peers.insert(0, FanoutSource(client, ring, owners[0], me, settings.fanout, avoided))
        return [*peers, origin_source]

    return walk


async def _flush_forever(store: Store) -> None:
    """Persist access order every :data:`FLUSH_EVERY` s; a failed flush
    (a disk error) is logged and retried, never the end of flushing."""
    while True:
        await asyncio.sleep(FLUSH_EVERY)
        try:
            await store.flush()
        except OSError as exc:
            log.error("store: cannot record access order (retrying in %ss): %s", FLUSH_EVERY, exc)


async def _close_core(core: Core) -> None:
    for task in core.tasks:
        task.cancel()
    await asyncio.gather(*core.tasks, return_exceptions=True)
    await core.flights.close()
    await core.membership.close()
    await core.peer_client.close()
    await core.origin.close()
    await core.store.close()
    log.info("closed store %s", core.settings.cache_dir)


def require_token(request: web.Request, expected: str | None, what: str) -> None:
    """Bearer-token check in constant time; no token configured means open
    (for the peer token) — callers decide whether that is allowed."""
    if not token_ok(request.headers.get("Authorization", ""), expected):
        raise Unauthorized(f"{what} needs Authorization: Bearer <token>")


def token_ok(authorization: str, expected: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <expected>``
    (compared in constant time); no token configured means open."""
    if expected is None:
        return True
    given = authorization[7:] if authorization.startswith("Bearer ") else ""
    return hmac.compare_digest(given.encode(), expected.encode())


def offer_hit_path(
    app: web.Application, route: HitRoute, on_served: Callable[[Digest], None] | None = None
) -> None:
    """Offer the hit fast path (:mod:`cachesvc.serve.fastpath`) over this app's
    store to the runner; off while an egress limit paces bytes (its bucket
    lives in the aiohttp path) and on loops without native ``sendfile``."""

    def make() -> HitFactory | None:
        if not hit_path_available():
            return None
        core = app[CORE]

        def enabled() -> bool:
            return core.egress.unlimited

        return lambda handlers: HitServer(
            handlers, core.store, core.metrics, route, enabled, on_served
        )

    app[HIT_PATH] = make


# -- ops endpoints ---------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the store takes a write and the origin does not refuse us
    (:mod:`cachesvc.serve.readiness` says why, and what an unreachable origin does)."""
    readiness = request.app.get(READINESS)
    if readiness is None:
        return json_error(503, "not_ready", "store not open yet")
    status, body = await readiness.report()
    if status == 200:
        body["peers"] = len(request.app[CORE].ring.nodes)
    return web.json_response(body, status=status)


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def stats(request: web.Request) -> web.Response:
    """Entries, bytes, capacity, and requests per tier (hits: served locally;
    misses: served from the tier named)."""
    core = request.app[CORE]
    usage = core.store.usage()
    local = core.tiers.local_tier
    core.metrics.sync()
    served = {tier: core.metrics.requests_served(tier) for tier in Tier}
    return web.json_response(
        {
            "tier": local,
            "entries": usage.entries,
            "bytes": usage.bytes,
            "capacity": usage.capacity,
            "pinned_bytes": usage.pinned_bytes,
            "hits": served.get(local, 0),
            "misses": {t: n for t, n in served.items() if t != local},
            "requests": served,
            "inflight_fetches": len(core.flights),
            "peers": list(core.ring.nodes),
            "peers_down": [p for p in core.ring.nodes if core.ring.is_down(p)],
        }
    )

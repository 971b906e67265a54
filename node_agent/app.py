"""The node agent (L1): ``/pkg/{digest}`` over the shared read-through core.

The same :func:`make_app` serves the CLI (``cachesvc agent``), ``cachesvc up``
and the tests. Reads walk L1 → the ring's owners → the origin
(:mod:`cachesvc.readpath.tiers`); this module only wires routes. With fan-out, it
also feeds other agents what it holds or is filling (:func:`feed_host`).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from cachesvc.config import Settings
from cachesvc.digest import Digest
from cachesvc.errors import NotHere
from cachesvc.fanout.parents import check_requester
from cachesvc.readpath.package import Package
from cachesvc.serve.fastpath import FORWARDED_HEADER, REFUSED_HEADERS, HitRoute
from cachesvc.serve.http import refuse_unrouted, route_digest, send_package, serve_package, timed
from cachesvc.serve.service import CORE, Core, make_base_app, offer_hit_path, require_token
from cachesvc.serve.warm_routes import add_routes as add_warm_routes
from cachesvc.serve.warm_routes import prefetch_signal
from cachesvc.tier import Role
from cachesvc.upstream.peer_client import FORWARDED, VIA
from node_agent.packages import add_routes as add_package_routes

FEED_START_WAIT = 5.0  # seconds another host waits for this host's own fill to start
# Requests from other hosts are fan-out feeds (capped, never a fetch): aiohttp's.
AGENT_HITS = HitRoute(b"/pkg/", Role.AGENT.local_tier, "pkg", REFUSED_HEADERS | {FORWARDED_HEADER})


def make_app(settings: Settings) -> web.Application:
    app = make_base_app(settings, Role.AGENT)
    app.router.add_get("/pkg/{digest}", timed("pkg", get_package))
    add_package_routes(app)
    app.router.add_route("*", "/pkg/{rest:.*}", bad_pkg_path)
    add_warm_routes(app, prefetch=True)
    offer_hit_path(app, AGENT_HITS, _served(app))
    return app


def _served(app: web.Application) -> Callable[[Digest], None]:
    """The prefetch hook for hits the fast path answers."""

    def served(digest: Digest) -> None:
        prefetch_signal(app, digest.hex)

    return served


async def get_package(request: web.Request) -> web.StreamResponse:
    digest = route_digest(request)
    core = request.app[CORE]
    if FORWARDED in request.headers:
        return await feed_host(request, core, digest)
    return await serve_package(request, core.tiers, core.egress, digest)


async def feed_host(request: web.Request, core: Core, digest: Digest) -> web.StreamResponse:
    """Another agent asks (fan-out): only what is here or being filled here,
    at most ``--fanout`` hosts at once, never a host upstream of this one; the
    answer names the agents these bytes come through (``X-Cachesvc-Via``)."""
    require_token(request, core.settings.peer_token, "/pkg from another host")
    me = core.settings.self_url
    if core.settings.fanout <= 0 or me is None:
        raise NotHere("this agent does not feed other hosts (--fanout 0 or no --advertise)")
    if request.method == "HEAD":
        raise NotHere("HEAD is for the owner peer")

    async def send(package: Package) -> web.StreamResponse:
        check_requester(request, package.via, me)
        via = {VIA: ",".join((me, *package.via))}
        return await send_package(request, core.metrics, core.egress, package, via)

    with core.feeds.slot(digest):
        return await core.tiers.deliver(digest, send, True, FEED_START_WAIT)


async def bad_pkg_path(request: web.Request) -> web.StreamResponse:
    """405 for a method the path's routes do not take; 400 for a malformed digest."""
    await refuse_unrouted(request, "/pkg/sha256:<64 hex>")

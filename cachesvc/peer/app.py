"""The L2 cache peer: ``/blob/{digest}`` over the shared read-through core.

A peer reads only from the origin: it never forwards a request to another
peer, so requests marked ``X-Cachesvc-Forwarded`` by agents cannot loop even
while nodes disagree about the ring. ``--peers`` gives it the ring, used to
decide which digests it owns (warm). When ``CACHESVC_PEER_TOKEN`` is set,
every ``/blob`` request must carry it.

Fan-out: for the digests it owns, a peer is the tracker (:mod:`cachesvc.fanout.tracker`):
an agent that speaks fan-out may be answered ``307`` naming another agent that
holds or is filling the package (:mod:`cachesvc.fanout.parents`).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDict

from cachesvc.config import Settings
from cachesvc.digest import Digest
from cachesvc.fanout.parents import parent_for, redirect
from cachesvc.serve.fastpath import SERVE, Head, HitRoute
from cachesvc.serve.http import refuse_unrouted, route_digest, serve_package, timed
from cachesvc.serve.service import (
    CORE,
    SETTINGS,
    make_base_app,
    offer_hit_path,
    require_token,
    token_ok,
)
from cachesvc.serve.warm_routes import add_routes as add_warm_routes
from cachesvc.tier import Role


def make_app(settings: Settings) -> web.Application:
    app = make_base_app(settings, Role.PEER)
    blob = timed("blob", get_blob)
    app.router.add_get("/blob/{digest}", blob)  # also answers HEAD
    app.router.add_route("*", "/blob/{rest:.*}", bad_blob_path)
    add_warm_routes(app)
    offer_hit_path(app, HitRoute(b"/blob/", Role.PEER.local_tier, "blob", decide=_decide(app)))
    return app


def _decide(app: web.Application) -> Callable[[Head, Digest], str | None]:
    """The fast path's check of a hot ``/blob`` hit: the peer token (else
    aiohttp answers 401), then the fan-out tracker (serve it, or redirect)."""

    def decide(head: Head, digest: Digest) -> str | None:
        authorization = head.headers.get(b"authorization", b"").decode("latin-1")
        if not token_ok(authorization, app[SETTINGS].peer_token):
            return None
        if b"x-cachesvc-fanout" not in head.headers:
            return SERVE  # no fan-out: the tracker would say "serve it" too
        headers = CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers.items()
        )
        parent = parent_for(headers, "GET", app[CORE].tracker, digest)
        return SERVE if parent is None else parent

    return decide


async def get_blob(request: web.Request) -> web.StreamResponse:
    """The package, or (fan-out) a 307 naming the agent to fetch it from."""
    require_token(request, request.app[SETTINGS].peer_token, "/blob")
    digest = route_digest(request)
    core = request.app[CORE]
    parent = parent_for(request.headers, request.method, core.tracker, digest)
    if parent is not None:
        core.metrics.fanout_redirects.inc()
        return redirect(parent, digest)
    return await serve_package(request, core.tiers, core.egress, digest)


async def bad_blob_path(request: web.Request) -> web.StreamResponse:
    """Token first (an unauthenticated client learns nothing of the routes), then
    405 for a method ``/blob/{digest}`` does not take, 400 for a malformed digest."""
    require_token(request, request.app[SETTINGS].peer_token, "/blob")
    await refuse_unrouted(request, "/blob/sha256:<64 hex>")

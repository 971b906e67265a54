"""The node agent (L1): ``/pkg/{digest}`` over the shared read-through core.

The same :func:`make_app` serves the CLI (``cachesvc agent``), ``cachesvc up``
and the tests. Reads walk L1 → the ring's owners → the origin
(:mod:`cachesvc.tiers`); this module only wires routes.
"""

from __future__ import annotations

from aiohttp import web

from cachesvc.config import Settings
from cachesvc.errors import InvalidDigest
from cachesvc.http import route_digest, serve_package, timed
from cachesvc.service import CORE, make_base_app
from cachesvc.warm_api import add_routes as add_warm_routes
from node_agent.packages import add_routes as add_package_routes


def make_app(settings: Settings) -> web.Application:
    app = make_base_app(settings, local_tier="L1")
    app.router.add_get("/pkg/{digest}", timed("pkg", get_package))
    add_package_routes(app)
    app.router.add_route("*", "/pkg/{rest:.*}", bad_pkg_path)
    add_warm_routes(app, prefetch=True)
    return app


async def get_package(request: web.Request) -> web.StreamResponse:
    digest = route_digest(request)
    return await serve_package(request, request.app[CORE].tiers, digest)


async def bad_pkg_path(request: web.Request) -> web.StreamResponse:
    raise InvalidDigest(f"{request.path!r} does not name a digest: /pkg/sha256:<64 hex>")

"""A counting, optionally misbehaving HTTP proxy in front of an S3 server.

Tests, benchmarks and load tests put it between cachesvc and the origin (moto)
to count blob GETs and the bytes read from the origin independently of
cachesvc's own metrics, and to make the origin fail on demand (down, corrupt,
truncated, slow bodies).

Bodies are streamed both ways in bounded chunks: a 50 MB package never sits in
the proxy's memory, so the proxy adds little latency and no memory spike to
the origin baseline of a load test.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from cachesvc.digest import Digest

CHUNK = 1 << 20
# Hop-by-hop headers, and those aiohttp sets itself on the way out.
DROPPED = frozenset(
    ("transfer-encoding", "content-length", "content-encoding", "connection", "server", "date")
)


async def start_server(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    """Run an app on 127.0.0.1 (``port`` 0: any free one); returns its runner and URL."""
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{bound}"


@dataclass
class S3Proxy:
    """A real HTTP proxy in front of moto that counts requests and can misbehave.

    ``mode``: "ok"; "down" (500 for everything); "corrupt" (flip the first
    byte of blob bodies); "truncate" (close blob bodies halfway); "slow"
    (sleep ``delay`` before answering blob GETs); "hold" (relay the first half
    of a blob body, then wait until ``release()``: a body caught mid-way, for
    as long as a test needs to look at what happens meanwhile).
    ``rate`` (bytes/s, 0 = unlimited) paces every blob body in every mode:
    an origin with a bandwidth.

    ``gets`` counts blob GETs by path; ``bytes`` counts the body bytes of blob
    GETs read from the upstream, by path (what the origin actually sent,
    whether or not the client took all of it).
    """

    upstream: str
    mode: str = "ok"
    delay: float = 0.0
    rate: float = 0.0
    gets: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    url: str = ""
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        """Let the blob bodies held by ``hold`` mode go on (and stop holding)."""
        self._released.set()

    def blob_gets(self, digest: Digest | None = None) -> int:
        """Blob GETs seen so far, for one digest or all of them."""
        return _total(self.gets, digest)

    def blob_bytes(self, digest: Digest | None = None) -> int:
        """Blob body bytes read from the upstream so far, for one digest or all."""
        return _total(self.bytes, digest)

    async def start(self) -> S3Proxy:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{path:.*}", self._handle)
        connector = aiohttp.TCPConnector(limit=512)
        self._session = aiohttp.ClientSession(auto_decompress=False, connector=connector)
        self._runner, self.url = await start_server(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        is_blob_get = request.method == "GET" and "/blobs/sha256/" in request.path
        if is_blob_get:
            self.gets[request.path] += 1
        if self.mode == "down":
            return web.Response(status=500, text="origin down")
        if is_blob_get and self.mode == "slow":
            await asyncio.sleep(self.delay)
        assert self._session is not None, "start() the proxy first"
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=self._upstream_headers(request),
            data=request.content if request.body_exists else None,
        ) as up:
            return await self._relay(request, up, is_blob_get)

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        """The client's headers as they came, ``Host`` included: it is a signed
        header of SigV4, and a store that checks signatures (SeaweedFS) refuses
        a request whose Host was rewritten to its own address. (moto ignores
        signatures and takes any Host for path-style requests.)"""
        return dict(request.headers)

    async def _relay(
        self, request: web.Request, up: aiohttp.ClientResponse, is_blob_get: bool
    ) -> web.StreamResponse:
        """Stream the upstream answer to the client, misbehaving on blob bodies."""
        headers = {k: v for k, v in up.headers.items() if k.lower() not in DROPPED}
        resp = web.StreamResponse(status=up.status, headers=headers)
        length = up.headers.get("Content-Length")
        if length is not None:
            resp.content_length = int(length)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        if is_blob_get and up.status in (200, 206):
            if not await self._relay_blob(request, resp, up):
                return resp  # truncated on purpose: the transport is closed
        else:
            async for chunk in up.content.iter_chunked(CHUNK):
                await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def _relay_blob(
        self, request: web.Request, resp: web.StreamResponse, up: aiohttp.ClientResponse
    ) -> bool:
        """Relay a blob body; False when it was cut short on purpose (``truncate``)."""
        sent = 0
        half = (resp.content_length or 0) // 2
        async for chunk in up.content.iter_chunked(CHUNK):
            self.bytes[request.path] += len(chunk)
            if self.mode == "corrupt" and sent == 0:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            if self.mode == "truncate" and sent + len(chunk) >= half:
                await resp.write(chunk[: half - sent])
                assert request.transport is not None
                request.transport.abort()  # the client sees a short body
                return False
            await resp.write(chunk)
            sent += len(chunk)
            if self.mode == "hold" and sent >= half:
                await self._released.wait()
            if self.rate:
                await asyncio.sleep(len(chunk) / self.rate)
        return True


def _total(counts: Counter[str], digest: Digest | None) -> int:
    if digest is None:
        return sum(n for k, n in counts.items() if "/blobs/sha256/" in k)
    return sum(n for k, n in counts.items() if k.endswith(digest.hex))

"""A counting, optionally misbehaving HTTP proxy in front of an S3 server.

Tests, benchmarks and load tests put it between cachesvc and the origin (moto)
to count blob GETs independently of cachesvc's own metrics, and to make the
origin fail on demand (down, corrupt, truncated, slow bodies).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from cachesvc.digest import Digest


async def start_server(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    """Run an app on 127.0.0.1 (``port`` 0: any free one); returns its runner and URL."""
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    sock = site._server.sockets[0]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class S3Proxy:
    """A real HTTP proxy in front of moto that counts requests and can misbehave.

    ``mode``: "ok"; "down" (500 for everything); "corrupt" (flip one byte of
    blob bodies); "truncate" (close blob bodies halfway); "slow" (sleep
    ``delay`` before answering blob GETs).
    """

    upstream: str
    mode: str = "ok"
    delay: float = 0.0
    gets: Counter[str] = field(default_factory=Counter)
    url: str = ""
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    def blob_gets(self, digest: Digest | None = None) -> int:
        if digest is None:
            return sum(n for k, n in self.gets.items() if "/blobs/sha256/" in k)
        return sum(n for k, n in self.gets.items() if k.endswith(digest.hex))

    async def start(self) -> S3Proxy:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._session = aiohttp.ClientSession(auto_decompress=False)
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
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        headers["Host"] = self.upstream.split("//", 1)[1]
        body = await request.read()
        async with self._session.request(  # type: ignore[union-attr]
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as up:
            data = await up.read()
            out_headers = {
                k: v
                for k, v in up.headers.items()
                if k.lower()
                not in (
                    "transfer-encoding",
                    "content-length",
                    "content-encoding",
                    "connection",
                    "server",
                    "date",
                )
            }
            if is_blob_get and up.status in (200, 206):
                return await self._misbehave(request, up.status, out_headers, data)
            if request.method == "HEAD":
                resp = web.StreamResponse(status=up.status, headers=out_headers)
                resp.content_length = int(up.headers.get("Content-Length", 0))
                return resp
            return web.Response(status=up.status, headers=out_headers, body=data)

    async def _misbehave(
        self, request: web.Request, status: int, headers: dict[str, str], data: bytes
    ) -> web.StreamResponse:
        if self.mode == "corrupt" and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if self.mode == "truncate":
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.abort()
            return resp
        return web.Response(status=status, headers=headers, body=data)

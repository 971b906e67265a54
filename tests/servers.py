"""Real servers for the tests: moto's S3 server, a counting (and on demand
misbehaving) proxy in front of it, misbehaving peers, and in-process stacks of
peers and agents on loopback ports.

Fakes here are real HTTP servers that misbehave; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from cachesvc.config import Settings
from cachesvc.digest import Digest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-ish bytes."""
    out = bytearray()
    block = hashlib.sha256(f"seed-{seed}".encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest())


async def start_server(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    sock = site._server.sockets[0]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


# -- the origin side ------------------------------------------------------------


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


# -- misbehaving peers ------------------------------------------------------------


async def start_fake_peer(
    behaviour: str, blobs: dict[str, bytes], delay: float = 0.0
) -> tuple[web.AppRunner, str]:
    """A peer that answers ``/blob`` badly: "corrupt" (wrong bytes, right length),
    "error" (500), "slow" (trickles the body with ``delay`` between 64 KiB
    chunks), "hang" (never answers)."""

    async def blob(request: web.Request) -> web.StreamResponse:
        hex_ = request.match_info["digest"].removeprefix("sha256:")
        data = blobs.get(hex_)
        if behaviour == "error":
            return web.Response(status=500, text="broken peer")
        if behaviour == "hang":
            await asyncio.sleep(3600)
        if data is None:
            return web.json_response({"error": "not_found", "detail": "-"}, status=404)
        if behaviour == "corrupt":
            data = bytes(b ^ 0x55 for b in data[:16]) + data[16:]
        resp = web.StreamResponse(headers={"X-Cache-Tier": "L2"})
        resp.content_length = len(data)
        await resp.prepare(request)
        for i in range(0, len(data), 65536):
            await resp.write(data[i : i + 65536])
            if behaviour == "slow":
                await asyncio.sleep(delay)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/blob/{digest}", blob)
    return await start_server(app)


# -- stacks of real services ---------------------------------------------------------


@dataclass
class Stack:
    """Peers and agents of cachesvc, each a real aiohttp server on loopback."""

    origin: str
    s3_endpoint: str | None
    root: Path
    peers: list[str] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)
    apps: dict[str, web.Application] = field(default_factory=dict)
    _runners: dict[str, web.AppRunner] = field(default_factory=dict)

    def settings(self, name: str, port: int, **kw: Any) -> Settings:
        values: dict[str, Any] = {
            "listen": ("127.0.0.1", port),
            "cache_dir": self.root / name,
            "cache_size": 1 << 30,
            "origin": self.origin,
            "s3_endpoint": self.s3_endpoint,
            "origin_timeout": 10.0,
            "peer_read_timeout": 5.0,
        }
        values.update(kw)
        return Settings(**values)

    async def start_peers(self, n: int, **kw: Any) -> list[str]:
        from cachesvc.peer import make_app

        ports = [free_port() for _ in range(n)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for i, port in enumerate(ports):
            settings = self.settings(
                f"peer-{len(self.peers)}", port, peers=",".join(urls), advertise=urls[i], **kw
            )
            await self._start(urls[i], make_app(settings), port)
        self.peers += urls
        return urls

    async def start_agent(self, peers: list[str] | None = None, **kw: Any) -> str:
        from node_agent.app import make_app

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        name = kw.pop("name", f"agent-{len(self.agents)}")
        peer_list = ",".join(self.peers if peers is None else peers)
        settings = self.settings(
            name, port, peers=peer_list, code_dir=self.root / f"{name}-code", **kw
        )
        await self._start(url, make_app(settings), port)
        self.agents.append(url)
        return url

    async def _start(self, url: str, app: web.Application, port: int) -> None:
        self.apps[url] = app
        self._runners[url], _ = await start_server(app, port)

    async def stop(self, url: str) -> None:
        runner = self._runners.pop(url)
        await runner.cleanup()

    async def restart(self, url: str) -> None:
        """Stop, then start the same app settings again on the same port."""
        from cachesvc.peer import make_app as make_peer
        from cachesvc.service import SETTINGS
        from node_agent.app import make_app as make_agent

        settings = self.apps[url][SETTINGS]
        await self.stop(url)
        factory = make_agent if url in self.agents else make_peer
        await self._start(url, factory(settings), settings.listen[1])

    async def close(self) -> None:
        for url in list(self._runners):
            await self.stop(url)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples matching the labels, from Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def store_files(root: Path) -> list[str]:
    """Every file under a store root except the index (for 'nothing partial' checks)."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        if "index" in Path(dirpath).parts:
            continue
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(out)


Fetcher = Callable[..., Any]

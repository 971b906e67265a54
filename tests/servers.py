"""Real servers for the tests: moto's S3 server, a counting (and on demand
misbehaving) proxy in front of it, misbehaving peers, and in-process stacks of
peers and agents on loopback ports.

Fakes here are real HTTP servers that misbehave; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from aiohttp import web

from cachesvc.config import Settings
from cachesvc.digest import Digest
from loadtest.origin_proxy import S3Proxy as S3Proxy  # re-exported: the tests' S3 proxy
from loadtest.origin_proxy import start_server as start_server
from tests.http import get

if TYPE_CHECKING:
    from cachesvc.serve.fastpath import HitProtocol

T = TypeVar("T")


@overload
async def eventually(
    check: Callable[[], Awaitable[T | None]], what: str, timeout: float = ..., step: float = ...
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T | None], what: str, timeout: float = ..., step: float = ...
) -> T: ...


async def eventually(
    check: Callable[[], object],
    what: str,
    timeout: float = 30.0,
    step: float = 0.02,
) -> Any:
    """The first truthy answer of ``check`` (sync or async), polled every
    ``step`` seconds; AssertionError naming ``what`` after ``timeout`` seconds.
    Bounded by the clock, not by a count, so a loaded machine only makes a
    test slower, never wrong: the timeout is for things that never happen."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if inspect.isawaitable(answer):
            answer = await answer
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(step)


def eventually_sync(
    check: Callable[[], T | None], what: str, timeout: float = 30.0, step: float = 0.02
) -> T:
    """``eventually`` for a test that runs no event loop of its own (the
    process tests drive their services synchronously): the same wait, on a
    loop of its own, with ``check`` called in a thread (where it may run a
    loop of its own in turn, e.g. ``asyncio.run(get(url))``)."""
    return asyncio.run(eventually(lambda: asyncio.to_thread(check), what, timeout, step))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive loopback ports that are all free now."""
    for _ in range(50):
        base = free_port()
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no run of {n} free ports found")


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes (compressible: blocks repeat; use os.urandom when that matters)."""
    out = bytearray()
    block = hashlib.sha256(f"seed-{seed}".encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest())


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
        from cachesvc.peer.app import make_app

        ports = [free_port() for _ in range(n)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for i, port in enumerate(ports):
            settings = self.settings(  # one cache dir each (they all shared peer-0 before)
                f"peer-{len(self.peers) + i}", port, peers=",".join(urls), advertise=urls[i], **kw
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
        kw.setdefault("code_dir", self.code_dir(name))
        kw.setdefault("advertise", url)  # reachable by other agents: fan-out on
        settings = self.settings(name, port, peers=peer_list, **kw)
        await self._start(url, make_app(settings), port)
        self.agents.append(url)
        return url

    def code_dir(self, name: str = "agent-0") -> Path:
        """Where the agent ``name`` unpacks (its default ``code_dir``)."""
        return self.root / f"{name}-code"

    def code_entries(self, name: str = "agent-0") -> set[str]:
        """What the agent's code dir holds but for its own lock file (empty
        before the agent made it)."""
        root = self.code_dir(name)
        return set(os.listdir(root)) - {".lock"} if root.exists() else set()

    async def _start(self, url: str, app: web.Application, port: int) -> None:
        """As the command runs it (agents get the L1-hit fast path)."""
        from cachesvc.serve.runner import start_app

        self.apps[url] = app
        self._runners[url] = await start_app(app, "127.0.0.1", port, grace=5.0)

    async def stop(self, url: str) -> None:
        runner = self._runners.pop(url)
        await runner.cleanup()

    def hit_connections(self, url: str) -> list[HitProtocol]:
        """The connections the agent at ``url`` holds on its L1-hit fast path."""
        from cachesvc.serve.runner import FastSite

        return [
            conn
            for site in self._runners[url].sites
            if isinstance(site, FastSite) and site.hit_server is not None
            for conn in site.hit_server.connections
        ]

    async def kill(self, url: str) -> None:
        """Like a crash: every open connection is cut at once (no graceful
        drain), then the server is gone."""
        hits = self.hit_connections(url)
        runner = self._runners.pop(url)
        transports = [h.transport for h in runner.server.connections] if runner.server else []
        transports += [c.transport for c in hits]
        for transport in transports:
            if transport is not None:
                transport.abort()
        await runner.cleanup()

    async def restart(self, url: str, meanwhile: Callable[[Settings], None] | None = None) -> None:
        """Stop, then start the same app settings again on the same port;
        ``meanwhile(settings)`` runs while it is stopped (e.g. to damage its disk)."""
        from cachesvc.peer.app import make_app as make_peer
        from cachesvc.serve.service import SETTINGS
        from node_agent.app import make_app as make_agent

        settings = self.apps[url][SETTINGS]
        await self.stop(url)
        if meanwhile is not None:
            meanwhile(settings)
        factory = make_agent if url in self.agents else make_peer
        await self._start(url, factory(settings), settings.listen[1])

    async def close(self) -> None:
        for url in list(self._runners):
            await self.stop(url)


def flip_byte(path: Path, offset: int) -> None:
    """Rot: one bit of the file at ``path`` flipped (blobs are read-only:
    made writable first; root would not need it, do not rely on it)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


async def metrics_of(url: str) -> str:
    """The Prometheus text a service at ``url`` exposes now."""
    return (await get(f"{url}/metrics")).body.decode()


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
    """Every file under a store root except the index and the owner's lock
    (for 'nothing partial' checks)."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        if "index" in Path(dirpath).parts:
            continue
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(f for f in out if f != ".lock")

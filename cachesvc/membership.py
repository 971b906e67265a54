"""Where the list of L2 peers comes from, kept up to date in a :class:`Ring`.

``--peers`` is either a comma-separated list of base URLs (static), or
``dns+http://NAME:PORT``: NAME is resolved to all its addresses (a Kubernetes
headless Service has one per ready pod) and re-resolved every ``interval``
seconds; each change is pushed into the ring. A failed lookup keeps the last
known membership (a DNS hiccup must not empty the ring). This module does not
choose owners.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlparse

from cachesvc.ring import Ring

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]


def parse_peers(spec: str) -> tuple[list[str], tuple[str, int] | None]:
    """Split ``--peers``: (static URLs, or ``(name, port)`` to follow by DNS)."""
    spec = spec.strip()
    if not spec:
        return [], None
    if spec.startswith("dns+http://"):
        parsed = urlparse(spec[len("dns+") :])
        if not parsed.hostname or not parsed.port:
            raise ValueError(f"--peers {spec!r}: expected dns+http://NAME:PORT")
        return [], (parsed.hostname, parsed.port)
    urls = [u.strip().rstrip("/") for u in spec.split(",") if u.strip()]
    for url in urls:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"--peers: {url!r} is not an http(s)://HOST:PORT URL")
    return urls, None


def peer_url(address: str, port: int) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"http://{host}:{port}"


async def resolve_all(name: str, port: int) -> list[str]:
    """Every address NAME resolves to, as peer base URLs (sorted, unique)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({peer_url(str(info[4][0]), port) for info in infos})


class Membership:
    """Feeds a :class:`Ring` from ``--peers``; :meth:`start` follows DNS names."""

    def __init__(
        self,
        ring: Ring,
        spec: str,
        interval: float = 10.0,
        resolver: Resolver = resolve_all,
    ) -> None:
        self.ring = ring
        self.static, self.dns = parse_peers(spec)
        self.interval = interval
        self._resolver = resolver
        self._task: asyncio.Task[None] | None = None
        if self.static:
            ring.set_nodes(self.static)

    async def refresh(self) -> None:
        """Resolve once and update the ring; keeps the old list on failure."""
        if self.dns is None:
            return
        name, port = self.dns
        try:
            async with asyncio.timeout(5.0):
                urls = await self._resolver(name, port)
        except (OSError, TimeoutError) as exc:
            log.warning(
                "membership: resolving %s failed (%s); keeping %d peers",
                name,
                exc,
                len(self.ring.nodes),
            )
            return
        if urls and self.ring.set_nodes(urls):
            log.info("membership: %s -> %s", name, ", ".join(urls))

    async def start(self) -> None:
        await self.refresh()
        if self.dns is not None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

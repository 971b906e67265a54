"""The list of L2 peers, kept up to date in a :class:`~cachesvc.upstream.ring.Ring`,
and the one validator of ``--peers`` and of base URLs. Does not choose owners.

* ``--peers`` is static base URLs, or one ``dns+http://NAME:PORT`` resolved
  to all its addresses and re-resolved every ``interval``; each change is
  pushed into the ring.
* A failed, slow (5 s) or empty lookup keeps the last membership: a DNS hiccup never
  empties the ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable

from cachesvc.upstream.ring import Ring

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]


SCHEMES = ("http", "https")  # https: aiohttp's client verifies against the system CAs
PEERS_FORMS = "use http://HOST:PORT,... or dns+http://NAME:PORT"
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def parse_peers(spec: str) -> tuple[list[str], tuple[str, int] | None]:
    """Split ``--peers``: (static base URLs, or ``(name, port)`` to follow by DNS).

    The one validator of peer lists (services, ``warm``, ``publish --warm``):
    each entry is ``http://HOST:PORT`` (or ``https://``), or the whole list is
    one ``dns+http://NAME:PORT``; no path, query, fragment or user info, the
    port 1-65535, the host an IP address or a DNS name, no entry twice. Empty
    entries (a trailing comma) are skipped. Raises ValueError naming the entry
    and what is wrong with it.
    """
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    dns = [e for e in entries if e.lower().startswith("dns+")]
    if dns and len(entries) > 1:
        raise ValueError(f"{dns[0]!r} must be the only entry; {PEERS_FORMS}")
    if dns:
        return [], _host_port(dns[0], ("dns+http",), PEERS_FORMS)
    urls = []
    for entry in entries:
        try:
            urls.append(parse_base_url(entry, PEERS_FORMS))
        except ValueError as exc:
            raise ValueError(f"entry {entry!r}: {exc}" if len(entries) > 1 else str(exc)) from None
    twice = sorted({u for u in urls if urls.count(u) > 1})
    if twice:
        raise ValueError(f"{twice[0]!r} is listed twice; {PEERS_FORMS}")
    return urls, None


def peer_list(spec: str) -> str:
    """``--peers`` checked by :func:`parse_peers`, as the services will read it."""
    static, dns = parse_peers(spec)
    return spec.strip() if dns is not None else ",".join(static)


def parse_base_url(text: str, forms: str = "use http://HOST:PORT") -> str:
    """A cachesvc service's base URL (a peer, ``--advertise``, an agent):
    ``http[s]://HOST:PORT`` with an optional trailing ``/``, which is dropped."""
    _host_port(text, SCHEMES, forms)
    return text.strip().rstrip("/")


def _host_port(text: str, schemes: tuple[str, ...], forms: str) -> tuple[str, int]:
    """Check ``SCHEME://HOST:PORT[/]`` piece by piece; ValueError says which piece."""
    raw = text.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        raise ValueError(f"no scheme; {forms}")
    if scheme.lower() not in schemes:
        allowed = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"scheme {scheme}:// is not {allowed}; {forms}")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    if tail not in ("", "/"):
        raise ValueError(f"a path, query or fragment ({tail!r}) is not allowed; {forms}")
    if "@" in netloc:
        raise ValueError(f"user info ({netloc.rpartition('@')[0]!r}) is not allowed; {forms}")
    return _split_host_port(netloc, forms)


def _split_host_port(netloc: str, forms: str) -> tuple[str, int]:
    m = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]*)(?::(.*))?", netloc)
    if m is None or not m[1]:
        raise ValueError(f"no host; {forms}")
    host = m[1]
    if not _valid_host(host):
        raise ValueError(f"host {host!r} is not an IP address or host name; {forms}")
    if m[2] is None:
        raise ValueError(f"no port; {forms}")
    if not re.fullmatch(r"[0-9]{1,5}", m[2]) or not 1 <= int(m[2]) <= 65535:
        raise ValueError(f"port {m[2]!r} is not a number from 1 to 65535; {forms}")
    return host.strip("[]"), int(m[2])


def _valid_host(host: str) -> bool:
    """An IPv4 address, a bracketed IPv6 address, or a DNS name (RFC 1123 labels)."""
    if host.startswith("["):
        try:
            return ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            return False
    name = host[:-1] if host.endswith(".") else host
    if re.fullmatch(r"[0-9.]+", name):  # looks like IPv4: must be one (not 10.0.0.300)
        try:
            return ipaddress.ip_address(name).version == 4
        except ValueError:
            return False
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


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

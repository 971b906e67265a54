"""The client side of ``/blob/{digest}``: how an agent asks an L2 peer.

Every request carries the peer token (when set) and ``X-Cachesvc-Forwarded:
1``; a peer never forwards a marked request again (peers read only from the
origin), so ring disagreements cannot loop. Timeouts: a short connect timeout
(a dead peer costs little), a header timeout long enough for the peer's own
origin fetch (so a slow-but-alive owner is waited for, never bypassed on a
timer), and an idle-read timeout. Every failure but an authoritative 404 is a
:class:`PeerFailed`; the bytes are not trusted here (the flight verifies them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from cachesvc.digest import Digest
from cachesvc.errors import NotFound, PeerFailed
from cachesvc.origin import Body

FORWARDED = "X-Cachesvc-Forwarded"
CHUNK = 256 * 1024


class PeerClient:
    """One HTTP session shared by every request to every peer."""

    def __init__(
        self,
        token: str | None = None,
        connect_timeout: float = 1.0,
        header_timeout: float = 40.0,
        read_timeout: float = 30.0,
    ) -> None:
        self._headers = {FORWARDED: "1"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._connect_timeout = connect_timeout
        self._header_timeout = header_timeout
        self._read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=10),
                auto_decompress=False,
            )
        return self._session

    def _timeout(self) -> aiohttp.ClientTimeout:
        # No sock_read here: aiohttp would apply it to the wait for headers too,
        # and an owner waiting on its own origin fetch must not be bypassed on a
        # timer. Headers get header_timeout; body reads get read_timeout each.
        return aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)

    @asynccontextmanager
    async def open(self, peer: str, digest: Digest, offset: int = 0) -> AsyncIterator[Body]:
        """GET the blob from ``peer`` starting at ``offset``."""
        headers = dict(self._headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        what = f"GET {peer}/blob/{digest.short}"
        try:
            async with asyncio.timeout(self._header_timeout):
                resp = await self._client().get(
                    f"{peer}/blob/{digest.hex}", headers=headers, timeout=self._timeout()
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PeerFailed(f"{what}: {type(exc).__name__}: {exc}") from exc
        try:
            size = _check(resp, what, offset)
            yield Body(size, offset, _chunks(resp, what, self._read_timeout))
        finally:
            resp.release()

    async def head(self, peer: str, digest: Digest) -> int:
        what = f"HEAD {peer}/blob/{digest.short}"
        try:
            async with asyncio.timeout(self._header_timeout):
                resp = await self._client().head(
                    f"{peer}/blob/{digest.hex}", headers=self._headers, timeout=self._timeout()
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PeerFailed(f"{what}: {type(exc).__name__}: {exc}") from exc
        resp.release()
        return _check(resp, what, 0)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _check(resp: aiohttp.ClientResponse, what: str, offset: int) -> int:
    """Status → size of the whole package, or the error to raise."""
    if resp.status == 404:
        raise NotFound(f"{what}: the peer and the origin do not have it")
    expected = 206 if offset else 200
    if resp.status != expected:
        raise PeerFailed(f"{what}: answered {resp.status}")
    if offset:
        content_range = resp.headers.get("Content-Range", "")
        total = content_range.rsplit("/", 1)[-1]
        if not content_range.startswith(f"bytes {offset}-") or not total.isdigit():
            raise PeerFailed(f"{what}: bad Content-Range {content_range!r}")
        return int(total)
    if resp.content_length is None:
        raise PeerFailed(f"{what}: no Content-Length")
    return resp.content_length


async def _chunks(resp: aiohttp.ClientResponse, what: str, idle: float) -> AsyncIterator[bytes]:
    """The body in chunks; a peer silent for ``idle`` seconds mid-body has failed."""
    try:
        while True:
            async with asyncio.timeout(idle):
                chunk = await resp.content.read(CHUNK)
            if not chunk:
                return
            yield chunk
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise PeerFailed(f"{what}: body broke off: {type(exc).__name__}: {exc}") from exc

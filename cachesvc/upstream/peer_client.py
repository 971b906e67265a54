"""The client side of another cachesvc host: an agent's ``GET /blob/{digest}`` to
an L2 peer (which may answer 307 naming a fan-out parent: :class:`Redirect`),
and its ``GET /pkg/{digest}`` to such a parent agent. Does not trust the bytes
(the flight's ingest verifies them).

* Every request carries ``X-Cachesvc-Forwarded: 1`` and the peer token when set.
* Timeouts: a short connect, headers long enough for the peer's own origin
  fetch (a slow owner is never bypassed on a timer), an idle read per chunk.
* Only a peer's 404 is final (``NotFound``); every other failure, and any
  404 from an agent, is a ``PeerFailed`` quoting the answer's reason, bounded
  and made one printable line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import aiohttp

from cachesvc.digest import Digest
from cachesvc.errors import NotFound, PeerFailed
from cachesvc.upstream.origin import range_total
from cachesvc.upstream.source import Body

FORWARDED = "X-Cachesvc-Forwarded"
PARENT = "X-Cachesvc-Parent"  # on a 307 from a peer: the host to fetch from (fan-out)
VIA = "X-Cachesvc-Via"  # on an agent's answer: itself, then the agents its bytes come through
READ_BUFSIZE = 4 << 20  # aiohttp's read buffer (default 64 KiB pauses the socket often)
REASON_BODY_MAX = 64 * 1024  # bytes of an error answer read, at most (JSON cut short is text)
REASON_MAX = 500  # characters of it quoted in the PeerFailed text, at most
REASON_READ_TIMEOUT = 2.0  # seconds to read it: a peer that stalls here has failed anyway


class Redirect(Exception):
    """The owner peer answered "fetch it from this host instead" (fan-out)."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.host = host


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
                read_bufsize=READ_BUFSIZE,
            )
        return self._session

    def _timeout(self) -> aiohttp.ClientTimeout:
        # No sock_read here: aiohttp would apply it to the wait for headers too,
        # and an owner waiting on its own origin fetch must not be bypassed on a
        # timer. Headers get header_timeout; body reads get read_timeout each.
        return aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)

    @asynccontextmanager
    async def open(
        self, peer: str, digest: Digest, offset: int = 0, extra: Mapping[str, str] | None = None
    ) -> AsyncIterator[Body]:
        """GET the blob from the L2 ``peer`` starting at ``offset``. A 404 is
        authoritative (:class:`NotFound`); a fan-out redirect raises
        :class:`Redirect` naming the host to fetch from instead."""
        url = f"{peer}/blob/{digest.hex}"
        async with self._open(url, f"GET {peer}/blob/{digest.short}", offset, extra, True) as body:
            yield body

    @asynccontextmanager
    async def open_host(
        self, host: str, digest: Digest, offset: int = 0, extra: Mapping[str, str] | None = None
    ) -> AsyncIterator[Body]:
        """GET the package from another agent (fan-out). Every failure, a 404
        included, is a :class:`PeerFailed`: only the owner's answer is final."""
        url = f"{host}/pkg/{digest.hex}"
        async with self._open(url, f"GET {host}/pkg/{digest.short}", offset, extra, False) as body:
            yield body

    @asynccontextmanager
    async def _open(
        self, url: str, what: str, offset: int, extra: Mapping[str, str] | None, final_404: bool
    ) -> AsyncIterator[Body]:
        headers = {**self._headers, **(extra or {})}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            async with asyncio.timeout(self._header_timeout):
                resp = await self._client().get(
                    url, headers=headers, timeout=self._timeout(), allow_redirects=False
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PeerFailed(f"{what}: {type(exc).__name__}: {exc}") from exc
        try:
            if resp.status == 307 and PARENT in resp.headers:
                raise Redirect(resp.headers[PARENT])
            if resp.status == 404 and not final_404:
                raise PeerFailed(f"{what}: {await _reason(resp)}")
            size = await _check(resp, what, offset)
            via = tuple(h for h in resp.headers.get(VIA, "").split(",") if h)
            yield Body(size, offset, _chunks(resp, what, self._read_timeout), via)
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
        try:
            return await _check(resp, what, 0)
        finally:
            resp.release()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _check(resp: aiohttp.ClientResponse, what: str, offset: int) -> int:
    """Status → size of the whole package, or the error to raise."""
    if resp.status == 404:
        raise NotFound(f"{what}: the peer and the origin do not have it")
    expected = 206 if offset else 200
    if resp.status != expected:
        raise PeerFailed(f"{what}: {await _reason(resp)}")
    if offset:
        content_range = resp.headers.get("Content-Range", "")
        total = range_total(content_range, offset)
        if total is None:
            raise PeerFailed(f"{what}: bad Content-Range {content_range!r}")
        return total
    if resp.content_length is None:
        raise PeerFailed(f"{what}: no Content-Length")
    return resp.content_length


async def _reason(resp: aiohttp.ClientResponse) -> str:
    """``answered 502 upstream_error: <detail>``: the status and what the body
    says — the contract's JSON error as ``<error>: <detail>``, any other body
    (a proxy's error page) as text.

    Bounded: at most :data:`REASON_BODY_MAX` bytes read within
    :data:`REASON_READ_TIMEOUT`, at most :data:`REASON_MAX` characters kept,
    one line of printable characters (a peer's text goes into our log lines).
    """
    text = f"answered {resp.status}"
    if resp.method == "HEAD":
        return text
    said = _one_line(await _read_bounded(resp))
    if len(said) > REASON_MAX:
        said = said[: REASON_MAX - 1] + "…"
    return f"{text} {said}" if said else text


async def _read_bounded(resp: aiohttp.ClientResponse) -> str:
    raw = b""
    try:
        async with asyncio.timeout(REASON_READ_TIMEOUT):
            # read(n) returns what has arrived, up to n: loop to the end or the bound
            while len(raw) < REASON_BODY_MAX:
                chunk = await resp.content.read(REASON_BODY_MAX - len(raw))
                if not chunk:
                    break
                raw += chunk
    except (aiohttp.ClientError, OSError, TimeoutError):
        pass  # quote what did arrive
    try:
        body = json.loads(raw)
        return f"{body['error']}: {body.get('detail', '')}"
    except (ValueError, TypeError, KeyError, AttributeError):
        return raw.decode("utf-8", "replace")


def _one_line(text: str) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


async def _chunks(resp: aiohttp.ClientResponse, what: str, idle: float) -> AsyncIterator[bytes]:
    """The body in chunks; a peer silent for ``idle`` seconds mid-body has failed."""
    try:
        while True:
            async with asyncio.timeout(idle):
                chunk, _ = await resp.content.readchunk()  # as received: no join, no copy
            if not chunk:
                return
            yield chunk
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise PeerFailed(f"{what}: body broke off: {type(exc).__name__}: {exc}") from exc

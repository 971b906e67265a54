"""HTTP calls for the tests, one set: ``request`` (any method, a JSON or raw
body, a bearer token, a timeout); ``get``, ``get_json``, ``post_json`` and
``head`` as a test reads a response; and ``fetch``, a package GET as a
runtime sees it (a body cut short is None; retried as a runtime would).

Bodies are never decompressed (``auto_decompress=False``): a test sees the
bytes on the wire. Header names are case-insensitive.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from typing import Any, NamedTuple

import aiohttp
from aiohttp.client import DEFAULT_TIMEOUT
from multidict import CIMultiDict
from yarl import URL

TIER = "X-Cache-Tier"


class Reply(NamedTuple):
    """One whole response; unpacks as ``status, headers, body``."""

    status: int
    headers: CIMultiDict[str]  # a copy: a test may pop what differs (Date)
    body: bytes

    def json(self) -> Any:
        """The body as JSON, whatever the Content-Type says."""
        return jsonlib.loads(self.body)


class Fetched(NamedTuple):
    """A package GET as a runtime sees it: ``status, tier, body``, the body
    None when the connection was cut short."""

    status: int
    tier: str
    body: bytes | None

    @property
    def received(self) -> tuple[int, bytes | None]:
        """(status, body): what the caller holds, whichever tier served it."""
        return self.status, self.body


async def request(
    method: str,
    url: str | URL,
    *,
    headers: dict[str, str] | None = None,
    json: object = None,
    data: str | bytes | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> Reply:
    """One request on a fresh session; the whole body read (a body cut short
    raises ``aiohttp.ClientPayloadError``). ``token`` is sent as a bearer
    token; ``timeout`` bounds the whole exchange (aiohttp's 5 minutes if None)."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    bound = DEFAULT_TIMEOUT if timeout is None else aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(auto_decompress=False, timeout=bound) as s,
        s.request(method, url, headers=sent, json=json, data=data) as r,
    ):
        return Reply(r.status, CIMultiDict(r.headers), await r.read())


async def get(url: str | URL, **headers: str) -> Reply:
    return await request("GET", url, headers=headers)


async def get_json(url: str, **headers: str) -> tuple[int, Any]:
    """(status, JSON body) of a GET of one of the service's JSON answers
    (/stats, /readyz, a contract error)."""
    reply = await get(url, **headers)
    return reply.status, reply.json()


async def post_json(
    url: str, body: object = None, token: str | None = None, timeout: float | None = None
) -> tuple[int, Any]:
    """(status, JSON answer) of a POST (an unpack, a warm job)."""
    reply = await request("POST", url, json=body, token=token, timeout=timeout)
    return reply.status, reply.json()


async def head(url: str, **headers: str) -> Reply:
    return await request("HEAD", url, headers=headers)


async def fetch(url: str, attempts: int = 1, **headers: str) -> Fetched:
    """GET a package as a runtime does: up to ``attempts`` tries, 0.2 s apart
    (the runtime's back-off, not a wait for anything), until a whole 200."""
    got = await _fetch_once(url, headers)
    for _ in range(attempts - 1):
        if got.status == 200 and got.body is not None:
            break
        await asyncio.sleep(0.2)
        got = await _fetch_once(url, headers)
    return got


async def _fetch_once(url: str, headers: dict[str, str]) -> Fetched:
    async with aiohttp.ClientSession(auto_decompress=False) as s, s.get(url, headers=headers) as r:
        try:
            body: bytes | None = await r.read()
        except aiohttp.ClientPayloadError:
            body = None
        return Fetched(r.status, r.headers.get(TIER, ""), body)

"""A storm of GETs that checks every body: N connections opened first, then
every request written in one pass of the event loop, so they start within
microseconds of each other (``shared/STACK.md``: separate client processes
do not arrive at once). Each body is hashed as it arrives and compared with
the digest the caller expects: a wrong, short or refused body is a bad body.

Timings per request, from the moment all requests were written: ``ttfb``
(the response head arrived) and ``total`` (the last body byte). Headers are
parsed by :func:`http.client.parse_headers`, not by hand.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import io
import time
from dataclasses import dataclass

READ = 1 << 20  # bytes per read: large enough that Python costs little per byte
HEAD_LIMIT = 64 * 1024  # a response head larger than this is refused


@dataclass
class Fetch:
    """One GET of the storm and what came back."""

    port: int
    path: str
    expect: str  # sha256 hex the body must have
    status: int = 0
    tier: str = ""
    length: int = -1
    received: int = 0
    sha256: str = ""
    ttfb: float = float("nan")
    total: float = float("nan")
    error: str = ""

    @property
    def good(self) -> bool:
        return not self.error and self.status == 200 and self.sha256 == self.expect


@dataclass
class Storm:
    fetches: list[Fetch]
    started_wall: float  # time.time() when the requests were written

    @property
    def bad(self) -> int:
        return sum(not f.good for f in self.fetches)


async def storm(fetches: list[Fetch], timeout: float, host: str = "127.0.0.1") -> Storm:
    """Run every fetch at once; never raises for a failed fetch (it is recorded)."""
    conns = await asyncio.gather(
        *(asyncio.open_connection(host, f.port, limit=HEAD_LIMIT) for f in fetches)
    )
    started, wall = time.perf_counter(), time.time()
    for f, (_, writer) in zip(fetches, conns, strict=True):
        writer.write(f"GET {f.path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(
                *(_read(f, r, started) for f, (r, _) in zip(fetches, conns, strict=True))
            )
    except TimeoutError:
        for f in fetches:
            f.error = f.error or f"no complete answer within {timeout:.0f} s"
    finally:
        for _, writer in conns:
            writer.close()
    return Storm(fetches, wall)


async def _read(f: Fetch, reader: asyncio.StreamReader, started: float) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        f.ttfb = time.perf_counter() - started
        _parse_head(f, head)
        await _read_body(f, reader)
        f.total = time.perf_counter() - started
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        f.error = f"GET :{f.port}{f.path}: {type(exc).__name__}: {exc}"


def _parse_head(f: Fetch, head: bytes) -> None:
    status_line, _, rest = head.partition(b"\r\n")
    f.status = int(status_line.split()[1])
    headers = http.client.parse_headers(io.BytesIO(rest))
    f.tier = headers.get("X-Cache-Tier", "")
    f.length = int(headers.get("Content-Length", "-1"))
    if f.status != 200:
        f.error = f"GET :{f.port}{f.path}: status {f.status}"


async def _read_body(f: Fetch, reader: asyncio.StreamReader) -> None:
    digest = hashlib.sha256()
    while f.length < 0 or f.received < f.length:  # ends: every read adds bytes or breaks
        part = await reader.read(READ if f.length < 0 else min(READ, f.length - f.received))
        if not part:
            break
        digest.update(part)
        f.received += len(part)
    f.sha256 = digest.hexdigest()
    if f.received != f.length:
        f.error = f.error or f"GET :{f.port}{f.path}: body of {f.received} of {f.length} bytes"
    elif f.sha256 != f.expect and not f.error:
        f.error = f"GET :{f.port}{f.path}: body sha256 {f.sha256[:12]}…, not {f.expect[:12]}…"

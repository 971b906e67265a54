"""Web pieces shared by the agent and the peer: the edge of the HTTP world.

* :func:`route_digest`: the route parameter becomes a :class:`Digest` here.
* :func:`error_middleware`: contract errors (and aiohttp's own 404/405/...)
  become ``{"error", "detail"}`` JSON; unexpected exceptions a logged 500;
  HTTP versions other than 1.0 and 1.1 a 505 that closes the connection.
* :func:`refuse_unrouted`: the answer of a catch-all route: 405 with ``Allow``
  when another route takes the path with other methods, else 400
  ``invalid_digest``.
* :func:`serve_package`: the package response, written once for ``/pkg`` and
  ``/blob``: strong ``"sha256:<hex>"`` ETag and 304 (RFC 9110 §13.1.2), a
  single byte range → 206/416 (§14), HEAD without a body download, and the body
  as the spans of the :class:`~cachesvc.readpath.package.Package` that
  :meth:`Tiers.open` yields: ``sendfile`` for file spans, writes for bytes.
  This module never steps the flight protocol: it writes what it is given.

Why not ``web.FileResponse``: it sets its own mtime-size ETag and re-opens the
path on every request (2.5x the per-request cost here, and an eviction between
lookup and open becomes a 404). After ``prepare()`` a failure can only abort:
the transport is closed so the client sees a short body, never a complete one.
The package's spans hold back the last byte of every body until the digest checks.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from functools import partial
from typing import NoReturn, TypeVar

from aiohttp import HttpVersion10, HttpVersion11, web

from cachesvc.digest import Digest
from cachesvc.errors import (
    CachesvcError,
    InvalidDigest,
    MethodNotAllowed,
    Overloaded,
    RangeNotSatisfiable,
    VersionNotSupported,
)
from cachesvc.metrics import Metrics
from cachesvc.readpath.package import SMALL, FileSpan, Package, Span
from cachesvc.readpath.tiers import Tiers
from cachesvc.serve.egress import TokenBucket
from cachesvc.tier import Tier
from cachesvc.upstream.peer_client import FORWARDED

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_CONTROL = "public, max-age=31536000, immutable"
FALLBACK_CHUNK = 256 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def route_digest(request: web.Request) -> Digest:
    """The ``{digest}`` route parameter, parsed. Raw path is checked too, so an
    encoded slash or other escape (``%2F``) is refused, never decoded into a match."""
    raw = request.match_info.get("digest", "")
    if "%" in request.raw_path.split("?", 1)[0]:
        raise InvalidDigest(f"{request.raw_path!r}: percent-escapes are not allowed in digests")
    return Digest.parse(raw)


def json_error(status: int, code: str, detail: str, **headers: str) -> web.Response:
    body = json.dumps({"error": code, "detail": detail})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


_AIOHTTP_CODES = {404: "not_found", 405: "invalid_request", 413: "too_large"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.version not in (HttpVersion10, HttpVersion11):
            raise VersionNotSupported("{}.{}".format(*request.version))
        return await handler(request)
    except CachesvcError as exc:
        if isinstance(exc, Overloaded) and METRICS in request.app:
            request.app[METRICS].overloaded.inc()
        if exc.status >= 500:
            log.warning("%s %s: %s %s", request.method, request.path, exc.code, exc)
        resp = json_error(exc.status, exc.code, str(exc), **exc.headers)
        if exc.headers.get("Connection") == "close":
            resp.force_close()
        return resp
    except web.HTTPMethodNotAllowed as exc:  # no catch-all route under this path
        allowed = MethodNotAllowed(exc.method, sorted(exc.allowed_methods))
        return json_error(allowed.status, allowed.code, str(allowed), **allowed.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _AIOHTTP_CODES.get(exc.status, "invalid_request")
        return json_error(exc.status, code, exc.reason)
    except (ConnectionError, asyncio.CancelledError):
        raise  # the client went away: nothing to answer
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal", f"{type(exc).__name__}: {exc}")


async def refuse_unrouted(request: web.Request, usage: str) -> NoReturn:
    """The answer of a catch-all route (``/pkg/{rest:.*}``): the path does not
    name a resource with this method. When other routes take this path with other
    methods (``DELETE /pkg/{digest}``, ``GET /pkg/{digest}/unpack``), that is a
    405 with ``Allow``; otherwise the path is a malformed digest, a 400.

    Why ask the router: aiohttp answers 405 itself only when no route matches
    the path at all, and a catch-all always matches; listing each route's
    methods here again would drift from the routes.
    """
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise MethodNotAllowed(request.method, sorted(allowed))
    raise InvalidDigest(f"{request.path!r} does not name a digest: {usage}")


METRICS = web.AppKey("metrics", Metrics)


def timed(route: str, handler: Handler) -> Handler:
    """Observe ``cachesvc_request_seconds{route}`` for a handler."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        try:
            return await handler(request)
        finally:
            request.app[METRICS].request_seconds.labels(route).observe(time.perf_counter() - start)

    return wrapper


# -- the package response ------------------------------------------------------


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range as ``(start, end_exclusive)``; None means the
    whole body (no header, several ranges, or a syntax we ignore, RFC 9110 §14.2).
    Raises :class:`RangeNotSatisfiable`."""
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix: the last N bytes
        n = int(m[2])
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header!r} of a {size}-byte package", size)
        return max(0, size - n), size
    start = int(m[1])
    if m[2] and int(m[2]) < start:
        return None  # last before first: invalid, so ignored (RFC 9110 §14.1.1)
    end = min(int(m[2]) + 1, size) if m[2] else size
    if start >= size:
        raise RangeNotSatisfiable(f"range {header!r} of a {size}-byte package", size)
    return start, end


def _headers(digest: Digest, tier: Tier | None) -> dict[str, str]:
    headers = {
        "ETag": digest.etag,
        "Cache-Control": CACHE_CONTROL,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }
    if tier is not None:
        headers["X-Cache-Tier"] = tier
    return headers


def _not_modified(request: web.Request, digest: Digest) -> bool:
    tags = request.headers.get("If-None-Match")
    if not tags:
        return False
    return any(t.strip() in (digest.etag, "*", f"W/{digest.etag}") for t in tags.split(","))


def _start(
    request: web.Request, digest: Digest, size: int, tier: Tier
) -> tuple[int, dict[str, str], int, int]:
    """Status, headers and the byte span ``[start, end)`` for a body of ``size`` bytes."""
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != digest.etag:
        span = None  # another representation or a date: the whole package (RFC 9110 §13.1.5)
    else:
        span = parse_range(request.headers.get("Range"), size)
    headers = _headers(digest, tier)
    start, end = span if span is not None else (0, size)
    if span is None:
        return 200, headers, start, end
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return 206, headers, start, end


async def serve_package(
    request: web.Request, tiers: Tiers, egress: TokenBucket, digest: Digest
) -> web.StreamResponse:
    """GET/HEAD of a package from this service's tiers."""
    if _not_modified(request, digest):
        # A precondition applies only where the answer would be 2xx (RFC 9110
        # §13.2.1): a package no tier has is still a 404. HEAD costs no body.
        if digest not in tiers.store and tiers.flights.get(digest) is None:
            await tiers.head(digest)
        return web.Response(status=304, headers=_headers(digest, None))
    if request.method == "HEAD":
        size, tier = await tiers.head(digest)
        resp = web.StreamResponse(headers=_headers(digest, tier))
        resp.content_length = size
        return resp
    return await tiers.deliver(digest, partial(send_package, request, tiers.metrics, egress))


async def send_package(
    request: web.Request,
    metrics: Metrics,
    egress: TokenBucket,
    package: Package,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """The package's bytes for this request's range, paced by ``egress``.

    Headers go out once the first span is ready (a failure before it is
    raised: nothing was answered, so :meth:`Tiers.deliver` may try the next
    source, else it becomes a JSON error; an empty body waits for the
    verdict), then every span; after that a failure aborts the connection. A
    body of at most :data:`SMALL` bytes is gathered first (so all of it is
    verified) and goes out with its headers in one write. A request is
    counted once answered. Bytes to another cachesvc host (a forwarded
    request) count as upload."""
    status, fields, start, end = _start(request, package.digest, package.size, package.tier)
    fields.update(headers or {})
    async with aclosing(package.spans(start, end)) as spans:
        if end - start <= SMALL:
            resp, whole = await _small(request, package, spans, status, fields, egress)
        else:
            resp = web.StreamResponse(status=status, headers=fields)
            resp.content_length = end - start
            whole = await _streamed(request, resp, package, spans, egress)
    metrics.requests.labels(package.tier).inc()
    if not whole:
        return resp  # aborted
    if FORWARDED in request.headers:
        metrics.upload_bytes.inc(end - start)
    metrics.bytes_served.labels(package.tier).inc(end - start)
    return resp


async def _small(
    request: web.Request,
    package: Package,
    spans: AsyncGenerator[Span, None],
    status: int,
    fields: dict[str, str],
    egress: TokenBucket,
) -> tuple[web.StreamResponse, bool]:
    """The whole (small) body, read before anything is sent, then one write
    with its headers; and whether it went out whole (False: aborted). The
    reads are bounded (at most :data:`SMALL` bytes of the page cache) and cost
    less on the loop than a thread hop would."""
    parts: list[bytes] = []
    async for span in spans:  # a failure here is still a JSON error
        try:
            parts.append(span if isinstance(span, bytes) else _pread(span))
        except OSError as exc:
            if isinstance(exc, ShortFile):  # the package's to drop, as the fast path does
                await package.cut_short(str(exc))
            log.warning("GET %s: aborting the response: %s", package.digest.short, exc)
            abort_stream(request)
            return web.Response(), False
    body = b"".join(parts)  # one part (a hit) is not copied
    await egress.take(len(body))
    return web.Response(status=status, body=body, headers=fields), True


async def _streamed(
    request: web.Request,
    resp: web.StreamResponse,
    package: Package,
    spans: AsyncGenerator[Span, None],
    egress: TokenBucket,
) -> bool:
    """Headers at the first span, then every span; False if it had to abort."""
    first = await anext(spans, None)

    async def rest() -> AsyncIterator[Span]:
        if first is not None:
            yield first
        async for span in spans:
            yield span

    write = partial(_write_span, request, resp, egress, package)
    return await stream_body(request, resp, rest(), write, f"GET {package.digest.short}")


async def stream_body(
    request: web.Request,
    resp: web.StreamResponse,
    body: AsyncIterator[T],
    write: Callable[[T], Awaitable[None]],
    what: str,
) -> bool:
    """Headers, then every piece of ``body`` through ``write``; a failure after
    the headers aborts the connection (a short body, never a complete one).
    Returns False if it had to abort."""
    await resp.prepare(request)
    try:
        async for piece in body:
            await write(piece)
    except (CachesvcError, OSError) as exc:
        log.warning("%s: aborting the response: %s", what, exc)
        abort_stream(request)
        return False
    await resp.write_eof()
    return True


class ShortFile(OSError):
    """A file span's file ended before the span did: it shrank on disk."""


def _pread(span: FileSpan) -> bytes:
    data = os.pread(span.file.fileno(), span.count, span.offset)
    if len(data) != span.count:
        end = span.offset + span.count
        raise ShortFile(f"its file ended at byte {span.offset + len(data)} of {end}")
    return data


async def _write_span(
    request: web.Request,
    resp: web.StreamResponse,
    egress: TokenBucket,
    package: Package,
    span: Span,
) -> None:
    """One span out: ``sendfile`` for file spans, in egress-sized slices when
    limited. A short file is the package's to drop (:meth:`Package.cut_short`,
    as the fast path drops it); the failure goes on, and the response aborts.
    (A plain ``try``, not a context manager: this runs for every span.)"""
    try:
        await _send_span(request, resp, egress, span)
    except ShortFile as exc:
        await package.cut_short(str(exc))
        raise


async def _send_span(
    request: web.Request, resp: web.StreamResponse, egress: TokenBucket, span: Span
) -> None:
    if isinstance(span, bytes):
        await egress.take(len(span))
        await resp.write(span)
    elif egress.unlimited:
        await _sendfile(request, resp, span.file, span.offset, span.count)
    else:
        offset = span.offset
        async for part in egress.paced(span.count):
            await _sendfile(request, resp, span.file, offset, part)
            offset += part


async def _sendfile(
    request: web.Request, resp: web.StreamResponse, file: io.FileIO, offset: int, count: int
) -> None:
    """Zero-copy: one direct ``sendfile(2)`` first, then the loop's machinery
    for whatever did not fit. Where the loop has no sendfile (uvloop, TLS),
    ``pread`` + write: never asyncio's fallback, which seeks the shared file
    object. Raises :class:`ShortFile` when the file holds fewer bytes than promised."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    sent = sendfile_now(transport, file, offset, count)
    if sent == count:
        return
    loop = asyncio.get_running_loop()
    try:
        sent += await loop.sendfile(transport, file, offset + sent, count - sent, fallback=False)
    except RuntimeError:  # no native sendfile: asyncio's SendfileNotAvailableError, uvloop's
        await _copy(resp, file, offset + sent, count - sent)  # "not implemented"; both subclass it
        return
    if sent != count:
        raise ShortFile(f"its file ended at byte {offset + sent} of {offset + count}")


def sendfile_now(transport: asyncio.Transport, file: io.FileIO, offset: int, count: int) -> int:
    """One non-blocking ``sendfile(2)`` straight on the socket, when nothing is
    queued ahead of it. ``loop.sendfile`` costs ~100 µs of Python and four
    ``epoll_ctl`` calls per response even when one syscall sends it all (measured:
    +60% hits/s at 16 KiB, -30% CPU per 1 MiB hit). Returns bytes sent."""
    if count == 0 or transport.get_write_buffer_size() or transport.get_extra_info("sslcontext"):
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return os.sendfile(sock.fileno(), file.fileno(), offset, count)
    except (BlockingIOError, InterruptedError):
        return 0


async def _copy(resp: web.StreamResponse, file: io.FileIO, offset: int, count: int) -> None:
    end = offset + count
    while offset < end:
        n = min(FALLBACK_CHUNK, end - offset)
        data = await asyncio.to_thread(os.pread, file.fileno(), n, offset)
        if not data:
            raise ShortFile(f"its file ended at byte {offset} of {end}")
        await resp.write(data)
        offset += len(data)


def abort_stream(request: web.Request) -> None:
    """Close the connection mid-body: the client sees a short, failed response."""
    if request.transport is not None:
        request.transport.abort()

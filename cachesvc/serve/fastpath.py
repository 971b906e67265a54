"""The hit fast path: plain ``GET`` of a hot, verified entry answered without
the web framework (``/pkg/<digest>`` on agents, ``/blob/<digest>`` on peers);
every other request goes to aiohttp.

A service's listening socket is served by :class:`HitProtocol` connections.
Each one reads a request head, has it parsed by ``httptools`` (llhttp, the
parser uvicorn uses: never by hand), and answers it itself only when all of
these hold: ``GET`` over HTTP/1.1, a head of CRLF lines within
:data:`MAX_HEAD` and :data:`MAX_FIELDS` with exactly one ``Host``, the path is exactly the
route's prefix and a digest (no query, no escapes), no body, no ``Range``, no
conditional or ``Expect`` header (nor, on agents, a request from another
cachesvc host: those are fan-out feeds), no egress limit, the route's own
check passes (:attr:`HitRoute.decide`: on peers the peer token, then the
fan-out tracker, which may answer a redirect instead), and the store has the
entry *open and verified* right now (:meth:`Store.lease_hot`: a synchronous
lookup, no thread hop). The answer is the same as aiohttp's path gives
(status, the contract's headers, the bytes by ``sendfile`` from the open
file), counted in the same metrics and handed to the same prefetch hook.
A request with ``Connection: close`` is answered, then the connection
closes (RFC 9112 §9.6: what the client sent after it is never read). A
request in an HTTP version other than 1.0 or 1.1 is refused here, ``505`` as
aiohttp's path refuses it, and the connection closes (aiohttp would answer it
in that version's name over HTTP/1.1 framing).

Anything else, at any point, hands the connection over: the protocol of the
transport becomes an aiohttp request handler, which receives every byte read
so far from the start of that request, so it answers exactly as if it had
owned the connection from the start (including the 400s for malformed
requests). A connection never comes back to the fast path.

Why: aiohttp spends ~50 µs of Python per request; for small packages that,
not the bytes, bounds hits per second (measured: 16 KiB hits ~17k/s through
aiohttp against ~48k/s here on the same machine). Rejected: hit-serving worker
processes on a ``SO_REUSEPORT`` port sharing the store, which need the store's
state (verified entries, LRU, pins, metrics) mirrored across processes and
misses passed between them, for less than this gains in one process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import NamedTuple

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError, InvalidDigest, VersionNotSupported
from cachesvc.fanout.parents import redirect_headers
from cachesvc.metrics import Metrics, observe_many
from cachesvc.readpath.package import SMALL
from cachesvc.serve.http import CACHE_CONTROL, sendfile_now
from cachesvc.store.castore import Blob, Store
from cachesvc.tier import Tier
from cachesvc.upstream.peer_client import FORWARDED

log = logging.getLogger(__name__)

# Heads the fast path leaves to aiohttp, whose parser refuses what exceeds its
# limits (8190 bytes a line or field, 128 fields): a hit's head is ~200 bytes.
MAX_HEAD = 8 << 10  # a head longer than this goes to aiohttp, whole or not
MAX_FIELDS = 64  # a head with more header fields goes to aiohttp
IDLE_TIMEOUT = 75.0  # seconds a keep-alive connection may idle (aiohttp's default)
SWEEP_EVERY = 1.0  # seconds between idle sweeps (and metric flushes)
DIGEST_CACHE = 4096  # hot URLs remembered with their parsed digest
SERVER = SERVER_SOFTWARE.encode()
CACHE = CACHE_CONTROL.encode()
REFUSED_HEADERS = frozenset(
    (
        b"range", b"if-none-match", b"if-range", b"if-match", b"if-modified-since",
        b"if-unmodified-since", b"expect", b"transfer-encoding", b"upgrade",
    )
)  # fmt: skip
FORWARDED_HEADER = FORWARDED.lower().encode()
HTTP_VERSIONS = frozenset(("1.0", "1.1"))  # others are refused (RFC 9110 §15.6.6)
SERVE = ""  # HitRoute.decide: answer the hit here (else None: aiohttp; a URL: redirect)


class Reply(NamedTuple):
    """A whole response the fast path writes itself, then maybe closes."""

    data: bytes
    close: bool = False


@dataclass(frozen=True)
class HitRoute:
    """What one service's fast path answers, and how it is labelled."""

    prefix: bytes  # b"/pkg/" (agents) or b"/blob/" (peers)
    tier: Tier  # X-Cache-Tier of a hit: L1 on agents, L2 on peers
    label: str  # cachesvc_request_seconds{route}
    refused: frozenset[bytes] = REFUSED_HEADERS  # headers that send a request to aiohttp
    decide: Callable[[Head, Digest], str | None] | None = None


class Head:
    """What httptools found in one request head (its callbacks fill it)."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.fields = 0  # header fields seen, repeated names included
        self.hosts = 0  # Host fields seen (RFC 9112 §3.2: exactly one)
        self.keep_alive = False
        self.parser: httptools.HttpRequestParser | None = None  # while it parses

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers[name] = value
        self.fields += 1
        self.hosts += name == b"host"

    def on_headers_complete(self) -> None:
        # Asked here, not after feed_data: llhttp clears the Connection header's
        # flags once the message completes (a GET without a body completes in
        # the same feed), and then answers "keep alive" for every HTTP/1.1 request.
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()


def parse_head(raw: bytes) -> tuple[Head, httptools.HttpRequestParser] | None:
    """The parsed head, or None when httptools refuses it (aiohttp answers)."""
    head = Head()
    parser = head.parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserError:
        return None
    finally:
        head.parser = None  # no cycle between the two: freed at once, not by the GC
    return head, parser


class Tally:
    """The fast path's counts, added up in plain numbers and published to the
    ``cachesvc_*`` metrics once a second, at every scrape (``Metrics.sync``)
    and at close: a Prometheus call costs 1-2 µs, a fast hit about 20 µs in all."""

    def __init__(self, metrics: Metrics, route: HitRoute) -> None:
        self._metrics = metrics
        self._requests = metrics.requests.labels(route.tier)
        self._bytes = metrics.bytes_served.labels(route.tier)
        self._seconds = metrics.request_seconds.labels(route.label)
        self._hits = self._sent = self._uploaded = 0
        self._durations: list[float] = []

    def add(self, size: int, seconds: float, upload: bool) -> None:
        self._hits += 1
        self._sent += size
        self._durations.append(seconds)
        if upload:
            self._uploaded += size

    def flush(self) -> None:
        if not self._hits:
            return
        self._requests.inc(self._hits)
        self._metrics.fast_hits.inc(self._hits)
        self._bytes.inc(self._sent)
        if self._uploaded:
            self._metrics.upload_bytes.inc(self._uploaded)
        observe_many(self._seconds, self._durations)
        self._hits = self._sent = self._uploaded = 0
        self._durations = []


class HitServer:
    """The protocol factory for an agent's port; see the module docstring.

    Use it only on a loop with native ``sendfile`` (asyncio's own selector
    loops; not uvloop): :func:`hit_path_available` says.
    """

    def __init__(
        self,
        handler_factory: web.Server,
        store: Store,
        metrics: Metrics,
        route: HitRoute,
        enabled: Callable[[], bool],
        on_served: Callable[[Digest], None] | None = None,
    ) -> None:
        self.handler_factory = handler_factory
        self.store = store
        self.metrics = metrics
        self.route = route
        self.enabled = enabled
        self.on_served = on_served
        self.connections: set[HitProtocol] = set()
        self.tasks: set[asyncio.Task[bool]] = set()  # corrupt entries being dropped
        self.closing = False
        self._date = (0, b"")
        self._tier = route.tier.encode()
        self._counts = Tally(metrics, route)
        metrics.on_sync.append(self._counts.flush)
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.call_later(SWEEP_EVERY, self._sweep)

    def __call__(self) -> HitProtocol:
        return HitProtocol(self)

    def now(self) -> float:
        return self._loop.time()

    def opened(self, conn: HitProtocol) -> None:
        conn.active = self.now()
        self.connections.add(conn)

    def _sweep(self) -> None:
        """Close connections idle for :data:`IDLE_TIMEOUT`, and publish counts:
        one timer per server, not one per request."""
        self._counts.flush()
        cutoff = self.now() - IDLE_TIMEOUT
        for conn in [c for c in self.connections if c.active <= cutoff]:
            conn.close_if_idle(since=cutoff)
        self._sweeper = self._loop.call_later(SWEEP_EVERY, self._sweep)

    def date(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode())
        return self._date[1]

    async def close(self, grace: float) -> None:
        """Stop: idle connections close now, busy ones after their response,
        which gets up to ``grace`` seconds before it is cut."""
        self.closing = True
        self._sweeper.cancel()
        self._counts.flush()
        for conn in list(self.connections):
            conn.close_if_idle()
        busy = [c.sending for c in self.connections if c.sending is not None]
        if busy:
            await asyncio.wait(busy, timeout=max(grace, 0.001))
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()

    def response_head(self, blob: Blob, last: bool) -> bytes:
        """The head aiohttp writes for this hit (``last``: the client asked to
        close, RFC 9112 §9.6: so does the answer, as aiohttp's does)."""
        return b"".join(
            (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n",
                b"ETag: ", blob.digest.etag.encode(), b"\r\n",
                b"Cache-Control: ", CACHE, b"\r\nAccept-Ranges: bytes\r\n",
                b"X-Cache-Tier: ", self._tier, b"\r\nContent-Length: ", str(blob.size).encode(),
                b"\r\nDate: ", self.date(), b"\r\nServer: ", SERVER,
                b"\r\nConnection: close\r\n\r\n" if last else b"\r\n\r\n",
            )
        )  # fmt: skip

    def redirect_response(self, parent: str, digest: Digest, last: bool) -> Reply:
        """The tracker's 307, as :func:`cachesvc.fanout.parents.redirect` answers it."""
        self.metrics.fanout_redirects.inc()
        headers = redirect_headers(parent, digest) | ({"Connection": "close"} if last else {})
        reply = self._json("307 Temporary Redirect", headers, {"parent": parent})
        return reply._replace(close=last)

    def refusal(self, exc: CachesvcError) -> Reply:
        """A contract error, as :func:`cachesvc.serve.http.error_middleware`
        answers it (a ``Connection: close`` among its headers ends the connection)."""
        status = f"{exc.status} {HTTPStatus(exc.status).phrase}"
        reply = self._json(status, exc.headers, {"error": exc.code, "detail": str(exc)})
        return reply._replace(close=exc.headers.get("Connection") == "close")

    def _json(self, status: str, headers: dict[str, str], body: object) -> Reply:
        data = json.dumps(body).encode()
        lines = [f"{k}: {v}" for k, v in headers.items()]
        lines += ["Content-Type: application/json; charset=utf-8", f"Content-Length: {len(data)}"]
        head = "\r\n".join([f"HTTP/1.1 {status}", *lines, ""]).encode()
        tail = b"Date: " + self.date() + b"\r\nServer: " + SERVER + b"\r\n\r\n"
        return Reply(head + tail + data)

    def served(self, blob: Blob, started: float, upload: bool) -> None:
        self._counts.add(blob.size, time.perf_counter() - started, upload)
        if self.on_served is not None:
            self.on_served(blob.digest)


class HitProtocol(asyncio.Protocol):
    """One connection while it is on the fast path."""

    def __init__(self, server: HitServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.sending: asyncio.Task[None] | None = None
        self.active = 0.0  # loop time of the last bytes received
        self.last = False  # the request being answered asked to close the connection

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.opened(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.active = self.server.now()
        if self.sending is None:
            self._serve_heads()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.sending is not None:
            self.sending.cancel()

    # -- requests --------------------------------------------------------------------

    def _serve_heads(self) -> None:
        """Answer complete heads in order while the fast path can answer them."""
        while self.transport is not None and not self.transport.is_closing():
            end = self.buf.find(b"\r\n\r\n")
            head = self.buf if end < 0 else self.buf[: end + 4]
            if len(head) > MAX_HEAD or bare_lf(head):
                self._hand_over()  # aiohttp answers, or refuses it
                return
            if end < 0:
                return  # the rest of the head is still to come
            answer = self._answer(bytes(head))
            if answer is None:
                self._hand_over()
                return
            del self.buf[: end + 4]
            if isinstance(answer, Reply):  # the tracker's redirect, or a refusal
                self.transport.write(answer.data)
                if answer.close:
                    self.transport.close()
            elif not self._send(*answer):
                return  # the rest goes out in a task; it resumes the loop

    def _answer(self, raw: bytes) -> tuple[Blob, bool] | Reply | None:
        """(the leased blob, whether it is an upload) for a hit, a complete
        reply (a redirect, a refusal), or None: aiohttp answers. Nothing is
        counted or assigned before the answer is certain to be the fast path's."""
        parsed = parse_head(raw)
        if parsed is None:
            return None
        head, parser = parsed
        version = parser.get_http_version()
        if version not in HTTP_VERSIONS:  # aiohttp would echo it in its status line
            return self.server.refusal(VersionNotSupported(version))
        digest = self._admit(head, parser.get_method(), version)
        if digest is None:
            return None
        store = self.server.store
        if not store.is_hot(digest):
            return None
        decide = self.server.route.decide
        verdict = SERVE if decide is None else decide(head, digest)
        if verdict != SERVE:  # refused or redirected: the entry's recency is not touched
            if verdict is None:
                return None
            return self.server.redirect_response(verdict, digest, self.last)
        blob = store.lease_hot(digest)
        assert blob is not None, "hot a moment ago, with no await in between"
        return blob, FORWARDED_HEADER in head.headers

    def _admit(self, head: Head, method: bytes, version: str) -> Digest | None:
        """The digest of a plain HTTP/1.1 GET of the route (``method`` and
        ``version`` as the parser read them: asked once per request)."""
        if not self.server.enabled() or self.server.closing:
            return None
        route = self.server.route
        if method != b"GET" or version != "1.1":
            return None
        if route.refused & head.headers.keys():
            return None
        if head.hosts != 1 or head.fields > MAX_FIELDS:  # aiohttp refuses or decides
            return None
        if head.headers.get(b"content-length", b"0") != b"0":
            return None
        digest = route_digest(head.url, route.prefix)
        self.last = not head.keep_alive  # Connection: close: answer, then close (RFC 9112 §9.6)
        return digest

    def _send(self, blob: Blob, upload: bool) -> bool:
        """Head and body; True when all went out now, else a task finishes it."""
        assert self.transport is not None
        started = time.perf_counter()
        head = self.server.response_head(blob, self.last)
        if blob.size <= SMALL:  # head and body in one segment: one syscall, not two
            body = os.pread(blob.file.fileno(), blob.size, 0)
            if len(body) != blob.size:
                self._cut_short(blob, len(body))
                return False
            self.transport.write(head + body)
            self._done(blob, started, upload)
            return True
        # No TCP_CORK around head and body: measured here, it cut 1 MiB hits
        # from ~3,900 to ~2,100 req/s (wrk -c32); the head's own segment is cheaper.
        self.transport.write(head)
        sent = sendfile_now(self.transport, blob.file, 0, blob.size)
        if sent == blob.size:
            self._done(blob, started, upload)
            return True
        self.transport.pause_reading()
        rest = self._send_rest(blob, sent, started, upload)
        self.sending = asyncio.get_running_loop().create_task(rest)
        return False

    async def _send_rest(self, blob: Blob, sent: int, started: float, upload: bool) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            sent += await loop.sendfile(
                self.transport, blob.file, sent, blob.size - sent, fallback=False
            )
        except (OSError, ConnectionError, RuntimeError) as exc:
            log.warning("GET %s: aborting the response: %s", blob.digest.short, exc)
            self.transport.abort()
            Store.release(blob)
            return
        finally:
            self.sending = None
        if sent != blob.size:
            self._cut_short(blob, sent)
            return
        self._done(blob, started, upload)
        if not self.transport.is_closing():
            self.transport.resume_reading()
            self._serve_heads()

    def _cut_short(self, blob: Blob, got: int) -> None:
        """The file held fewer bytes than its entry: abort (the client sees a
        short body, never a complete one) and drop the entry as corrupt."""
        assert self.transport is not None
        self.transport.abort()
        reason = f"its file ended at byte {got} of {blob.size}"
        log.error("GET %s: aborting the response: %s", blob.digest.short, reason)
        drop = self.server.store.drop_corrupt(blob.digest, reason, lease=blob)
        task = asyncio.get_running_loop().create_task(drop)
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)
        Store.release(blob)

    def _done(self, blob: Blob, started: float, upload: bool) -> None:
        Store.release(blob)
        self.server.served(blob, started, upload)
        if self.last:
            assert self.transport is not None
            self.transport.close()  # after what was written; later requests are not read
        elif self.server.closing:
            self.close_if_idle()

    # -- handing over, idling -----------------------------------------------------------

    def _hand_over(self) -> None:
        """From now on aiohttp owns the connection, starting with the bytes
        of the request the fast path did not answer."""
        assert self.transport is not None
        self.server.connections.discard(self)
        handler = self.server.handler_factory()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            handler.data_received(data)

    def close_if_idle(self, since: float | None = None) -> None:
        """Close now if nothing is being sent or read (and, with ``since``, if
        no bytes arrived after it)."""
        if self.sending is not None or self.transport is None:
            return
        if since is None and self.buf:
            return
        if since is None or self.active <= since:
            self.transport.close()


HitFactory = Callable[[web.Server], HitServer]
HIT_PATH: web.AppKey[Callable[[], HitFactory | None]] = web.AppKey("hit_path")
"""Set by an app that offers the fast path: called once it started, returns
the factory of its :class:`HitServer` given aiohttp's handler factory (or
None: no fast path on this loop)."""


def hit_path_available() -> bool:
    """Only asyncio's selector loops have the native ``sendfile`` the fast
    path relies on (uvloop's raises a "not implemented" error)."""
    return isinstance(asyncio.get_running_loop(), asyncio.selector_events.BaseSelectorEventLoop)


def bare_lf(head: bytearray) -> bool:
    """Whether a (maybe incomplete) head ends a line with a bare LF: aiohttp
    refuses it (RFC 9112 §2.2 lets a server), and a head ended by one never
    holds the CRLF CRLF this path waits for."""
    return head.count(b"\n") != head.count(b"\r\n")


@functools.lru_cache(maxsize=DIGEST_CACHE)  # hot URLs repeat: parsed once
def route_digest(url: bytes, prefix: bytes) -> Digest | None:
    """``<prefix><digest>`` exactly; anything else (query, escapes) is aiohttp's."""
    if not url.startswith(prefix) or b"?" in url or b"%" in url:
        return None
    try:
        return Digest.parse(url[len(prefix) :].decode("ascii"))
    except (InvalidDigest, UnicodeDecodeError):
        return None

"""The read-through walk, written once for the agent (L1) and the peers (L2).

How a request for a digest is answered (the README's "loading process"):

1. **Local hit.** The store has it: serve the open file (``X-Cache-Tier`` is
   this service's own tier, L1 on agents, L2 on peers).
2. **Known absent.** The origin said 404 for it moments ago (negative cache,
   :data:`NEGATIVE_TTL`): answer 404 without asking anyone.
3. **Join.** A fetch for it is already running: follow that flight; its bytes
   stream to us as they arrive (counted in ``cachesvc_coalesced_total``).
4. **Fetch.** Otherwise start one flight whose fill walks the sources in order:
   on agents the ring's owners (owner first, then the peers that would own it
   next, peers marked down last), then the origin; on peers the origin only.
   A source that fails mid-body is replaced by the next one, resuming at the
   byte reached (a ranged GET); a 404 from the owner peer or the origin is
   final (the peer already asked the origin: asking again would double origin
   traffic). Nothing here waits on a timer for a running fetch to give up:
   only a failed source (connect error, error status, idle-read timeout)
   moves the walk on.
5. **Verify.** The flight's ingest checks size and sha256 before anything is
   kept or the last byte is released to followers. Wrong bytes from a peer
   mark it refused and start a fresh fill from the next source, so the request
   after a refused one is served correctly, and so is the refused one itself
   when none of its answer went out yet (:meth:`Tiers.deliver`; warm,
   prefetch and unpack, through :meth:`Tiers.fetch`, always).

This module does not hash, parse HTTP or pick status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from cachesvc.digest import Digest
from cachesvc.errors import (
    CachesvcError,
    DigestMismatch,
    NotFound,
    NotHere,
    Overloaded,
    UpstreamError,
    UpstreamTimeout,
)
from cachesvc.metrics import Metrics
from cachesvc.readpath.flight import Flight, Flights
from cachesvc.readpath.package import BlobPackage, Package
from cachesvc.store.castore import Store
from cachesvc.tier import Tier, Upstream
from cachesvc.upstream.origin import Origin
from cachesvc.upstream.peer_client import PeerClient
from cachesvc.upstream.ring import Ring
from cachesvc.upstream.source import Opened, Source

log = logging.getLogger(__name__)

NEGATIVE_TTL = 10.0
NEGATIVE_MAX = 10_000
MAX_REFILLS = 3  # refused fills one request walks past before the refusal is its answer

T = TypeVar("T")


@dataclass
class PeerSource:
    client: PeerClient
    ring: Ring
    name: str
    tier: Tier = Tier.L2
    upstream: Upstream = Upstream.PEER

    def open(self, digest: Digest, offset: int) -> Opened:
        return self.client.open(self.name, digest, offset)

    async def head(self, digest: Digest) -> int:
        return await self.client.head(self.name, digest)

    def retry(self, exc: CachesvcError) -> bool:
        return False

    def failed(self) -> None:
        self.ring.mark_down(self.name)

    def refused(self) -> None:
        self.ring.mark_refused(self.name)

    def succeeded(self) -> None:
        self.ring.mark_up(self.name)


@dataclass
class OriginSource:
    origin: Origin
    name: str = "origin"
    tier: Tier = Tier.ORIGIN
    upstream: Upstream = Upstream.ORIGIN

    def open(self, digest: Digest, offset: int) -> Opened:
        return self.origin.open(digest, offset)

    async def head(self, digest: Digest) -> int:
        return await self.origin.head(digest)

    def retry(self, exc: CachesvcError) -> bool:
        return False

    def failed(self) -> None:
        return None

    def refused(self) -> None:
        return None

    def succeeded(self) -> None:
        return None


class NegativeCache:
    """Digests the origin recently did not have; bounded, with an injected clock."""

    def __init__(self, ttl: float = NEGATIVE_TTL, clock: Callable[[], float] = time.monotonic):
        self._ttl = ttl
        self._clock = clock
        self._until: OrderedDict[Digest, float] = OrderedDict()

    def add(self, digest: Digest) -> None:
        self._until[digest] = self._clock() + self._ttl
        self._until.move_to_end(digest)
        while len(self._until) > NEGATIVE_MAX:
            self._until.popitem(last=False)

    def __contains__(self, digest: Digest) -> bool:
        until = self._until.get(digest)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[digest]
            return False
        return True

    def discard(self, digest: Digest) -> None:
        self._until.pop(digest, None)


class Tiers:
    """The walk. ``local_tier`` is the tier of what this service serves from
    its own store (L1 on agents, L2 on peers)."""

    def __init__(
        self,
        store: Store,
        flights: Flights,
        sources: Callable[[Digest], Sequence[Source]],
        metrics: Metrics,
        local_tier: Tier,
        negative: NegativeCache | None = None,
    ) -> None:
        self.store = store
        self.flights = flights
        self._sources = sources
        self.metrics = metrics
        self.local_tier = local_tier
        self.negative = negative or NegativeCache()

    def open(
        self, digest: Digest, local_only: bool = False, start_timeout: float | None = None
    ) -> AbstractAsyncContextManager[Package]:
        """Steps 1-4: the package to read, valid inside the ``async with``.

        Raises :class:`NotFound` (negative cache, or every source said so),
        :class:`Overloaded`, or the failure of a fetch that never started.
        ``local_only`` (another host asks, fan-out): only what is here or being
        filled here, else :class:`NotHere`, and a fill that has not started
        within ``start_timeout`` is :class:`UpstreamTimeout`. On exit the lease
        or the follower is released.
        """
        return self._open(digest, local_only, start_timeout, first_try=True)

    @asynccontextmanager
    async def _open(
        self, digest: Digest, local_only: bool, start_timeout: float | None, first_try: bool
    ) -> AsyncIterator[Package]:
        """:meth:`open`; a request's retry (``first_try`` false) that joins a
        running flight was counted as coalesced on its first try already."""
        blob = await self.store.lease(digest)
        if blob is not None and self.store.is_verified(digest):
            try:
                yield BlobPackage(blob, self.local_tier, self.store)
            finally:
                self.store.release(blob)
            return
        if blob is not None:  # not hashed since this process started: recheck it
            self.store.release(blob)
        follower = self._join(digest, blob is not None, local_only, first_try).follow()
        try:
            try:
                async with asyncio.timeout(start_timeout):
                    await follower.started()
            except TimeoutError as exc:
                what = f"{digest.short}: its fill did not start within {start_timeout}s"
                raise UpstreamTimeout(what) from exc
            follower.tier = self._tier_of(follower.flight)
            yield follower
        finally:
            await follower.leave()

    async def deliver(
        self,
        digest: Digest,
        send: Callable[[Package], Awaitable[T]],
        local_only: bool = False,
        start_timeout: float | None = None,
    ) -> T:
        """``send`` the package :meth:`open` yields; ``send`` raises only
        before any of its answer went out (after that it aborts).

        When it raises :class:`DigestMismatch` and the refusal started a refill
        from the next source (step 5: a peer, a parent agent or a rotten entry
        refused, not the origin), the same request follows that refill, at most
        :data:`MAX_REFILLS` times: a lie caught before answering is invisible
        to the client.
        """
        refills = 0
        while True:
            try:
                async with self._open(digest, local_only, start_timeout, refills == 0) as package:
                    return await send(package)
            except DigestMismatch:
                if refills == MAX_REFILLS or not self._refilled(digest):
                    raise
                refills += 1
                log.info("%s: refused bytes before answering; following the refill", digest.short)

    def _refilled(self, digest: Digest) -> bool:
        """Whether a refill follows a refusal: it was scheduled (call_soon)
        before the refused flight failed, so it is running by the time anyone
        hears of the failure (or already kept what it fetched)."""
        return self.flights.get(digest) is not None or digest in self.store

    def _join(self, digest: Digest, recheck: bool, local_only: bool, first_try: bool) -> Flight:
        """The running flight for ``digest``, or a new one (no await: the caller
        follows it at once). Joining counts as coalesced on a request's first
        try only."""
        flight = self.flights.get(digest)
        if flight is not None:
            if not flight.local and first_try:
                self.metrics.coalesced.inc()
            return flight
        if recheck:
            return self.flights.start(digest, self._recheck, local=True)
        if local_only:
            raise NotHere(f"{digest.short} is neither here nor being fetched here")
        if digest in self.negative:
            self.metrics.negative_hits.inc()
            raise NotFound(f"{digest} is not in the origin (negative cache)")
        return self.flights.start(digest, self._fill)

    def _tier_of(self, flight: Flight) -> Tier:
        """X-Cache-Tier for a request following ``flight`` (once it started):
        this service's own tier once the bytes are verified and being kept."""
        assert flight.tier is not None
        return self.local_tier if flight.local else flight.tier

    async def fetch(self, digest: Digest) -> tuple[int, Tier]:
        """Make sure the package is here and verified (kept, when the store can
        keep it): for warm, prefetch and unpack. Returns (size, tier the bytes
        came from; this service's own tier if they were already here).

        Through :meth:`deliver`: nothing of a fetch goes out before the
        verdict, so a lie that starts a refill is followed like a GET's."""

        async def completed(package: Package) -> tuple[int, Tier]:
            await package.complete()
            return package.size, package.tier

        return await self.deliver(digest, completed)

    async def head(self, digest: Digest) -> tuple[int, Tier]:
        """Size and tier without downloading the body."""
        size = self.store.size_of(digest)
        if size is not None:
            return size, self.local_tier
        flight = self.flights.get(digest)
        if flight is not None and flight.size is not None and flight.tier is not None:
            return flight.size, self._tier_of(flight)
        if digest in self.negative:
            raise NotFound(f"{digest} is not in the origin (negative cache)")
        last: CachesvcError = UpstreamError(f"HEAD {digest.short}: no upstream configured")
        for source in self._sources(digest):
            try:
                return await source.head(digest), source.tier
            except NotFound:
                self.negative.add(digest)
                raise
            except (UpstreamError, UpstreamTimeout) as exc:
                log.warning("HEAD %s via %s failed: %s", digest.short, source.name, exc)
                source.failed()
                last = exc
        raise last

    async def _fill(self, flight: Flight) -> None:
        """Step 4-5: walk the sources until one delivers verified bytes."""
        digest = flight.digest
        self.metrics.inflight.inc()
        try:
            last: CachesvcError = UpstreamError(f"fetch {digest.short}: no upstream configured")
            for source in self._sources(digest):
                try:
                    await self._pull_from(flight, source)
                except NotFound:
                    self._count(source, "not_found")
                    self.negative.add(digest)
                    raise
                except DigestMismatch as exc:
                    self._refused(flight, source, exc)
                    raise
                except (UpstreamError, UpstreamTimeout) as exc:
                    log.warning("fetch %s via %s failed: %s", digest.short, source.name, exc)
                    source.failed()
                    last = exc
                else:
                    self._count(source, "ok")
                    source.succeeded()
                    log.info("fetched %s (%s bytes) via %s", digest.short, flight.size, source.name)
                    return
            raise last
        finally:
            self.metrics.inflight.dec()

    async def _recheck(self, flight: Flight) -> None:
        """A local entry not hashed since start: serve it while hashing it; if
        it rotted, the store drops it, followers abort, and a refill starts."""
        blob = await self.store.lease(flight.digest)
        if blob is None:  # evicted meanwhile: fetch it like any miss
            await self._fill(flight)
            return
        recheck = self.store.recheck(blob)
        flight.begin_recheck(recheck, self.local_tier)
        try:
            while True:
                more = await recheck.step()
                flight.grew()
                if not more:
                    break
            await flight.finish()
        except DigestMismatch:
            self.metrics.digest_mismatch.inc()
            asyncio.get_running_loop().call_soon(self._refill, flight.digest)
            raise

    async def _pull_from(self, flight: Flight, source: Source) -> None:
        """:meth:`_pull`, again while the source asks to be retried (a fan-out
        parent failed: the owner names another). Counts every attempt."""
        while True:
            try:
                await self._pull(flight, source)
                return
            except DigestMismatch:
                raise
            except (UpstreamError, UpstreamTimeout) as exc:
                self._count(source, "timeout" if isinstance(exc, UpstreamTimeout) else "error")
                if not source.retry(exc):
                    raise

    async def _pull(self, flight: Flight, source: Source) -> None:
        """Stream one source into the flight, resuming at ``flight.received``."""
        async with source.open(flight.digest, flight.received) as body:
            flight.via = body.via
            if flight.ingest is None:
                await flight.begin(body.size, source.tier)
            elif body.size != flight.size:
                raise UpstreamError(f"{source.name} says {body.size} bytes, not {flight.size}")
            async for chunk in body.chunks:
                await flight.feed(chunk)
        await flight.finish()

    def _refused(self, flight: Flight, source: Source, exc: DigestMismatch) -> None:
        self._count(source, "mismatch")
        self.metrics.digest_mismatch.inc()
        log.error("fetch %s via %s refused: %s", flight.digest.short, source.name, exc)
        source.refused()
        if source.upstream is not Upstream.ORIGIN:  # the origin may still have the right bytes
            asyncio.get_running_loop().call_soon(self._refill, flight.digest)

    def _refill(self, digest: Digest) -> None:
        if digest not in self.store and self.flights.get(digest) is None:
            try:
                self.flights.start(digest, self._fill)
            except Overloaded:
                log.warning("refill of %s skipped: overloaded", digest.short)

    def _count(self, source: Source, outcome: str) -> None:
        self.metrics.upstream_fetches.labels(source.upstream, outcome).inc()

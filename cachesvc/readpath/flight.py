"""Coalescing: one fill per digest, streamed to every follower.

A :class:`Flight` is one fill of one digest: bytes fetched from an upstream
into a new temp file, or (a *recheck*) a committed entry re-hashed in place
before its first serve after a start. The fill task (supplied by
:mod:`cachesvc.readpath.tiers`) calls :meth:`Flight.begin` (or
:meth:`Flight.begin_recheck`), :meth:`Flight.feed` (or :meth:`Flight.grew`)
and :meth:`Flight.finish`. Any number of :class:`Follower` s, each its own
object, read the bytes *while they arrive* through :meth:`Follower.spans`,
which releases the last byte only after the verdict. The protocol (positions,
relay window, held-back byte, verdict, leaving) is driven here and nowhere
else: callers write spans.

Where followers read from:

* ``[0, ingest.on_disk)``: the temp file (or the entry's own file, for a
  recheck), with zero-copy ``sendfile``. Normally that is all they read: a
  batch reaches them once it is written (:data:`~cachesvc.store.ingest.MIN_BATCH`
  and more), which costs a millisecond and saves the copy a ``write()`` from
  memory makes;
* ``[tail_start, received)``: the in-memory tail of chunks not yet on disk
  (at most two write batches). When the store cannot keep the package (disk
  full), the tail is the only copy of the bytes and followers read from it: it is trimmed
  behind the slowest follower and the fill waits while it is longer than
  :data:`RELAY_WINDOW` (so slow clients throttle the fill instead of memory
  growing), and a late follower that would need trimmed bytes cannot join.

Guarantees: the fill runs in its own task, owned by :class:`Flights`, so a
follower's disconnect never cancels it; :meth:`Flights.close` cancels and
awaits them all. The temp file stays open until the fill is over *and* the
last follower is gone. This module does not know where bytes come from, and
never judges them: :meth:`Ingest.verify` (or :meth:`Recheck.verdict`) does,
and the store keeps what they found right (:meth:`Store.commit`,
:meth:`Store.settle`).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError, Overloaded, UpstreamError
from cachesvc.readpath.package import FileSpan, Span, span_len
from cachesvc.store.castore import Ingest, Recheck, Store, StoreFull
from cachesvc.tier import Tier

log = logging.getLogger(__name__)

MAX_RECHECKS = 4  # entries re-hashed at once before their first serve (no 503 for hits)
RELAY_WINDOW = 8 << 20  # bytes buffered per flight when the store cannot keep it
STALL_TIMEOUT = 30.0  # seconds a full relay window waits for its slowest follower

Fill = Callable[["Flight"], Awaitable[None]]


class Flight:
    """One fill (or re-verification) of one digest and the followers that stream it."""

    def __init__(self, store: Store, digest: Digest, stall_timeout: float = STALL_TIMEOUT):
        self.store = store
        self.digest = digest
        self.stall_timeout = stall_timeout
        self.size: int | None = None
        self.tier: Tier | None = None
        self.via: tuple[str, ...] = ()  # agents the current source's bytes come through
        self.ingest: Ingest | Recheck | None = None
        self.started: asyncio.Future[None] = _future()
        self.done: asyncio.Future[None] = _future()  # verified (or failed)
        self.ended: asyncio.Future[None] = _future()  # the fill is over: kept, or not
        self._progress: asyncio.Future[None] = _future()
        self._drained: asyncio.Future[None] = _future()
        self._chunks: list[bytes] = []
        self._starts: list[int] = []  # absolute offset of each chunk in _chunks
        self._followers: set[Follower] = set()  # for relay trimming
        self._users = 1  # the fill itself

    # -- the fill side ---------------------------------------------------------

    async def begin(self, size: int, tier: Tier) -> None:
        """The first source answered: size and tier are known; followers may start."""
        self.size, self.tier = size, tier
        try:
            self.ingest = await self.store.begin(self.digest, size)
        except StoreFull as exc:
            log.warning("flight %s: %s; streaming it through unkept", self.digest.short, exc)
            self.ingest = self.store.begin_unstored(self.digest, size)
        self.ingest.on_written = self._on_disk
        _settle(self.started)

    def begin_recheck(self, recheck: Recheck, tier: Tier) -> None:
        """A committed entry is re-verified in place: followers read the bytes
        hashed so far straight from its file (:meth:`grew` after each step)."""
        self.size, self.tier, self.ingest = recheck.size, tier, recheck
        _settle(self.started)

    @property
    def received(self) -> int:
        return self.ingest.received if self.ingest else 0

    @property
    def readable(self) -> int:
        """Bytes followers may read: those on disk (sent with ``sendfile``), or
        all received when the store keeps nothing (relay, from memory)."""
        if self.ingest is None:
            return 0
        return self.ingest.received if self.ingest.spilled else self.ingest.on_disk

    async def feed(self, chunk: bytes) -> None:
        """Append a chunk from the current source; blocks while relay memory is full."""
        assert isinstance(self.ingest, Ingest)
        self._starts.append(self.ingest.received)
        self._chunks.append(chunk)
        await self.ingest.write(chunk)
        if self.ingest.spilled:  # followers read the tail; else they wait for the disk
            self._trim()
            self._wake()
        while self.ingest.spilled and self._tail_bytes() > RELAY_WINDOW and self._followers:
            self._drained = _future()
            try:
                async with asyncio.timeout(self.stall_timeout):
                    await self._drained
            except TimeoutError:
                self._drop_slowest()
            self._trim()

    def grew(self) -> None:
        """More of the body became readable (a re-verification advanced)."""
        self._wake()

    def _on_disk(self) -> None:
        """A batch was written: followers may send it from the file."""
        self._trim()
        self._wake()

    async def finish(self) -> None:
        """All bytes are in: verify, release followers' last bytes, then keep
        (rename and index are off the followers' critical path). Raises what
        :meth:`Ingest.verify`, :meth:`Store.commit` and :meth:`Store.settle` raise
        (a recheck's wrong bytes are dropped by the store first)."""
        assert self.ingest is not None
        if isinstance(self.ingest, Recheck):
            await self.store.settle(self.ingest.verdict())
            self._verdict_in()
            return
        verified = await self.ingest.verify()
        self._verdict_in()
        await self.store.commit(verified)
        self._trim()

    def _verdict_in(self) -> None:
        """The bytes are right: followers may send their last byte."""
        _settle(self.done)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """End the flight without a good verdict; followers abort."""
        for fut in (self.started, self.done):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: followers may be gone
        self._wake()

    # -- the follower side -----------------------------------------------------

    @property
    def verified(self) -> bool:
        return self.done.done() and not self.done.cancelled() and self.done.exception() is None

    @property
    def local(self) -> bool:
        """Verified and being kept: a request joining now is served from this
        disk, as a hit, while the commit (rename, index) completes."""
        return self.verified and self.ingest is not None and not self.ingest.spilled

    @property
    def joinable(self) -> bool:
        """False once a relay flight trimmed bytes a new follower would need."""
        if not isinstance(self.ingest, Ingest) or not self.ingest.spilled:
            return True
        return not self._starts or self._starts[0] <= self.ingest.on_disk

    def follow(self) -> Follower:
        """Register a new follower, before any await (it keeps the temp file
        open); pair with :meth:`Follower.leave`."""
        self._users += 1
        follower = Follower(self)
        self._followers.add(follower)
        return follower

    def _moved(self, follower: Follower) -> None:
        """A follower passed more bytes: the relay window may have room now."""
        if not self._drained.done():
            self._trim()
            if self._tail_bytes() <= RELAY_WINDOW:
                _settle(self._drained)

    async def _left(self, follower: Follower) -> None:
        self._followers.discard(follower)
        _settle(self._drained)
        await self.release()

    async def release(self) -> None:
        """Drop one user; the last one closes the ingest (and its temp file)."""
        self._users -= 1
        if self._users == 0 and self.ingest is not None:
            await self.ingest.close()

    async def available(self, offset: int) -> int:
        """Wait until bytes past ``offset`` exist (or the fill ended); return how
        many bytes from the start are readable. Raises the flight's failure."""
        while True:
            if self.done.done():
                self.done.result()
                return self.readable
            if self.readable > offset:
                return self.readable
            self._progress = self._progress if not self._progress.done() else _future()
            await asyncio.shield(self._progress)

    def read_span(self, offset: int, limit: int) -> Span:
        """The readable start of ``[offset, limit)``: a span of the file on disk
        or a piece of the in-memory tail."""
        assert self.ingest is not None
        if offset < self.ingest.on_disk:
            assert self.ingest.file is not None, "bytes on disk have an open file"
            return FileSpan(self.ingest.file, offset, min(limit, self.ingest.on_disk) - offset)
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            raise UpstreamError(f"flight {self.digest.short}: offset {offset} was trimmed")
        chunk = self._chunks[i]
        lo = offset - self._starts[i]
        return chunk[lo : lo + (limit - offset)]

    async def verdict(self) -> None:
        await asyncio.shield(self.done)

    # -- internals -------------------------------------------------------------

    def _wake(self) -> None:
        _settle(self._progress)

    def _drop_slowest(self) -> None:
        """A follower that read nothing for ``stall_timeout`` with the relay
        window full stops holding the others back; its next read fails."""
        slowest = min(self._followers, key=lambda f: f.position)
        self._followers.discard(slowest)
        log.warning(
            "flight %s: dropping a follower stuck at byte %d for %.0fs",
            self.digest.short,
            slowest.position,
            self.stall_timeout,
        )

    def _tail_bytes(self) -> int:
        return self.received - self._starts[0] if self._starts else 0

    def _trim(self) -> None:
        """Drop tail chunks every reader can get elsewhere (disk) or has passed."""
        assert self.ingest is not None
        keep_from = self.ingest.on_disk
        if self.ingest.spilled:
            positions = (f.position for f in self._followers)
            keep_from = max(keep_from, min(positions, default=self.received))
        while self._chunks and self._starts[0] + len(self._chunks[0]) <= keep_from:
            del self._chunks[0], self._starts[0]


class Follower:
    """One reader of a flight: a :class:`~cachesvc.readpath.package.Package` whose bytes
    arrive while the flight runs.

    Its own object (never an ``id()``): the flight trims its relay window
    behind the slowest follower's :attr:`position`, and a follower that leaves
    takes only its own position with it. ``tier`` is set by the read path once
    the flight started.
    """

    def __init__(self, flight: Flight) -> None:
        self.flight = flight
        self.digest = flight.digest
        self.position = 0
        self._tier: Tier | None = None
        self._gone = False

    @property
    def tier(self) -> Tier:
        assert self._tier is not None, "the read path sets the tier once the flight started"
        return self._tier

    @tier.setter
    def tier(self, tier: Tier) -> None:
        self._tier = tier

    @property
    def size(self) -> int:
        assert self.flight.size is not None, "size is known once the flight started"
        return self.flight.size

    @property
    def via(self) -> tuple[str, ...]:
        return self.flight.via

    async def started(self) -> None:
        """Wait for the flight's first source to answer; raises its failure."""
        await asyncio.shield(self.flight.started)

    async def spans(self, start: int, end: int) -> AsyncGenerator[Span, None]:
        """``[start, end)`` as it arrives; the last byte waits for the verdict.

        The position advances when the consumer asks for the next span (it has
        sent the previous one). While waiting for the verdict the follower
        counts as done, so in relay mode a ranged or waiting follower never
        stalls the fill.
        """
        flight, pos = self.flight, start
        self._at(pos)
        while pos < end:
            ready = await flight.available(pos)
            if ready >= end and not flight.verified:
                if pos == end - 1:
                    held = flight.read_span(pos, end)  # the last byte, kept while we wait
                    self._at(self.size)
                    await flight.verdict()
                    yield held
                    return
                ready = end - 1
            span = flight.read_span(pos, min(ready, end))
            yield span
            pos += span_len(span)
            self._at(pos)
        await flight.verdict()  # also for empty ranges and after a ranged read

    async def complete(self) -> None:
        await self.flight.verdict()
        await asyncio.shield(self.flight.ended)

    async def cut_short(self, reason: str) -> None:
        """Nothing to drop: the flight's verdict is on the bytes it hashed, not
        on its file. A recheck hashes this very file and finds it short itself;
        a fill's temp file that lost bytes is kept short, and its first serve
        finds that and drops it."""
        log.warning("flight %s: a follower's read came up short: %s", self.digest.short, reason)

    async def leave(self) -> None:
        """Stop following; idempotent. The last user closes the temp file."""
        if not self._gone:
            self._gone = True
            await self.flight._left(self)

    def _at(self, position: int) -> None:
        self.position = position
        self.flight._moved(self)


class Flights:
    """The table of running fills: at most one per digest, and a cap on how many
    run at once (``max_fetches``) and wait for a slot (``max_queued``)."""

    def __init__(self, store: Store, max_fetches: int = 64, max_queued: int = 256) -> None:
        self.store = store
        self._running: dict[Digest, Flight] = {}
        self._tasks: dict[asyncio.Task[None], Flight] = {}
        self._slots = asyncio.Semaphore(max_fetches)
        self._max_fetches = max_fetches
        self._max_queued = max_queued
        self._waiting = 0  # started, not yet holding a slot
        self._active = 0
        self._rechecks = asyncio.Semaphore(MAX_RECHECKS)

    def get(self, digest: Digest) -> Flight | None:
        flight = self._running.get(digest)
        return flight if flight is not None and flight.joinable else None

    def start(self, digest: Digest, fill: Fill, local: bool = False) -> Flight:
        """Start a fill for ``digest`` (replacing an unjoinable one in the table).
        Raises :class:`Overloaded` when ``max_fetches`` run and ``max_queued`` wait.
        A ``local`` fill (a recheck: no upstream) waits for one of
        :data:`MAX_RECHECKS` slots instead and is never refused."""
        if local:
            return self._launch(digest, fill, self._recheck_slot)
        if self._active + self._waiting >= self._max_fetches + self._max_queued:
            queued = self._active + self._waiting - self._max_fetches
            raise Overloaded(f"{queued} upstream fetches already queued", retry_after=2)
        self._waiting += 1
        return self._launch(digest, fill, self._slot)

    def _launch(
        self, digest: Digest, fill: Fill, slot: Callable[[Flight, Fill], Awaitable[None]]
    ) -> Flight:
        flight = Flight(self.store, digest)
        self._running[digest] = flight
        task = asyncio.get_running_loop().create_task(self._run(flight, fill, slot))
        self._tasks[task] = flight
        task.add_done_callback(self._tasks.pop)
        return flight

    async def _run(
        self, flight: Flight, fill: Fill, slot: Callable[[Flight, Fill], Awaitable[None]]
    ) -> None:
        try:
            await slot(flight, fill)
        except asyncio.CancelledError:
            flight.fail(UpstreamError(f"fetch of {flight.digest.short} cancelled (shutdown)"))
            raise
        except CachesvcError as exc:
            flight.fail(exc)
        except Exception as exc:  # a bug must not leave followers hanging
            log.exception("flight %s: fill crashed", flight.digest.short)
            flight.fail(UpstreamError(f"fetch of {flight.digest.short} failed: {exc!r}"))
        finally:
            if self._running.get(flight.digest) is flight:
                del self._running[flight.digest]
            if not flight.done.done():
                flight.fail(UpstreamError(f"fetch of {flight.digest.short} ended early"))
            _settle(flight.ended)
            await flight.release()

    async def _slot(self, flight: Flight, fill: Fill) -> None:
        """Wait for one of ``max_fetches`` slots, then fill."""
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._active += 1
        try:
            await fill(flight)
        finally:
            self._active -= 1
            self._slots.release()

    async def _recheck_slot(self, flight: Flight, fill: Fill) -> None:
        async with self._rechecks:
            await fill(flight)

    def __len__(self) -> int:
        return len(self._running)

    async def wait_idle(self) -> None:
        """Wait until every fill running now has ended (verified bytes persisted)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel every fill still fetching and wait for them (each cleans up its
        temp file); fills already verified finish persisting first."""
        for task, flight in list(self._tasks.items()):
            if not flight.done.done():
                task.cancel()
        await self.wait_idle()
        for flight in self._running.values():  # tasks cancelled before their first step
            flight.fail(UpstreamError(f"fetch of {flight.digest.short} cancelled (shutdown)"))
            _settle(flight.ended)
        self._running.clear()


def _future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

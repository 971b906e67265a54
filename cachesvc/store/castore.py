"""The content-addressed package store on local disk: reservations, commit of
what an ingest verified, LRU eviction, pins, leases on open blobs. Owns
``blobs/sha256/<hex>`` (read-only, the only files served), ``tmp/``,
``index/`` and ``quarantine/`` under its root. Knows nothing of HTTP, peers,
origins or the ring; it does not hash (ingest and recheck report, it acts).

* Only what :meth:`Ingest.verify` returned is committed: chmod 0444, rename,
  then the index row within :data:`ROW_DELAY`; a kill -9 at any moment leaves
  nothing or a complete verified blob (a blob without a row is adopted at start).
* No fsync (1-12 ms per miss): after an OS crash a short file is caught by the
  re-hash before its first serve (README "Trust").
* One owner per directory (:mod:`cachesvc.dirlock`); opening never raises for
  what is on disk (:mod:`cachesvc.store.recovery`).
* Recency lives in memory (a hit writes nothing) and reaches the index when
  flushed (by the service, and on close); pinned entries are never evicted.
* A lease outlives eviction; verdicts land only on the file the lease read.
* Blocking work (diskcache, rename, open, unlink) runs in threads, except
  :meth:`Store.check`.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cachesvc.digest import Digest
from cachesvc.dirlock import DirLock
from cachesvc.errors import DigestMismatch
from cachesvc.store import recovery
from cachesvc.store.blob import Blob, open_file
from cachesvc.store.index import Entry, Index
from cachesvc.store.ingest import Ingest, Verified
from cachesvc.store.recheck import Recheck, Verdict

log = logging.getLogger(__name__)

__all__ = [
    "Blob",
    "Entry",
    "Ingest",
    "Recheck",
    "Store",
    "StoreFull",
    "Usage",
    "Verdict",
    "Verified",
]

LOW_WATER = 0.90  # evict down to this share of capacity when making room
MAX_OPEN_BLOBS = 512  # open file handles kept for hot entries
ROW_DELAY = 0.5  # seconds a committed entry's index row may wait, to batch the writes
# Committed blobs are never written again. fs-verity (FS_IOC_ENABLE_VERITY) would
# make the kernel refuse rotten reads, but ext4 here has it off (EOPNOTSUPP,
# checked 2026-12-01): blobs are re-hashed by the scrubber and first serves instead.
BLOB_MODE = 0o444

CorruptHook = Callable[[str], None]  # called with found_by: "startup", "scrub", "serve"


class StoreFull(Exception):
    """The store cannot keep this package (disk full, or capacity all pinned/leased).

    Not a client error: the caller streams the bytes through without keeping them.
    """


@dataclass(frozen=True)
class Usage:
    entries: int
    bytes: int
    capacity: int
    pinned_bytes: int


class Store:
    """A size-capped content-addressed store. Create with :meth:`Store.open`."""

    def __init__(
        self,
        root: Path,
        capacity: int,
        index: Index,
        lock: DirLock,
        clock: Callable[[], float] = time.time,
        on_corrupt: CorruptHook | None = None,
    ) -> None:
        self.root = root
        self.capacity = capacity
        self._clock = clock
        self._blobs = root / "blobs" / "sha256"
        self._tmp = root / "tmp"
        self._index = index
        self._lock = lock
        self._on_corrupt = on_corrupt or (lambda _found_by: None)
        self._lru: OrderedDict[str, int] = OrderedDict()  # hex -> size, oldest first
        self._pinned: set[str] = set()
        self._verified: set[str] = set()
        self._generation: dict[str, int] = {}
        self._generations = itertools.count(1)
        self._touched: set[str] = set()
        self._row_timer: asyncio.TimerHandle | None = None
        self._row_flushes: set[asyncio.Task[None]] = set()
        self._open: OrderedDict[str, Blob] = OrderedDict()
        self._bytes = 0
        self._writing: dict[Path, Ingest] = {}  # temp path -> ingest: their sizes are reserved
        self.on_evict: list[Callable[[Digest, int], None]] = []
        self.startup_report: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------

    @classmethod
    async def open(
        cls,
        root: Path,
        capacity: int,
        clock: Callable[[], float] = time.time,
        *,
        on_corrupt: CorruptHook | None = None,
    ) -> Store:
        """Lock the directory (creating it if needed), recover it, and open it.

        Never raises for what is found on disk (see :mod:`cachesvc.store.recovery`);
        raises :class:`~cachesvc.errors.ConfigError` when another store owns
        the directory or it cannot be created. ``on_corrupt(found_by)`` is
        called once per entry found with wrong or unreadable bytes.
        """
        lock = await asyncio.to_thread(DirLock.acquire, root, "cache dir")
        try:
            replaced = await asyncio.to_thread(recovery.prepare_layout, root)
            index, rows = await asyncio.to_thread(Index.open, root / "index", root / "quarantine")
            store = cls(root, capacity, index, lock, clock, on_corrupt)
            report = await asyncio.to_thread(store._check, rows)
        except BaseException:
            lock.release()
            raise
        store.startup_report = {**report, "layout_replaced": replaced}
        if any(store.startup_report.values()):
            log.warning("store %s recovered: %s", root, store.startup_report)
        for _ in range(report["corrupt_removed"]):
            store._on_corrupt("startup")
        await store.make_room(0)
        return store

    async def close(self) -> None:
        """Flush, close every handle and the index, and release the directory."""
        if self._row_timer is not None:
            self._row_timer.cancel()
            self._row_timer = None
        await asyncio.gather(*self._row_flushes, return_exceptions=True)
        await self.flush()
        for blob in self._open.values():
            blob.retire()
        self._open.clear()
        await asyncio.to_thread(self._index.close)
        self._lock.release()

    def check(self) -> dict[str, int]:
        """Reconcile disk and index again (see :mod:`cachesvc.store.recovery`), only
        while nothing else uses the store (temp files are removed). Returns
        counts of what was wrong and has been set right."""
        return self._check(self._index.rows())

    def _check(self, rows: dict[str, Entry]) -> dict[str, int]:
        found = recovery.recover(self.root, self._index, rows, self._clock())
        self._load(found.rows, found.verified)
        return found.report

    def _load(self, rows: dict[str, Entry], verified: set[str]) -> None:
        self._lru.clear()
        self._pinned.clear()
        self._verified = (self._verified & rows.keys()) | verified
        for key, entry in sorted(rows.items(), key=lambda kv: kv[1].last_access):
            self._lru[key] = entry.size
            self._generation.setdefault(key, next(self._generations))
            if entry.pinned:
                self._pinned.add(key)
        self._bytes = sum(self._lru.values())

    async def flush(self) -> None:
        """Persist access order (and pins) of entries touched since the last flush."""
        touched, self._touched = self._touched, set()
        if touched:
            try:
                await self._write_rows(touched)
            except BaseException:
                self._touched |= touched  # written by the next flush
                raise

    async def _write_rows(self, keys: set[str]) -> None:
        """Rows for ``keys``, stamped in their order of use (every key touched
        since the last flush was used after every key that was not). They are
        made here, on the loop: the LRU changes with every request, and a
        thread iterating it would meet "mutated during iteration"."""
        now = self._clock()
        order = [k for k in self._lru if k in keys]  # least recently used first
        pinned, sizes = self._pinned, self._lru
        rows = {k: Entry(sizes[k], now + i * 1e-6, k in pinned) for i, k in enumerate(order)}
        await asyncio.to_thread(self._index.put_many, rows)

    # -- reads -----------------------------------------------------------------

    def __contains__(self, digest: Digest) -> bool:
        return digest.hex in self._lru

    def size_of(self, digest: Digest) -> int | None:
        return self._lru.get(digest.hex)

    def path_of(self, digest: Digest) -> Path:
        return self._blobs / digest.hex

    def usage(self) -> Usage:
        pinned = sum(self._lru[k] for k in self._pinned if k in self._lru)
        return Usage(len(self._lru), self._bytes, self.capacity, pinned)

    def digests(self) -> list[Digest]:
        """Every entry, least recently used first."""
        return [Digest(h) for h in self._lru]

    def is_verified(self, digest: Digest) -> bool:
        return digest.hex in self._verified

    async def lease(self, digest: Digest, touch: bool = True) -> Blob | None:
        """An open handle on a committed package, or None if it is not here (or
        its file cannot be opened: the entry is then dropped as corrupt).

        Marks the entry recently used unless ``touch`` is False: a background
        read (the scrubber's) must not reorder eviction, keeps its handle
        first in line to be closed, and counts a file that cannot be opened
        as found by ``scrub``. Release with :meth:`release`.
        """
        size = self._lru.get(digest.hex)
        if size is None:
            return None
        if touch:
            self._lru.move_to_end(digest.hex)
            self._touched.add(digest.hex)
        blob = self._open.get(digest.hex)
        if blob is None:
            blob = await self._open_blob(digest, size, touch)
            if blob is None:
                return None
        elif touch:
            self._open.move_to_end(digest.hex)
        blob.acquire()
        return blob

    def is_hot(self, digest: Digest) -> bool:
        """Open and verified right now: :meth:`lease_hot` would lease it."""
        key = digest.hex
        return key in self._open and key in self._verified and key in self._lru

    def lease_hot(self, digest: Digest) -> Blob | None:
        """A lease on an entry that is open and verified right now, without
        any I/O (for the L1-hit fast path); None otherwise. Marks it used."""
        if not self.is_hot(digest):
            return None
        blob = self._open[digest.hex]
        self._lru.move_to_end(digest.hex)
        self._touched.add(digest.hex)
        self._open.move_to_end(digest.hex)
        blob.acquire()
        return blob

    @staticmethod
    def release(blob: Blob) -> None:
        blob.release()

    async def _open_blob(self, digest: Digest, size: int, hot: bool) -> Blob | None:
        generation = self._generation.get(digest.hex, 0)
        try:
            file = await asyncio.to_thread(open_file, self._blobs / digest.hex, size)
        except OSError as exc:
            if self._generation.get(digest.hex) == generation:  # not replaced meanwhile
                reason, found_by = f"cannot open its file: {exc}", "serve" if hot else "scrub"
                await self.drop_corrupt(digest, reason, found_by=found_by)
            return None
        if self._generation.get(digest.hex) != generation:  # evicted or replaced meanwhile
            file.close()
            return None
        blob = self._open.get(digest.hex)
        if blob is not None:  # another request opened it meanwhile
            file.close()
            return blob
        blob = Blob(digest, size, file, generation)
        self._keep_open(blob)
        if not hot:  # first to be closed: a scrub must not push hot handles out
            self._open.move_to_end(digest.hex, last=False)
        return blob

    # -- trust -------------------------------------------------------------------

    def mark_verified(self, digest: Digest, lease: Blob | None = None) -> None:
        """Record that this process hashed the entry's bytes and they matched.
        With ``lease``, only if the entry is still the file that lease reads."""
        if digest.hex in self._lru and self._current(digest, lease):
            self._verified.add(digest.hex)

    async def drop_corrupt(
        self, digest: Digest, reason: str, *, found_by: str = "serve", lease: Blob | None = None
    ) -> bool:
        """Remove an entry whose bytes were found wrong (file and row), log one
        line naming digest and reason, and count it (``found_by``: scrub,
        serve). With ``lease``, only if the entry is still the file that lease
        read (not a fresh copy committed meanwhile). Leases keep reading.
        Returns True if something was dropped."""
        if digest.hex not in self._lru or not self._current(digest, lease):
            log.info("store: %s was found corrupt (%s) but is already gone", digest, reason)
            return False
        log.error("store: dropping %s: %s (found by %s)", digest, reason, found_by)
        await self._drop(digest.hex)
        self._on_corrupt(found_by)
        return True

    def recheck(self, lease: Blob, found_by: str = "serve") -> Recheck:
        """Re-hash a leased entry in place (see :mod:`cachesvc.store.recheck`); the
        recheck takes over the lease and releases it on close."""
        return Recheck(lease, found_by)

    async def settle(self, verdict: Verdict) -> None:
        """Act on a recheck's verdict, only if the entry is still the file its
        lease read: matching bytes mark it verified; wrong ones drop it (see
        :meth:`drop_corrupt`, counted as found by ``verdict.found_by``), and
        then :class:`DigestMismatch` is raised."""
        digest = verdict.lease.digest
        if verdict.problem is None:
            self.mark_verified(digest, verdict.lease)
            return
        await self.drop_corrupt(
            digest, verdict.problem, found_by=verdict.found_by, lease=verdict.lease
        )
        raise DigestMismatch(verdict.problem)

    def _current(self, digest: Digest, lease: Blob | None) -> bool:
        return lease is None or self._generation.get(digest.hex) == lease.generation

    # -- writes ----------------------------------------------------------------

    async def begin(self, digest: Digest, size: int) -> Ingest:
        """Reserve room and start an ingest; the room stays reserved until the
        ingest is committed (:meth:`commit`) or closed. Raises :class:`StoreFull`
        when the package cannot be kept (over capacity)."""
        await self.make_room(size)
        if self._bytes + self._reserved() + size > self.capacity:
            raise StoreFull(f"no room for {size} bytes in a {self.capacity}-byte store")
        path = self._tmp / f"{digest.hex}.{secrets.token_hex(4)}"
        ingest = Ingest(digest, size, path)  # its first write creates the file
        self._writing[path] = ingest  # counted at once: concurrent begins see it
        return ingest

    def begin_unstored(self, digest: Digest, size: int) -> Ingest:
        """An ingest that only verifies: for packages the store cannot keep."""
        return Ingest(digest, size, None)

    def _reserved(self) -> int:
        """Bytes reserved for ingests begun and neither committed nor closed.
        A closed ingest's room is released here, when the store next asks."""
        for path in [p for p, ingest in self._writing.items() if ingest.closed]:
            del self._writing[path]
        return sum(ingest.size for ingest in self._writing.values())

    async def make_room(self, size: int) -> None:
        """Evict least-recently-used, unpinned entries until ``size`` more bytes fit
        under the low-water mark (or nothing evictable is left)."""
        target = min(self.capacity * LOW_WATER, self.capacity - size)
        if self._bytes + self._reserved() + size <= self.capacity:
            return
        for key in list(self._lru):
            if self._bytes + self._reserved() <= target:
                break
            if key not in self._pinned:
                await self.evict(Digest(key))

    async def evict(self, digest: Digest) -> bool:
        """Remove one entry (file and row). Leased handles keep reading."""
        size = self._lru.get(digest.hex)
        if size is None:
            return False
        await self._drop(digest.hex)
        for callback in self.on_evict:
            callback(digest, size)
        log.info("store: evicted %s (%d bytes)", digest.short, size)
        return True

    async def _drop(self, key: str) -> None:
        size = self._lru.pop(key, 0)
        self._bytes -= size
        self._pinned.discard(key)
        self._verified.discard(key)
        self._generation.pop(key, None)
        blob = self._open.pop(key, None)
        if blob is not None:
            blob.retire()
        await asyncio.to_thread(self._unlink, key)

    def _unlink(self, key: str) -> None:
        self._index.delete(key)
        (self._blobs / key).unlink(missing_ok=True)

    async def commit(self, verified: Verified) -> None:
        """Keep what an ingest of this store verified: the file takes its place,
        open and hot (the next request is served from it without a thread hop),
        and the ingest's reservation is released (its bytes count as stored
        now). Its index row is written with the next flush, within
        :data:`ROW_DELAY` (a crash before that leaves a blob without a row,
        which start-up re-hashes and adopts). What a spilled ingest verified
        (no ``path``) is not kept. Raises ValueError for a path that is not an
        open ingest of this store, and OSError when the disk refuses the rename."""
        if verified.path is None:
            return
        ingest = self._writing.get(verified.path)
        if ingest is None or ingest.closed or ingest.digest != verified.digest:
            raise ValueError(f"commit {verified.digest.short}: not an ingest this store writes")
        file = await asyncio.to_thread(self._publish, ingest.fd, verified)
        self._writing.pop(verified.path, None)
        self._add(verified.digest, verified.size, file)

    def _add(self, digest: Digest, size: int, file: io.FileIO) -> None:
        """A committed file joins the entries: most recently used, verified, hot."""
        key = digest.hex
        if key not in self._lru:
            self._bytes += size
        self._lru[key] = size
        self._lru.move_to_end(key)
        self._verified.add(key)
        self._touched.add(key)
        generation = self._generation[key] = next(self._generations)
        stale = self._open.pop(key, None)  # a handle on a file this commit replaced
        if stale is not None:
            stale.retire()
        self._keep_open(Blob(digest, size, file, generation))
        self._flush_soon()

    def _keep_open(self, blob: Blob) -> None:
        while len(self._open) >= MAX_OPEN_BLOBS:
            _, old = self._open.popitem(last=False)
            old.retire()
        self._open[blob.digest.hex] = blob

    def _flush_soon(self) -> None:
        """Write pending index rows within :data:`ROW_DELAY`: one transaction
        for every commit in between, not one per package."""
        if self._row_timer is None:
            loop = asyncio.get_running_loop()
            self._row_timer = loop.call_later(ROW_DELAY, self._start_row_flush)

    def _start_row_flush(self) -> None:
        self._row_timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._row_flushes.add(task)
        task.add_done_callback(self._row_flushes.discard)

    def _publish(self, fd: int, verified: Verified) -> io.FileIO:
        # No fsync: it cost 1-12 ms per package here, on every miss, and bought
        # nothing the read path needs. A process crash (kill -9) loses nothing
        # written (the page cache survives it); after an OS crash a renamed
        # file may be short or hold garbage, and every entry is re-hashed before
        # its first serve after a start (and by the scrubber), so such a file
        # is found and dropped, never served. A cache may lose entries; it may
        # not serve wrong bytes.
        assert verified.path is not None
        os.fchmod(fd, BLOB_MODE)  # before the rename: never a writable blob
        final = self._blobs / verified.digest.hex
        os.rename(verified.path, final)
        return open_file(final, verified.size)

    # -- pins ------------------------------------------------------------------

    async def pin(self, digest: Digest, max_share: float) -> bool:
        """Protect an entry from eviction while pinned bytes stay within
        ``max_share`` of capacity. Returns False when it is absent or over budget."""
        size = self._lru.get(digest.hex)
        if size is None:
            return False
        if digest.hex not in self._pinned:
            if self.usage().pinned_bytes + size > self.capacity * max_share:
                return False
            self._pinned.add(digest.hex)
        await self._write_rows({digest.hex})
        return True

    async def unpin(self, digest: Digest) -> bool:
        if digest.hex not in self._pinned:
            return False
        self._pinned.discard(digest.hex)
        await self._write_rows({digest.hex})
        return True

    def is_pinned(self, digest: Digest) -> bool:
        return digest.hex in self._pinned

"""The content-addressed package store on local disk.

Layout under the store's root::

    blobs/sha256/<hex>    committed, verified packages (the only files served)
    tmp/<hex>.<random>    ingests in progress; swept at every start
    index/                diskcache: hex -> Entry(size, last_access, pinned)

Guarantees:

* **Only verified bytes are ever committed.** :meth:`Ingest.commit` is the one
  place in cachesvc where a computed sha256 is compared with the expected one;
  there is no switch to skip it. Commit is temp file -> verify -> rename ->
  index, so a process crash at any moment (kill -9 included) leaves either
  nothing or a complete verified blob (no fsync: after an OS crash, entries
  are re-hashed before they are served again, see :class:`Recheck`);
  :meth:`Store.open` sweeps temp files and re-verifies blobs that were
  renamed but not yet indexed.
* **Size-capped, least-recently-used eviction.** Recency lives in memory (an
  ``OrderedDict``, so a hit costs no disk write) and is flushed to the diskcache
  index periodically and on close, so the order survives restarts. Eviction
  removes one victim at a time down to a low-water mark; pinned entries are
  skipped. diskcache's own culling is off (``cull_limit=0``): with large
  entries it deletes the row just inserted (see shared/STACK.md).
* **Open handles outlive eviction.** A :class:`Blob` lease keeps its file open;
  an evicted file is unlinked, and its space is freed when the last lease ends.

The store knows nothing of HTTP, peers, origins or the ring. Blocking calls
(diskcache, rename, hashing, open) run in threads.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import diskcache

from cachesvc.digest import Digest
from cachesvc.errors import DigestMismatch, UpstreamError

log = logging.getLogger(__name__)

LOW_WATER = 0.90  # evict down to this share of capacity when making room
FLUSH_INTERVAL = 30.0  # seconds between writes of access order to the index
MIN_BATCH = 256 << 10  # bytes gathered before a thread hop hashes + writes them, if idle
WRITE_BATCH = 2 << 20  # ... and at most this much while the previous batch is written
MAX_OPEN_BLOBS = 512  # open file handles kept for hot entries


class StoreFull(Exception):
    """The store cannot keep this package (disk full, or capacity all pinned/leased).

    Not a client error: the caller streams the bytes through without keeping them.
    """


class Entry(NamedTuple):
    size: int
    last_access: float
    pinned: bool = False


@dataclass(frozen=True)
class Usage:
    entries: int
    bytes: int
    capacity: int
    pinned_bytes: int


class Blob:
    """An open, verified package file, shared by every request that serves it.

    Use :meth:`Store.lease`; the file object stays open while leased and is
    closed when it is neither cached as hot nor leased.
    """

    __slots__ = ("digest", "size", "file", "verified", "_leases", "_retired")

    def __init__(self, digest: Digest, size: int, file: io.FileIO) -> None:
        self.digest = digest
        self.size = size
        self.file = file  # raw FileIO: fileno() for sendfile, pread via os
        self.verified = False  # hashed by this process (set by the store at lease)
        self._leases = 0
        self._retired = False

    def _acquire(self) -> None:
        self._leases += 1

    def _release(self) -> None:
        self._leases -= 1
        if self._retired and self._leases == 0:
            self.file.close()

    def _retire(self) -> None:
        self._retired = True
        if self._leases == 0:
            self.file.close()


class Store:
    """A size-capped content-addressed store. Create with :meth:`Store.open`."""

    def __init__(self, root: Path, capacity: int, clock: Callable[[], float] = time.time):
        self.root = root
        self.capacity = capacity
        self._clock = clock
        self._blobs = root / "blobs" / "sha256"
        self._tmp = root / "tmp"
        self._index = diskcache.Cache(
            str(root / "index"), eviction_policy="none", cull_limit=0, size_limit=2**62
        )
        self._lru: OrderedDict[str, int] = OrderedDict()  # hex -> size, oldest first
        self._pinned: set[str] = set()
        self._verified: set[str] = set()  # hashed by this process since it started
        self._touched: set[str] = set()
        self._open: OrderedDict[str, Blob] = OrderedDict()
        self._bytes = 0
        self._reserved = 0
        self.on_evict: list[Callable[[Digest, int], None]] = []

    # -- lifecycle -----------------------------------------------------------

    @classmethod
    async def open(cls, root: Path, capacity: int, clock: Callable[[], float] = time.time) -> Store:
        """Open (creating if needed) and recover the store: sweep temp files,
        drop index rows without a file, re-verify files without an index row."""
        root.mkdir(parents=True, exist_ok=True)
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        store = await asyncio.to_thread(cls, root, capacity, clock)
        report = await asyncio.to_thread(store.check, True)
        if any(report.values()):
            log.warning("store %s recovered: %s", root, report)
        await store.make_room(0)
        return store

    async def close(self) -> None:
        await self.flush()
        for blob in self._open.values():
            blob._retire()
        self._open.clear()
        await asyncio.to_thread(self._index.close)

    def check(self, fix: bool = True) -> dict[str, int]:
        """Reconcile disk and index; call from a thread. Returns counts of what
        was wrong. With ``fix``, temp files are removed, rows without a file are
        dropped and blobs without a row are re-hashed: adopted if they match
        their name, deleted if not."""
        report = {"temp_removed": 0, "rows_dropped": 0, "adopted": 0, "corrupt_removed": 0}
        for tmp in self._tmp.iterdir():
            report["temp_removed"] += 1
            if fix:
                tmp.unlink(missing_ok=True)
        rows: dict[str, Entry] = {}
        for key in list(self._index.iterkeys()):
            entry = Entry(*self._index[key])
            path = self._blobs / key
            if not path.is_file() or path.stat().st_size != entry.size:
                report["rows_dropped"] += 1
                if fix:
                    self._index.delete(key)
                    path.unlink(missing_ok=True)
                continue
            rows[key] = entry
        for path in self._blobs.iterdir():
            if path.name in rows:
                continue
            if _file_sha256(path) == path.name:
                report["adopted"] += 1
                if fix:
                    rows[path.name] = Entry(path.stat().st_size, self._clock())
                    self._index[path.name] = tuple(rows[path.name])
            else:
                report["corrupt_removed"] += 1
                if fix:
                    path.unlink(missing_ok=True)
        self._load(rows)
        return report

    def _load(self, rows: dict[str, Entry]) -> None:
        self._lru.clear()
        self._pinned.clear()
        for key, entry in sorted(rows.items(), key=lambda kv: kv[1].last_access):
            self._lru[key] = entry.size
            if entry.pinned:
                self._pinned.add(key)
        self._bytes = sum(self._lru.values())

    async def flush(self) -> None:
        """Persist access order (and pins) of entries touched since the last flush."""
        touched, self._touched = self._touched, set()
        if touched:
            await asyncio.to_thread(self._write_rows, touched)

    def _write_rows(self, keys: set[str]) -> None:
        now = self._clock()
        with self._index.transact():
            for key in keys:
                if key in self._lru:
                    self._index[key] = tuple(Entry(self._lru[key], now, key in self._pinned))

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
        return [Digest(h) for h in self._lru]

    async def lease(self, digest: Digest) -> Blob | None:
        """An open handle on a committed package, or None if it is not here.

        Marks the entry recently used. Release with :meth:`release`.
        """
        size = self._lru.get(digest.hex)
        if size is None:
            return None
        self._lru.move_to_end(digest.hex)
        self._touched.add(digest.hex)
        blob = self._open.get(digest.hex)
        if blob is None:
            blob = await self._open_blob(digest, size)
            if blob is None:
                return None
        else:
            self._open.move_to_end(digest.hex)
        blob.verified = digest.hex in self._verified
        blob._acquire()
        return blob

    def lease_hot(self, digest: Digest) -> Blob | None:
        """A lease on an entry that is open and verified right now, without
        any I/O (for the L1-hit fast path); None otherwise. Marks it used."""
        blob = self._open.get(digest.hex)
        if blob is None or digest.hex not in self._verified or digest.hex not in self._lru:
            return None
        self._lru.move_to_end(digest.hex)
        self._touched.add(digest.hex)
        self._open.move_to_end(digest.hex)
        blob.verified = True
        blob._acquire()
        return blob

    @staticmethod
    def release(blob: Blob) -> None:
        blob._release()

    async def _open_blob(self, digest: Digest, size: int) -> Blob | None:
        try:
            file = await asyncio.to_thread(open, self._blobs / digest.hex, "rb", buffering=0)
        except FileNotFoundError:
            log.error("store: %s indexed but its file is gone; dropping it", digest.short)
            await self._drop(digest.hex)
            return None
        if digest.hex not in self._lru:  # evicted while we opened it
            file.close()
            return None
        blob = self._open.get(digest.hex)
        if blob is not None:  # another request opened it meanwhile
            file.close()
            return blob
        blob = Blob(digest, size, file)
        self._open[digest.hex] = blob
        while len(self._open) > MAX_OPEN_BLOBS:
            _, old = self._open.popitem(last=False)
            old._retire()
        return blob

    # -- writes ----------------------------------------------------------------

    async def begin(self, digest: Digest, size: int) -> Ingest:
        """Reserve room and start an ingest. Raises :class:`StoreFull` when the
        package cannot be kept (over capacity, or the disk refuses the file)."""
        await self.make_room(size)
        if self._bytes + self._reserved + size > self.capacity:
            raise StoreFull(f"no room for {size} bytes in a {self.capacity}-byte store")
        self._reserved += size  # before the await: concurrent begins see it
        path = self._tmp / f"{digest.hex}.{secrets.token_hex(4)}"
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except BaseException as exc:
            self._reserved -= size
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"disk full creating {path.name}") from exc
            raise
        return Ingest(self, digest, size, path, fd)

    def begin_unstored(self, digest: Digest, size: int) -> Ingest:
        """An ingest that only verifies: for packages the store cannot keep."""
        return Ingest(self, digest, size, None, -1)

    async def make_room(self, size: int) -> None:
        """Evict least-recently-used, unpinned entries until ``size`` more bytes fit
        under the low-water mark (or nothing evictable is left)."""
        target = min(self.capacity * LOW_WATER, self.capacity - size)
        if self._bytes + self._reserved + size <= self.capacity:
            return
        for key in list(self._lru):
            if self._bytes + self._reserved <= target:
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

    def mark_verified(self, digest: Digest) -> None:
        """The entry's file was hashed by this process and matched its name."""
        if digest.hex in self._lru:
            self._verified.add(digest.hex)

    async def drop_corrupt(self, digest: Digest, reason: str) -> None:
        """Remove an entry whose bytes on disk no longer match its digest."""
        log.error("store: %s is corrupt on disk (%s); dropping it", digest.short, reason)
        await self._drop(digest.hex)

    def recheck(self, blob: Blob) -> Recheck:
        """Re-hash a leased entry in place; see :class:`Recheck`."""
        return Recheck(self, blob)

    async def _drop(self, key: str) -> None:
        self._verified.discard(key)
        size = self._lru.pop(key, 0)
        self._bytes -= size
        self._pinned.discard(key)
        blob = self._open.pop(key, None)
        if blob is not None:
            blob._retire()
        await asyncio.to_thread(self._unlink, key)

    def _unlink(self, key: str) -> None:
        self._index.delete(key)
        (self._blobs / key).unlink(missing_ok=True)

    async def _commit(self, ingest: Ingest) -> None:
        key = ingest.digest.hex
        entry = Entry(ingest.size, self._clock())
        await asyncio.to_thread(self._publish, ingest, entry)
        if key not in self._lru:
            self._bytes += ingest.size
        self._lru[key] = ingest.size
        self._lru.move_to_end(key)
        self._verified.add(key)

    def _publish(self, ingest: Ingest, entry: Entry) -> None:
        # No fsync: it cost 1-12 ms per package here, on every miss, and bought
        # nothing the read path needs. A process crash (kill -9) loses nothing
        # written (the page cache survives it); after an OS crash a renamed
        # file may be short or hold garbage, and every entry is re-hashed before
        # its first serve after a start (and by the scrubber), so such a file
        # is found and dropped, never served. A cache may lose entries; it may
        # not serve wrong bytes.
        assert ingest.path is not None
        os.rename(ingest.path, self._blobs / ingest.digest.hex)
        self._index[ingest.digest.hex] = tuple(entry)

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
        await asyncio.to_thread(self._write_rows, {digest.hex})
        return True

    async def unpin(self, digest: Digest) -> bool:
        if digest.hex not in self._pinned:
            return False
        self._pinned.discard(digest.hex)
        await asyncio.to_thread(self._write_rows, {digest.hex})
        return True

    def is_pinned(self, digest: Digest) -> bool:
        return digest.hex in self._pinned


class Ingest:
    """One package being written: :meth:`write`, then :meth:`commit`, then :meth:`close`.

    ``file`` is readable while writing: followers of a coalesced fetch read
    ``[0, on_disk)`` from it, so it stays open until :meth:`close`, even after
    commit renamed it. When the disk refuses a write (ENOSPC), or the store had
    no room to begin with (:meth:`Store.begin_unstored`), the ingest keeps
    hashing but stops writing: ``on_disk`` freezes, ``spilled`` is set, and
    :meth:`commit` then only verifies.
    """

    def __init__(self, store: Store, digest: Digest, size: int, path: Path | None, fd: int):
        self.store = store
        self.digest = digest
        self.size = size
        self.path = path
        self.fd = fd
        self.file = open(fd, "rb", buffering=0, closefd=False) if fd >= 0 else None  # noqa: SIM115
        self.received = 0
        self.on_disk = 0
        self.spilled = fd < 0
        self.verified = False
        self.committed = False
        self._reservation = size if fd >= 0 else 0
        self._writing: asyncio.Future[None] | None = None
        self.on_written: Callable[[], None] | None = None  # after each batch lands on disk
        self._hash = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_len = 0

    async def write(self, chunk: bytes) -> None:
        """Append bytes; they are hashed and written in batches off the loop.

        One batch is hashed and written in a thread while the next one is
        gathered (at most one in flight: memory stays bounded), so receiving,
        hashing and writing overlap. Batches are small while the writer is idle
        (bytes reach the disk, and followers, soon) and grow while it is busy
        (fewer thread hops)."""
        if self.received + len(chunk) > self.size:
            raise UpstreamError(f"ingest {self.digest.short}: upstream sent over {self.size} bytes")
        self.received += len(chunk)
        self._pending.append(chunk)
        self._pending_len += len(chunk)
        idle = self._writing is None or self._writing.done()
        if self._pending_len >= WRITE_BATCH or (idle and self._pending_len >= MIN_BATCH):
            await self._flush()

    async def drain(self) -> None:
        """Hash and write everything pending; afterwards ``on_disk`` covers it."""
        await self._flush()
        await self._wait_writing()

    async def _flush(self) -> None:
        """Start hashing and writing what is pending, once the batch before it is done."""
        await self._wait_writing()
        if not self._pending:
            return
        batch, self._pending, self._pending_len = self._pending, [], 0
        self._writing = asyncio.ensure_future(asyncio.to_thread(self._write_batch, batch))
        self._writing.add_done_callback(self._written)

    def _written(self, _future: asyncio.Future[None]) -> None:
        if self.on_written is not None:
            self.on_written()

    async def _wait_writing(self) -> None:
        if self._writing is not None and not self._writing.done():
            await asyncio.shield(self._writing)
        elif self._writing is not None:
            self._writing.result()  # a failed write raises here

    def _write_batch(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self._hash.update(chunk)
        if self.spilled:
            return
        try:
            for chunk in batch:
                view = memoryview(chunk)
                while view:  # pwrite may write less than asked
                    n = os.pwrite(self.fd, view, self.on_disk)
                    self.on_disk += n
                    view = view[n:]
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.warning("store: disk full writing %s; passing it through", self.digest.short)
            self.spilled = True

    async def commit(self) -> None:
        """:meth:`verify`, then :meth:`persist`."""
        await self.verify()
        await self.persist()

    async def verify(self) -> None:
        """Check size and sha256 of everything written (:func:`compare`).
        Raises :class:`DigestMismatch`, or :class:`UpstreamError` for a short body.
        """
        await self.drain()
        if self.received != self.size:
            raise UpstreamError(f"ingest {self.digest.short}: got {self.received} of {self.size}")
        compare(self.digest, self._hash, "ingest")
        self.verified = True

    async def persist(self) -> None:
        """Make verified bytes visible (rename, index); a
        spilled ingest keeps nothing."""
        if not self.verified:
            raise DigestMismatch(f"ingest {self.digest.short}: persist before verify")
        if not self.spilled:
            await self.store._commit(self)
            self.committed = True
            self._release_reservation()  # the bytes are counted as stored now

    async def close(self) -> None:
        """Release the reservation and the file; idempotent. An uncommitted
        temp file is removed. Waits for a write still running in its thread,
        so the fd is never closed (and reused) under it."""
        if self.fd == -2:
            return
        fd, self.fd = self.fd, -2
        self._release_reservation()
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        if fd >= 0:
            await asyncio.to_thread(self._close, fd)

    def _release_reservation(self) -> None:
        self.store._reserved -= self._reservation
        self._reservation = 0

    def _close(self, fd: int) -> None:
        assert self.file is not None and self.path is not None
        self.file.close()
        os.close(fd)
        if not self.committed:
            self.path.unlink(missing_ok=True)


class Recheck:
    """A committed entry re-hashed in place, for a flight that serves it while
    hashing (its first serve since this process started).

    Shaped like :class:`Ingest` for :class:`~cachesvc.flight.Flight`: ``file``,
    ``on_disk`` (bytes hashed so far, readable by followers), ``received``,
    :meth:`verify`, :meth:`persist`, :meth:`close`. Holds its own lease on the
    blob, so eviction cannot pull the file away. A mismatch (rot, truncation)
    drops the entry from the store.
    """

    spilled = False

    def __init__(self, store: Store, blob: Blob) -> None:
        self.store = store
        self.blob = blob
        self.digest = blob.digest
        self.size = blob.size
        self.file: io.FileIO | None = blob.file
        self.on_disk = 0
        self._hash = hashlib.sha256()
        self._short = False

    @property
    def received(self) -> int:
        return self.on_disk

    async def step(self) -> bool:
        """Hash the next block in a thread; False when every byte is hashed."""
        want = min(RECHECK_BLOCK, self.size - self.on_disk)
        if want <= 0 or self._short:
            return False
        try:
            block = await asyncio.to_thread(os.pread, self.blob.file.fileno(), want, self.on_disk)
        except OSError as exc:  # an unreadable block is rot too: verify() drops the entry
            log.error("store: reading %s at %d: %s", self.digest.short, self.on_disk, exc)
            block = b""
        self._hash.update(block)
        self.on_disk += len(block)
        self._short = len(block) < want
        return not self._short and self.on_disk < self.size

    async def verify(self) -> None:
        """Size and sha256 of the file as it is on disk; a mismatch drops the entry."""
        try:
            if self.on_disk != self.size:
                raise DigestMismatch(
                    f"recheck {self.digest.short}: file has {self.on_disk} of {self.size} bytes"
                )
            compare(self.digest, self._hash, "recheck")
        except DigestMismatch as exc:
            await self.store.drop_corrupt(self.digest, str(exc))
            raise

    async def persist(self) -> None:
        self.store.mark_verified(self.digest)

    async def close(self) -> None:
        if self.file is not None:
            self.file = None
            Store.release(self.blob)


RECHECK_BLOCK = 1 << 20


def compare(digest: Digest, hashed: hashlib._Hash, what: str) -> None:
    """The one comparison of computed and expected sha256 in cachesvc.
    Raises :class:`DigestMismatch`."""
    actual = hashed.hexdigest()
    if actual != digest.hex:
        raise DigestMismatch(f"{what} {digest.short}: bytes hash to sha256:{actual[:12]}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in _blocks(f):
            h.update(block)
    return h.hexdigest()


def _blocks(f: object, size: int = 1 << 20) -> Iterator[bytes]:
    while block := f.read(size):  # type: ignore[attr-defined]
        yield block

"""One package being written into the store's ``tmp/``, hashed as it is written.
:meth:`Ingest.verify` checks size and sha256 (:func:`cachesvc.digest.compare`)
and returns a :class:`Verified`, the only thing ``Store.commit`` keeps. The
ingest never calls the store: the store reserves, commits and releases.

* Hashing and writing run in a thread, one batch in flight: memory is bounded.
* Disk full (ENOSPC, EDQUOT): it keeps hashing, stops writing (``spilled``).
* :meth:`Ingest.close` is idempotent, waits for a running write, and removes
  the temp file unless a commit renamed it away.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cachesvc.digest import Digest, compare
from cachesvc.errors import UpstreamError

log = logging.getLogger(__name__)

MIN_BATCH = 256 << 10  # bytes gathered before a thread hop hashes + writes them, if idle
WRITE_BATCH = 2 << 20  # ... and at most this much while the previous batch is written


@dataclass(frozen=True)
class Verified:
    """What :meth:`Ingest.verify` found right (made there only): ``size`` bytes
    hashing to ``digest``, all of them in the temp file at ``path``, or
    ``path`` None when the ingest spilled and holds nothing to keep."""

    digest: Digest
    size: int
    path: Path | None


class Ingest:
    """One package being written: :meth:`write`, then :meth:`verify`, then :meth:`close`.

    Made by :meth:`Store.begin <cachesvc.store.castore.Store.begin>`, which
    reserves ``size`` bytes until the ingest is committed or closed. The temp
    file at ``path`` is created by the first batch's thread (one thread hop
    less per package). ``file`` is readable while writing: followers of a
    coalesced fetch read ``[0, on_disk)`` from it, so it stays open until
    :meth:`close`, even after a commit renamed it. When the disk refuses the
    file or a write (ENOSPC), or the store had no room to begin with
    (``Store.begin_unstored``, no ``path``), the ingest keeps hashing but stops
    writing: ``on_disk`` freezes, ``spilled`` is set, and what it verifies has
    nothing to keep.
    """

    def __init__(self, digest: Digest, size: int, path: Path | None):
        self.digest = digest
        self.size = size
        self.path = path
        self.fd = -1  # -1: not created yet; -2: closed
        self.file: io.FileIO | None = None
        self.received = 0
        self.on_disk = 0
        self.spilled = path is None
        self.closed = False  # close() began: the store no longer reserves room for it
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
        """Hash and write everything pending (and make the file, even for an
        empty package); afterwards ``on_disk`` covers it."""
        await self._flush(make_file=True)
        await self._wait_writing()

    async def _flush(self, make_file: bool = False) -> None:
        """Start hashing and writing what is pending, once the batch before it is done."""
        await self._wait_writing()
        if not self._pending and not (make_file and self.fd == -1 and not self.spilled):
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
            if self.fd == -1:
                self._create()
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

    def _create(self) -> None:
        """The temp file; in the first batch's thread. ``file`` is set before
        ``on_disk`` can grow, so followers never see bytes without a file."""
        assert self.path is not None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.file = open(fd, "rb", buffering=0, closefd=False)  # noqa: SIM115
        self.fd = fd

    async def verify(self) -> Verified:
        """Check size and sha256 of everything written (:func:`compare`).
        Raises :class:`DigestMismatch`, or :class:`UpstreamError` for a short body.
        """
        await self.drain()
        if self.received != self.size:
            raise UpstreamError(f"ingest {self.digest.short}: got {self.received} of {self.size}")
        compare(self.digest, self._hash, "ingest")
        return Verified(self.digest, self.size, None if self.spilled else self.path)

    async def close(self) -> None:
        """Close the file; idempotent. A temp file no commit renamed away is
        removed. Waits for a write still running in its thread, so the fd is
        never closed (and reused) under it, and a temp file that write makes
        is removed too."""
        if self.closed:
            return
        self.closed = True
        # The store forgets a closed ingest when it next counts its reservations;
        # until then the ingest holds no bytes and no flight.
        self._pending, self._pending_len = [], 0
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        self.on_written = None  # the last batch's callback ran before the gather returned
        fd, self.fd = self.fd, -2
        if fd >= 0:
            await asyncio.to_thread(self._close, fd)

    def _close(self, fd: int) -> None:
        """Close ``fd``; unlink ``path`` if it still names this file. After a
        commit it names nothing (or, in theory, a later ingest's temp file)."""
        assert self.file is not None and self.path is not None
        ours = os.fstat(fd)
        self.file.close()  # fd >= 0: the file was created
        os.close(fd)
        try:
            there = os.lstat(self.path)
        except FileNotFoundError:
            return
        if os.path.samestat(ours, there):
            self.path.unlink(missing_ok=True)

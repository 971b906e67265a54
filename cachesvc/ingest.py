"""One package being written into the store, and the one digest comparison.

:class:`Ingest` hashes bytes as they are written to ``tmp/`` and, at the end,
checks size and sha256 before :class:`cachesvc.store.Store` may commit them.
:func:`matches` is the only place in cachesvc where a computed sha256 is
compared with the expected one: ingests, start-up adoption and re-hashes of
stored blobs (:meth:`cachesvc.store.Store.judge`) all ask it. There is no
switch to skip it.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cachesvc.digest import Digest
from cachesvc.errors import DigestMismatch, UpstreamError

if TYPE_CHECKING:
    from cachesvc.store import Store

log = logging.getLogger(__name__)

WRITE_BATCH = 1 << 20  # bytes gathered before one thread hop writes + hashes them


def matches(sha256: hashlib._Hash, digest: Digest) -> bool:
    """Whether the bytes fed to ``sha256`` are the ones ``digest`` names."""
    return hmac.compare_digest(sha256.hexdigest(), digest.hex)


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
        self._hash = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_len = 0

    async def write(self, chunk: bytes) -> None:
        """Append bytes; they are hashed and written in batches off the loop."""
        if self.received + len(chunk) > self.size:
            raise UpstreamError(f"ingest {self.digest.short}: upstream sent over {self.size} bytes")
        self.received += len(chunk)
        self._pending.append(chunk)
        self._pending_len += len(chunk)
        if self._pending_len >= WRITE_BATCH:
            await self.drain()

    async def drain(self) -> None:
        """Hash and write what is pending; afterwards ``on_disk`` covers it."""
        if not self._pending:
            return
        batch, self._pending, self._pending_len = self._pending, [], 0
        self._writing = asyncio.ensure_future(asyncio.to_thread(self._write_batch, batch))
        await asyncio.shield(self._writing)

    def _write_batch(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self._hash.update(chunk)
        if self.spilled:
            return
        data = b"".join(batch) if len(batch) > 1 else batch[0]
        try:
            view = memoryview(data)
            while view:
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
        """Check size and sha256 of everything written.

        Raises :class:`DigestMismatch`, or :class:`UpstreamError`
        for a short body.
        """
        await self.drain()
        if self.received != self.size:
            raise UpstreamError(f"ingest {self.digest.short}: got {self.received} of {self.size}")
        if not matches(self._hash, self.digest):
            actual = self._hash.hexdigest()[:12]
            raise DigestMismatch(f"ingest {self.digest.short}: bytes hash to sha256:{actual}")
        self.verified = True

    async def persist(self) -> None:
        """Make verified bytes durable and visible (fsync, rename, index); a
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

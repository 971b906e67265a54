"""A committed entry re-hashed in place: by its first serve since this process
started (followers read it while it is hashed), or by the scrubber.

:class:`Recheck` is shaped like :class:`~cachesvc.store.ingest.Ingest` for
:class:`~cachesvc.readpath.flight.Flight`: ``file``, ``on_disk`` (bytes hashed so far,
readable by followers), ``received``, :meth:`verify`, :meth:`persist`,
:meth:`close`. It holds its own lease on the blob, so eviction cannot pull the
file away, and a verdict only lands on the file it read: a fresh copy
committed meanwhile is neither dropped nor marked. A mismatch, a short file or
an unreadable block drops the entry (:meth:`cachesvc.store.castore.Store.drop_corrupt`,
counted as found by ``found_by``); a match marks it verified.

Every block is read in a thread; if the caller is cancelled meanwhile, the read
still finishes before the cancellation goes on, so :meth:`close` never closes
the descriptor under it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from cachesvc.digest import compare
from cachesvc.errors import DigestMismatch
from cachesvc.store.blob import Blob

if TYPE_CHECKING:
    from cachesvc.store.castore import Store

log = logging.getLogger(__name__)

RECHECK_BLOCK = 1 << 20

T = TypeVar("T")


class Recheck:
    """One leased entry being re-hashed; made by :meth:`~cachesvc.store.castore.Store.recheck`."""

    spilled = False

    def __init__(self, store: Store, blob: Blob, found_by: str = "serve") -> None:
        self.store = store
        self.blob = blob
        self.digest = blob.digest
        self.size = blob.size
        self.found_by = found_by
        self.file: io.FileIO | None = blob.file
        self.on_disk = 0
        self._hash = hashlib.sha256()
        self._short = False

    @property
    def received(self) -> int:
        return self.on_disk

    async def step(self, block: int = RECHECK_BLOCK) -> bool:
        """Hash the next ``block`` bytes in a thread; False when every byte is hashed."""
        want = min(block, self.size - self.on_disk)
        if want <= 0 or self._short:
            return False
        fd = self.blob.file.fileno()
        try:
            data = await finish_in_thread(os.pread, fd, want, self.on_disk)
        except OSError as exc:  # an unreadable block is rot too: verify() drops the entry
            log.error("store: reading %s at %d: %s", self.digest.short, self.on_disk, exc)
            data = b""
        self._hash.update(data)
        self.on_disk += len(data)
        self._short = len(data) < want
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
            await self.store.drop_corrupt(
                self.digest, str(exc), found_by=self.found_by, lease=self.blob
            )
            raise

    async def persist(self) -> None:
        self.store.mark_verified(self.digest, self.blob)

    async def close(self) -> None:
        if self.file is not None:
            self.file = None
            self.store.release(self.blob)


async def finish_in_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a thread; if we are cancelled meanwhile, the thread's
    call still finishes before the cancellation goes on."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise

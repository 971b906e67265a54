"""A committed entry re-hashed in place, by its first serve since this process
started or by the scrubber. Only reports (:meth:`Recheck.verdict`);
:meth:`cachesvc.store.castore.Store.settle` acts on it.

* Shaped like an :class:`~cachesvc.store.ingest.Ingest` for a flight
  (``file``, ``on_disk``, ``received``, ``close``): followers read what is hashed.
* Holds its own lease: eviction cannot pull the file away; the verdict names
  that lease, so it never lands on a fresh copy committed meanwhile.
* A short file or an unreadable block is a problem, like a mismatch.
* Every block is read in a thread that finishes even if the caller is
  cancelled, so :meth:`Recheck.close` never closes the descriptor under it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from cachesvc.digest import compare
from cachesvc.errors import DigestMismatch
from cachesvc.store.blob import Blob

log = logging.getLogger(__name__)

RECHECK_BLOCK = 1 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class Verdict:
    """What a recheck found in the file ``lease`` reads: ``problem`` says what
    was wrong, None when size and sha256 matched."""

    lease: Blob
    found_by: str
    problem: str | None


class Recheck:
    """One leased entry being re-hashed; made by :meth:`~cachesvc.store.castore.Store.recheck`."""

    spilled = False

    def __init__(self, blob: Blob, found_by: str = "serve") -> None:
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
        except OSError as exc:  # an unreadable block is rot too: a short file
            log.error("store: reading %s at %d: %s", self.digest.short, self.on_disk, exc)
            data = b""
        self._hash.update(data)
        self.on_disk += len(data)
        self._short = len(data) < want
        return not self._short and self.on_disk < self.size

    def verdict(self) -> Verdict:
        """Size and sha256 of the file as it was read, once every block is hashed."""
        return Verdict(self.blob, self.found_by, self._problem())

    def _problem(self) -> str | None:
        if self.on_disk != self.size:
            return f"recheck {self.digest.short}: file has {self.on_disk} of {self.size} bytes"
        try:
            compare(self.digest, self._hash, "recheck")
        except DigestMismatch as exc:
            return str(exc)
        return None

    async def close(self) -> None:
        """Give the lease back; idempotent."""
        if self.file is not None:
            self.file = None
            self.blob.release()


async def finish_in_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a thread; if we are cancelled meanwhile, the thread's
    call still finishes before the cancellation goes on."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise

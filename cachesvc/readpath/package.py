"""What the read path hands out: a :class:`Package`, one request's view of one
package (``size``, ``tier``, ``via``, and :meth:`Package.spans`: a range as
:class:`FileSpan` s for ``sendfile`` or ``bytes``). Every package comes from
``Tiers.open``, which owns its lifetime; this module fetches and verifies nothing.

Guarantee of every implementation (:class:`BlobPackage` here, ``Follower`` in
:mod:`cachesvc.readpath.flight`): the last byte of a range is yielded only
after a good sha256 verdict; a bad one raises instead. A consumer that
finishes only when :meth:`Package.spans` ends has sent only verified bytes.
The HTTP layer and a cold unpack consume spans; warm and prefetch wait for
:meth:`Package.complete` (``Tiers.fetch``).
"""

from __future__ import annotations

import io
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from cachesvc.digest import Digest
from cachesvc.store.castore import Blob, Store
from cachesvc.tier import Tier

SMALL = 64 << 10
"""Bodies up to this size are read and sent with their response headers in
one write (one segment, one syscall), not as headers then ``sendfile``."""


@dataclass(frozen=True, slots=True)
class FileSpan:
    """``count`` bytes of ``file`` at ``offset``: send with ``sendfile``."""

    file: io.FileIO
    offset: int
    count: int


Span = FileSpan | bytes


def span_len(span: Span) -> int:
    return span.count if isinstance(span, FileSpan) else len(span)


class Package(Protocol):
    """One request's handle on a package; valid inside ``Tiers.open``."""

    @property
    def digest(self) -> Digest: ...

    @property
    def size(self) -> int: ...

    @property
    def tier(self) -> Tier:
        """X-Cache-Tier: where the bytes of this request come from."""
        ...

    @property
    def via(self) -> tuple[str, ...]:
        """The agents these bytes come through, nearest first (fan-out)."""
        ...

    def spans(self, start: int, end: int) -> AsyncGenerator[Span, None]:
        """The bytes ``[start, end)`` as they become readable; the last one only
        after a good verdict. Raises the package's failure."""
        ...

    async def complete(self) -> None:
        """Wait until every byte is verified (and kept, when the store can keep it)."""
        ...

    async def cut_short(self, reason: str) -> None:
        """A :class:`FileSpan` it gave held fewer bytes than it said (its file
        shrank on disk): drop what the file belongs to, so the next request
        refetches it. The consumer aborts its response either way."""
        ...


class BlobPackage:
    """A verified entry of the store, leased by ``Tiers.open`` for the request."""

    def __init__(self, blob: Blob, tier: Tier, store: Store) -> None:
        self.store = store
        self.blob = blob
        self.digest = blob.digest
        self.size = blob.size
        self.tier = tier
        self.via: tuple[str, ...] = ()

    async def spans(self, start: int, end: int) -> AsyncGenerator[Span, None]:
        if end > start:
            yield FileSpan(self.blob.file, start, end - start)

    async def complete(self) -> None:
        return None

    async def cut_short(self, reason: str) -> None:
        """Dropped as corrupt (found by "serve"), as the fast path drops it."""
        await self.store.drop_corrupt(self.digest, reason, lease=self.blob)

"""What the read path hands to whoever sends or consumes a package.

A :class:`Package` is one request's view of one package: its ``size``, the
``tier`` its bytes come from, and :meth:`Package.spans`, the bytes of a range
as a sequence of :data:`Span` s, each either a :class:`FileSpan` (bytes of an
open file, for ``sendfile``) or ``bytes``. The HTTP layer only writes spans
and aborts on failure; warm, prefetch and unpack only wait for
:meth:`Package.complete`. Every package comes from :meth:`Tiers.open
<cachesvc.readpath.tiers.Tiers.open>`, which owns its lifetime.

Guarantee of every implementation: the last byte of a range is yielded only
after the package's sha256 verdict is good; a bad verdict raises
(:class:`~cachesvc.errors.CachesvcError`) instead. So a consumer that writes
every span it got and finishes only when :meth:`spans` ends has sent a
complete body only of verified bytes.

Two implementations: :class:`BlobPackage` here (a verified entry of the
store: one span of the open file), and :class:`cachesvc.readpath.flight.Follower` (a
body growing while it is fetched or re-verified).
"""

from __future__ import annotations

import io
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from cachesvc.digest import Digest
from cachesvc.store.castore import Blob
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


class BlobPackage:
    """A verified entry of the store, leased by ``Tiers.open`` for the request."""

    def __init__(self, blob: Blob, tier: Tier) -> None:
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

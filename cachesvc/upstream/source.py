"""The seam between the read walk and where bytes come from: a :class:`Source`
is one upstream as :mod:`cachesvc.readpath.tiers` asks it (the owner peer as
fan-out tracker, another peer, the origin); opening one gives a :class:`Body`
(the package's size, its bytes from an offset as they arrive). Nothing here
verifies or keeps bytes: the flight's ingest does, whatever the source.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError
from cachesvc.tier import Tier, Upstream


@dataclass
class Body:
    """An open upstream body: ``size`` of the whole package, bytes from ``offset``;
    ``via``: the agents these bytes come through, nearest first (fan-out)."""

    size: int
    offset: int
    chunks: AsyncIterator[bytes]
    via: tuple[str, ...] = ()


Opened = AbstractAsyncContextManager[Body]
"""An upstream body, open inside ``async with`` and released on exit."""


class Source(Protocol):
    """One upstream, as the walk sees it."""

    @property
    def name(self) -> str: ...

    @property
    def tier(self) -> Tier:
        """What X-Cache-Tier says when this source served the bytes."""
        ...

    @property
    def upstream(self) -> Upstream:
        """Who sends the bytes now (a metric label)."""
        ...

    def open(self, digest: Digest, offset: int) -> Opened:
        """The body from byte ``offset``; :class:`~cachesvc.errors.NotFound`
        when the source's answer is final, another error when it failed."""
        ...

    async def head(self, digest: Digest) -> int: ...

    def retry(self, exc: CachesvcError) -> bool:
        """Whether to ask this source again, resuming, after ``exc`` mid-body."""
        ...

    def failed(self) -> None:
        """It failed (down, error, broke off): prefer the others for a while."""
        ...

    def refused(self) -> None:
        """Bytes it delivered did not match the digest: leave it out for a while."""
        ...

    def succeeded(self) -> None: ...

"""The walk without sockets: a real store, real flights and :class:`Tiers`
over a ``file://`` origin, and a source in a peer's place that lies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from cachesvc.digest import Digest
from cachesvc.metrics import Metrics
from cachesvc.readpath.flight import Flights
from cachesvc.readpath.package import Package
from cachesvc.readpath.tiers import OriginSource, Tiers
from cachesvc.store.castore import Store
from cachesvc.tier import Tier, Upstream
from cachesvc.upstream.origin import FileOrigin
from cachesvc.upstream.source import Body, Opened, Source
from tests.servers import digest_of, eventually, payload


class GatedLiar(OriginSource):
    """In a peer's place: once its gate opens, sends the origin's bytes with
    the first one flipped, and is left out of the walk once refused."""

    def __init__(self, origin: FileOrigin, gate: asyncio.Event) -> None:
        super().__init__(origin, "liar", Tier.L2, Upstream.PEER)
        self.gate = gate
        self.lied = False

    def open(self, digest: Digest, offset: int) -> Opened:
        @asynccontextmanager
        async def opened() -> AsyncIterator[Body]:
            await self.gate.wait()
            async with self.origin.open(digest, offset) as body:
                yield Body(body.size, body.offset, self._flipped(body.chunks))

        return opened()

    async def _flipped(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        first = True
        async for chunk in chunks:
            yield bytes([chunk[0] ^ 1]) + chunk[1:] if first else chunk
            first = False

    def refused(self) -> None:
        self.lied = True


async def test_a_request_that_follows_the_refill_after_a_lie_is_coalesced_once(
    tmp_path: Path,
) -> None:
    origin = FileOrigin(tmp_path / "origin")
    await origin.start()
    data = payload(40_000, seed=5)
    digest = digest_of(data)
    (origin.root / "blobs" / "sha256").mkdir(parents=True)
    (origin.root / "blobs" / "sha256" / digest.hex).write_bytes(data)
    store = await Store.open(tmp_path / "store", 10 << 20)
    flights = Flights(store)
    metrics = Metrics()
    liar = GatedLiar(origin, asyncio.Event())
    good = OriginSource(origin)

    def sources(_digest: Digest) -> Sequence[Source]:
        return [good] if liar.lied else [liar, good]

    tiers = Tiers(store, flights, sources, metrics, Tier.L1)

    async def send(package: Package) -> tuple[int, Tier]:
        await package.complete()  # nothing went out: a refusal here is retried
        return package.size, package.tier

    try:
        first = asyncio.create_task(tiers.deliver(digest, send))
        await eventually(lambda: flights.get(digest), "the first fill started")
        second = asyncio.create_task(tiers.deliver(digest, send))  # joins the liar's flight
        await eventually(
            lambda: metrics.coalesced._value.get() == 1 or None, "the second request joined"
        )
        liar.gate.set()
        assert [await first, await second] == [(len(data), Tier.ORIGIN)] * 2
        assert metrics.digest_mismatch._value.get() == 1
        assert metrics.coalesced._value.get() == 1  # both retries joined the refill: not counted
    finally:
        await flights.close()
        await store.close()
        await origin.close()

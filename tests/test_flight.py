"""Coalescing without sockets: one fill, many followers, one verdict."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cachesvc.errors import DigestMismatch, Overloaded, UpstreamError
from cachesvc.flight import Flight, Flights
from cachesvc.store import Store
from tests.servers import digest_of, payload

CHUNK = 64 * 1024


async def read_all(flight: Flight) -> bytes:
    """Follow a flight to the end the way the HTTP layer does."""
    key = flight.follow()
    try:
        await flight.started
        assert flight.size is not None and flight.ingest is not None
        out = bytearray()
        while len(out) < flight.size:
            ready = await flight.available(len(out))
            kind, span = flight.read_span(len(out), ready)
            if kind == "file":
                assert isinstance(span, int)
                out += os.pread(flight.ingest.fd, span, len(out))
            else:
                out += span  # type: ignore[operator]
            flight.advance(key, len(out))
        await flight.verdict()
        return bytes(out)
    finally:
        await flight.leave(key)


def filler(data: bytes, calls: list[int], gate: asyncio.Event | None = None, claim=None):
    async def fill(flight: Flight) -> None:
        calls.append(1)
        await flight.begin(len(data), "ORIGIN")
        for i in range(0, len(data), CHUNK):
            if gate is not None and i >= len(data) // 2:
                await gate.wait()
            await flight.feed(data[i : i + CHUNK])
        await flight.finish()

    return fill


async def test_many_followers_share_one_fill_and_get_the_bytes(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100 * 2**20)
    flights = Flights(store)
    data = payload(3 * 2**20)
    calls: list[int] = []
    flight = flights.start(digest_of(data), filler(data, calls))
    joined = [flights.get(digest_of(data)) for _ in range(9)]
    assert all(j is flight for j in joined)
    bodies = await asyncio.gather(*(read_all(flight) for _ in range(10)))
    assert calls == [1] and all(b == data for b in bodies)
    await flights.wait_idle()  # followers finish before the fsync; the store after it
    assert digest_of(data) in store
    await flights.close()
    await store.close()


async def test_followers_see_bytes_before_the_fill_ends(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100 * 2**20)
    flights = Flights(store)
    data = payload(4 * 2**20)
    gate = asyncio.Event()
    flight = flights.start(digest_of(data), filler(data, [], gate))
    await flight.started
    ready = await flight.available(0)
    assert 0 < ready < len(data) and not flight.done.done()
    gate.set()
    assert await read_all(flight) == data
    await flights.close()
    await store.close()


async def test_a_wrong_digest_fails_every_follower_and_keeps_nothing(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100 * 2**20)
    flights = Flights(store)
    data = payload(2**20)
    wrong = digest_of(b"other")
    flight = flights.start(wrong, filler(data, []))
    results = await asyncio.gather(*(read_all(flight) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, DigestMismatch) for r in results)
    assert wrong not in store and list((tmp_path / "tmp").iterdir()) == []
    await flights.close()
    await store.close()


async def test_a_fill_error_reaches_followers_that_wait_for_the_start(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100 * 2**20)
    flights = Flights(store)

    async def broken(flight: Flight) -> None:
        raise UpstreamError("origin exploded")

    flight = flights.start(digest_of(b"x"), broken)
    with pytest.raises(UpstreamError, match="exploded"):
        await read_all(flight)
    assert flights.get(digest_of(b"x")) is None
    await flights.close()
    await store.close()


async def test_too_many_queued_fills_are_shed(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100 * 2**20)
    flights = Flights(store, max_fetches=1, max_queued=2)
    gate = asyncio.Event()

    async def blocked(flight: Flight) -> None:
        await gate.wait()

    for i in range(3):
        flights.start(digest_of(bytes([i])), blocked)
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        flights.start(digest_of(b"one more"), blocked)
    gate.set()
    await flights.close()
    await store.close()


async def test_relay_mode_bounds_memory_when_the_store_cannot_keep_it(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 2**20)  # smaller than the package
    flights = Flights(store)
    data = payload(20 * 2**20)
    flight = flights.start(digest_of(data), filler(data, []))
    peak = 0

    async def slow_reader() -> bytes:
        nonlocal peak
        key = flight.follow()
        try:
            await flight.started
            out = bytearray()
            while len(out) < len(data):
                ready = await flight.available(len(out))
                kind, span = flight.read_span(len(out), ready)
                assert kind == "mem"
                out += span  # type: ignore[operator]
                peak = max(peak, flight._tail_bytes())
                flight.advance(key, len(out))
                await asyncio.sleep(0)
            await flight.verdict()
            return bytes(out)
        finally:
            await flight.leave(key)

    assert await slow_reader() == data
    assert peak <= 8 * 2**20 + CHUNK and digest_of(data) not in store
    await flights.close()
    await store.close()


async def test_closing_right_after_a_start_fails_the_flight_for_its_followers(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path, 2**20)
    flights = Flights(store)

    async def forever(flight: Flight) -> None:
        await asyncio.sleep(3600)

    flight = flights.start(digest_of(b"x"), forever)
    flight.follow()
    await flights.close()  # in the same loop iteration as the start
    with pytest.raises(UpstreamError, match="cancelled"):
        await asyncio.wait_for(asyncio.shield(flight.started), timeout=2)
    assert len(flights) == 0
    await store.close()


async def test_a_stuck_follower_in_relay_mode_is_dropped_not_waited_for_forever(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path, 2**20)  # smaller than the package: relay mode
    flights = Flights(store)
    data = payload(12 * 2**20)
    flight = Flight(store, digest_of(data), stall_timeout=0.2)
    stuck = flight.follow()  # registered, never reads
    fill = filler(data, [])
    await asyncio.wait_for(fill(flight), timeout=10)
    assert flight.done.done() and flight._followers == {}
    with pytest.raises(UpstreamError, match="trimmed"):
        flight.read_span(0, 10)
    await flight.leave(stuck)
    await flights.close()
    await store.close()

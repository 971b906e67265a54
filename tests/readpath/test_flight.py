"""Coalescing without sockets: one fill, many followers, one verdict."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cachesvc.errors import DigestMismatch, Overloaded, UpstreamError
from cachesvc.readpath.flight import Fill, Flight, Flights, Follower
from cachesvc.readpath.package import FileSpan, Span
from cachesvc.store.castore import Store
from cachesvc.tier import Tier
from tests.servers import digest_of, eventually, payload

CHUNK = 64 * 1024


def span_bytes(span: Span) -> bytes:
    if isinstance(span, FileSpan):
        return os.pread(span.file.fileno(), span.count, span.offset)
    return span


async def read_follower(follower: Follower, pause: float | None = None) -> bytes:
    """Read a follower to the end the way the HTTP layer does."""
    try:
        await follower.started()
        out = bytearray()
        async for span in follower.spans(0, follower.size):
            out += span_bytes(span)
            if pause is not None:
                await asyncio.sleep(pause)
        return bytes(out)
    finally:
        await follower.leave()


async def read_all(flight: Flight) -> bytes:
    return await read_follower(flight.follow())


def filler(data: bytes, calls: list[int], gate: asyncio.Event | None = None) -> Fill:
    async def fill(flight: Flight) -> None:
        calls.append(1)
        await flight.begin(len(data), Tier.ORIGIN)
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
        follower = flight.follow()
        try:
            await follower.started()
            out = bytearray()
            async for span in follower.spans(0, len(data)):
                assert isinstance(span, bytes)  # relay mode: from memory
                out += span
                peak = max(peak, flight._tail_bytes())
                await asyncio.sleep(0)
            return bytes(out)
        finally:
            await follower.leave()

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
    assert flight.done.done() and flight._followers == set()
    with pytest.raises(UpstreamError, match="trimmed"):
        flight.read_span(0, 10)
    await stuck.leave()
    await flights.close()
    await store.close()


async def test_two_relay_followers_one_leaves_the_other_is_served_in_full(
    tmp_path: Path,
) -> None:
    """Followers are objects: one leaving takes only its own position with it
    (keyed by ``id(object())``, two followers could share a key, and one
    leave() erased the other's position, so trimming dropped bytes it needed)."""
    store = await Store.open(tmp_path, 2**20)  # smaller than the package: relay mode
    flights = Flights(store)
    data = payload(24 * 2**20)
    flight = flights.start(digest_of(data), filler(data, []))
    quitter, stayer = flight.follow(), flight.follow()
    assert quitter is not stayer

    async def read_some_then_leave() -> None:
        await quitter.started()
        async for _ in quitter.spans(0, len(data)):
            break
        await quitter.leave()

    slow = asyncio.ensure_future(read_follower(stayer, pause=0.002))
    await read_some_then_leave()
    assert await asyncio.wait_for(slow, timeout=60) == data
    await flights.close()
    await store.close()


async def test_a_follower_gets_a_range_and_the_last_byte_only_after_the_verdict(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path, 100 * 2**20)
    flights = Flights(store)
    data = payload(2 * 2**20)
    gate = asyncio.Event()

    async def fill(flight: Flight) -> None:
        await flight.begin(len(data), Tier.ORIGIN)
        await flight.feed(data)
        await gate.wait()  # every byte is in; the verdict waits
        await flight.finish()

    follower = flights.start(digest_of(data), fill).follow()
    await follower.started()
    spans = follower.spans(100, len(data))
    got = bytearray()
    while len(got) < len(data) - 101:
        got += span_bytes(await anext(spans))
    last = asyncio.ensure_future(anext(spans))
    await asyncio.sleep(0.05)  # a window for a wrongly released last span to arrive in
    assert not last.done()  # held back: no verdict yet
    gate.set()
    got += span_bytes(await last)
    assert bytes(got) == data[100:]
    await spans.aclose()
    await follower.leave()
    await flights.close()
    await store.close()


async def test_in_relay_mode_the_stuck_follower_is_dropped_not_the_one_reading(
    tmp_path: Path,
) -> None:
    """A full relay window waits for its slowest follower: when the wait runs
    out, the one stuck at byte 0 goes; the one keeping up is served in full."""
    store = await Store.open(tmp_path, 2**20)  # smaller than the package: relay mode
    data = payload(12 * 2**20)
    flight = Flight(store, digest_of(data), stall_timeout=0.2)
    stuck = flight.follow()  # registered, never reads
    reading = asyncio.ensure_future(read_follower(flight.follow()))
    await asyncio.wait_for(filler(data, [])(flight), timeout=30)
    assert await asyncio.wait_for(reading, timeout=30) == data
    await stuck.leave()
    await flight.release()
    await store.close()


async def test_a_fill_that_breaks_off_fails_the_followers_waiting_for_more(
    tmp_path: Path,
) -> None:
    """A follower that has read every byte there is waits for more; the fill's
    failure must wake it with the error, not leave it waiting forever."""
    store = await Store.open(tmp_path, 100 * 2**20)
    flights = Flights(store)
    data = payload(4 * 2**20)
    gate = asyncio.Event()

    async def breaks_off(flight: Flight) -> None:
        await flight.begin(len(data), Tier.ORIGIN)
        await flight.feed(data[: 2**20])  # one batch: written at once, nothing pending
        await gate.wait()
        raise UpstreamError("the source broke off")

    flight = flights.start(digest_of(data), breaks_off)
    follower = flight.follow()
    reading = asyncio.ensure_future(read_follower(follower))
    await eventually(lambda: follower.position == 2**20, "the follower read the first MiB")
    gate.set()
    with pytest.raises(UpstreamError, match="broke off"):
        await asyncio.wait_for(reading, timeout=30)
    await flights.close()
    await store.close()


async def test_a_relay_flight_is_joined_while_it_still_holds_its_first_bytes(
    tmp_path: Path,
) -> None:
    """When the store cannot keep a package, a request arriving before any
    byte was trimmed joins the running fill (one upstream GET), not a new one."""
    store = await Store.open(tmp_path, 2**20)  # smaller than the package: relay mode
    flights = Flights(store)
    data = payload(4 * 2**20)
    gate = asyncio.Event()
    calls: list[int] = []
    flight = flights.start(digest_of(data), filler(data, calls, gate))
    first = flight.follow()  # at byte 0: nothing is trimmed while it waits
    await flight.started
    await eventually(lambda: flight.received >= 2 * 2**20, "the fill reached the gate")
    assert flights.get(digest_of(data)) is flight
    second = flight.follow()
    gate.set()
    assert list(await asyncio.gather(read_follower(first), read_follower(second))) == [data, data]
    assert calls == [1]
    await flights.close()
    await store.close()

"""The scrubber on a real store, with an injected clock and sleep: rot is found
and dropped, good entries become verified, the rate and the interval hold,
and eviction while scrubbing is safe."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path
from unittest import mock

import pytest

from cachesvc.config import parse_duration
from cachesvc.errors import ConfigError
from cachesvc.metrics import Metrics
from cachesvc.store.castore import Store
from cachesvc.store.index import Index
from cachesvc.store.scrub import BLOCK, Scrubber
from tests.clock import Clock
from tests.servers import digest_of, flip_byte, payload
from tests.stores import failing, put, writable

MiB = 1 << 20


def rot(store: Store, data: bytes) -> None:
    flip_byte(store.path_of(digest_of(data)), len(data) // 2)


async def test_a_pass_drops_rotten_entries_and_marks_good_ones_verified(tmp_path: Path) -> None:
    found: list[str] = []
    store = await Store.open(tmp_path, 100 * MiB, on_corrupt=found.append)
    good, rotten = payload(3 * MiB, seed=1), payload(MiB, seed=2)
    for data in (good, rotten):
        await put(store, data)
    await store.close()
    store = await Store.open(tmp_path, 100 * MiB, on_corrupt=found.append)
    rot(store, rotten)
    t, metrics = Clock(), Metrics()
    scrubber = Scrubber(store, 60, 100 * MiB, metrics, clock=t, sleep=t.sleep)

    report = await scrubber.scrub_pass()

    assert (report.entries, report.bytes) == (2, 4 * MiB)
    assert store.digests() == [digest_of(good)] and store.is_verified(digest_of(good))
    assert found == ["scrub"]
    assert metrics.scrub_bytes._value.get() == 4 * MiB
    assert metrics.scrub_passes._value.get() == 1
    await store.close()


async def test_the_rate_is_never_exceeded(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100 * MiB)
    entries = [payload(size, seed=i) for i, size in enumerate((5 * MiB, 3 * MiB + 7, 100))]
    for data in entries:
        await put(store, data)
    t, metrics = Clock(), Metrics()
    rate, start, seen = 2 * MiB, t.now, []

    async def sleep(seconds: float) -> None:  # before each paced block: bytes so far
        seen.append((t.now - start, metrics.scrub_bytes._value.get()))
        await t.sleep(seconds)

    scrubber = Scrubber(store, 60, rate, metrics, clock=t, sleep=sleep)
    report = await scrubber.scrub_pass()

    total = sum(map(len, entries))
    assert report.bytes == total
    assert all(done <= rate * elapsed + BLOCK for elapsed, done in seen)
    assert report.seconds >= (total - BLOCK) / rate  # not faster than the rate
    assert report.seconds <= total / rate  # and not slower than it needs to be
    await store.close()


async def scrub_runs(tmp_path: Path, size: int, interval: float, passes: int) -> Clock:
    """``passes`` passes over one entry of ``size`` bytes at 1 MiB/s: the fake time after."""
    store = await Store.open(tmp_path, 100 * MiB)
    await put(store, payload(size))
    t = Clock()
    await Scrubber(store, interval, MiB, clock=t, sleep=t.sleep).run(passes=passes)
    await store.close()
    return t


async def test_a_full_pass_starts_every_interval(tmp_path: Path) -> None:
    t = await scrub_runs(tmp_path, 2 * MiB, 3600, passes=3)  # a pass takes 1 s
    assert t.sleeps == [1.0, 3599.0, 1.0, 3599.0, 1.0]  # pace, rest of the interval, ...
    assert t.now == 1000 + 2 * 3600 + 1


async def test_a_pass_longer_than_the_interval_is_followed_at_once(tmp_path: Path) -> None:
    t = await scrub_runs(tmp_path, 4 * MiB, 1, passes=2)  # a pass takes 3 s
    assert t.sleeps == [1.0] * 3 + [0.0] + [1.0] * 4  # no rest; the pace carries over
    assert t.now == 1000 + 3 + 4


class StopPass(Exception):
    pass


async def test_unverified_entries_go_first_and_recency_is_untouched(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100 * MiB)
    old, new = payload(MiB, seed=1), payload(MiB, seed=2)
    await put(store, old)
    await store.close()
    store = await Store.open(tmp_path, 100 * MiB)
    await put(store, new)  # verified: ingested here; old is not (its row was trusted)
    lease = await store.lease(digest_of(old))  # old becomes the most recently used
    assert lease is not None
    store.release(lease)
    t = Clock()

    async def stop(seconds: float) -> None:  # the pace wait before the second entry
        raise StopPass

    scrubber = Scrubber(store, 60, MiB, clock=t, sleep=stop)
    with pytest.raises(StopPass):
        await scrubber.scrub_pass()
    assert store.is_verified(digest_of(old))  # scrubbed first although used last

    scrubber = Scrubber(store, 60, MiB, clock=t, sleep=t.sleep)
    await scrubber.scrub_pass()
    assert store.digests() == [digest_of(new), digest_of(old)]  # eviction order unchanged
    await store.close()


async def test_eviction_and_a_fresh_copy_while_scrubbing_are_safe(tmp_path: Path) -> None:
    found: list[str] = []
    store = await Store.open(tmp_path, 100 * MiB, on_corrupt=found.append)
    data = payload(3 * MiB)
    await put(store, data)
    rot(store, data)  # the scrub will read rotten bytes from the old file...
    t = Clock()

    async def evict_and_refill(seconds: float) -> None:
        if digest_of(data) in store:  # ...which is evicted and committed afresh meanwhile
            await store.evict(digest_of(data))
            await put(store, data)
        await t.sleep(seconds)

    scrubber = Scrubber(store, 60, MiB, clock=t, sleep=evict_and_refill)
    report = await scrubber.scrub_pass()
    assert report.bytes == len(data)  # the evicted file stayed readable through the lease
    assert digest_of(data) in store and found == []  # the verdict did not hit the fresh copy
    assert store.path_of(digest_of(data)).read_bytes() == data
    await store.close()


async def test_a_file_cut_short_or_unreadable_is_dropped(tmp_path: Path) -> None:
    found: list[str] = []
    store = await Store.open(tmp_path, 100 * MiB, on_corrupt=found.append)
    cut, open_cut, unreadable = (payload(2 * MiB, seed=i) for i in range(3))
    for data in (cut, open_cut, unreadable):
        await put(store, data)
    held = await store.lease(digest_of(open_cut))  # already open: the size check at open is past
    assert held is not None
    for data in (cut, open_cut):
        writable(store.path_of(digest_of(data)))
        with open(store.path_of(digest_of(data)), "r+b") as f:
            f.truncate(MiB + 5)
    t = Clock()
    scrubber = Scrubber(store, 60, 100 * MiB, clock=t, sleep=t.sleep)
    with failing(digest_of(unreadable).hex, "pread", errno.EIO):
        await scrubber.scrub_pass()
    store.release(held)
    assert store.digests() == [] and found == ["scrub"] * 3
    await store.close()


@pytest.mark.parametrize(("interval", "rate"), [(0, MiB), (-1, MiB), (60, 0)])
async def test_a_zero_interval_or_rate_is_refused(
    tmp_path: Path, interval: float, rate: int
) -> None:
    store = await Store.open(tmp_path, MiB)
    with pytest.raises(ConfigError, match="--scrub-"):
        Scrubber(store, interval, rate)
    await store.close()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2s", 2.0), ("6h", 21600.0), ("1d", 86400.0), ("90m", 5400.0), ("500ms", 0.5),
     ("30", 30.0), ("1.5h", 5400.0)],
)  # fmt: skip
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "1w", "-1s", "s", "1 day", "1e3s"])
def test_bad_durations_say_what_is_accepted(text: str) -> None:
    with pytest.raises(
        ValueError, match=r"not a (positive )?duration; use seconds \(30, 0.5\) or 500ms, 2s"
    ):
        parse_duration(text)


def test_the_scrub_flags_parse_and_a_bad_one_is_one_line_naming_it() -> None:
    from cachesvc.cli.main import build_parser

    args = build_parser().parse_args(
        ["agent", "--origin", "file:///x", "--scrub-interval", "6h", "--scrub-rate", "8MiB"]
    )
    assert (args.scrub_interval, args.scrub_rate) == (21600.0, 8 * MiB)
    with pytest.raises(ConfigError, match=r"^--scrub-interval '1w' .*: not a duration; use"):
        build_parser().parse_args(["agent", "--origin", "file:///x", "--scrub-interval", "1w"])


async def test_a_failing_pass_is_logged_and_the_next_one_runs(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100 * MiB)
    data = payload(MiB)
    await put(store, data)
    rot(store, data)
    t, metrics = Clock(), Metrics()
    scrubber = Scrubber(store, 60, 100 * MiB, metrics, clock=t, sleep=t.sleep)
    disk_error = sqlite3.OperationalError("disk I/O error")
    with mock.patch.object(Index, "delete", side_effect=[disk_error]):  # dropping the row fails
        await scrubber.run(passes=2)
    assert metrics.scrub_passes._value.get() == 1  # the first pass failed, the second ran
    assert store.digests() == []
    await store.close()

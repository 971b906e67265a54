"""The egress token bucket on simulated time: no sockets, no real sleeps.

:class:`VirtualTime` is the bucket's injected clock and sleep: a sleep parks
its caller until the driver has let every other taker run and then moves time
to the earliest wake-up. Rates are therefore exact functions of the bucket's
arithmetic, never of the machine's load.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Coroutine
from typing import Any

import pytest

from cachesvc.serve.egress import SLICE, TokenBucket, parse_rate

MiB = 1 << 20


class VirtualTime:
    """A clock and a sleep for many tasks; :meth:`run` drives them to the end."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.slept: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._seq), fut))
        await fut

    async def run(self, *jobs: Coroutine[Any, Any, None], wakeups: int = 100_000) -> None:
        tasks = [asyncio.create_task(job) for job in jobs]
        for _ in range(wakeups):
            await self._settle(tasks)
            if all(t.done() for t in tasks):
                break
            when, _, fut = heapq.heappop(self._sleepers)
            self.now = when
            fut.set_result(None)
        else:
            raise AssertionError(f"takers still running after {wakeups} wake-ups")
        for t in tasks:
            t.result()  # re-raise a taker's failure

    async def _settle(self, tasks: list[asyncio.Task[None]]) -> None:
        """Let tasks run until each is finished or parked in :meth:`sleep`."""
        for _ in range(1000):
            running = sum(not t.done() for t in tasks)
            if running == len(self._sleepers):
                return
            await asyncio.sleep(0)
        raise AssertionError("a taker neither finished nor slept")


async def taker(
    bucket: TokenBucket, vt: VirtualTime, size: int, until: float, got: list[int]
) -> None:
    """Take ``size`` bytes at a time until ``until``; ``got`` collects what was
    granted by then."""
    while vt.now < until:
        await bucket.take(size)
        if vt.now <= until:
            got.append(size)


RATE = 10 * MiB


async def test_one_taker_is_held_to_the_rate_within_ten_percent_over_two_seconds() -> None:
    vt = VirtualTime()
    bucket = TokenBucket(RATE, clock=vt.clock, sleep=vt.sleep)
    got: list[int] = []
    await vt.run(taker(bucket, vt, SLICE, 2.0, got))
    assert sum(got) == pytest.approx(2 * RATE, rel=0.10)
    assert sum(got) <= 2 * RATE + bucket.burst


@pytest.mark.parametrize("sizes", [(SLICE,) * 8, (SLICE, 64 * 1024, 4 * MiB, 1000, SLICE)])
async def test_concurrent_takers_share_the_rate_within_ten_percent(sizes: tuple[int]) -> None:
    vt = VirtualTime()
    bucket = TokenBucket(RATE, clock=vt.clock, sleep=vt.sleep)
    gots: list[list[int]] = [[] for _ in sizes]
    await vt.run(*(taker(bucket, vt, s, 2.0, g) for s, g in zip(sizes, gots, strict=True)))
    total = sum(sum(g) for g in gots)
    assert total == pytest.approx(2 * RATE, rel=0.10)
    assert total <= 2 * RATE + bucket.burst + max(sizes)  # a take may end just past 2 s


async def test_equal_takers_get_equal_shares() -> None:
    vt = VirtualTime()
    bucket = TokenBucket(RATE, clock=vt.clock, sleep=vt.sleep)
    gots: list[list[int]] = [[] for _ in range(6)]
    await vt.run(*(taker(bucket, vt, SLICE, 2.0, g) for g in gots))
    shares = [sum(g) for g in gots]
    # One slice of difference from the initial burst (the first taker's first
    # take does not wait), one from where 2 s cuts the last round.
    assert max(shares) - min(shares) <= 2 * SLICE
    assert min(shares) >= 0.9 * 2 * RATE / len(gots)


async def test_a_big_take_does_not_hold_a_small_one_behind_it() -> None:
    vt = VirtualTime()
    bucket = TokenBucket(RATE, burst=SLICE, clock=vt.clock, sleep=vt.sleep)
    done: dict[str, float] = {}

    async def take(name: str, n: int) -> None:
        await bucket.take(n)
        done[name] = vt.now

    await vt.run(take("big", 8 * MiB), take("small", 64 * 1024))
    # FIFO slices: the small take waits for one slice of the big one, not 8 MiB.
    assert done["small"] <= 2 * SLICE / RATE
    assert done["big"] == pytest.approx((8 * MiB - SLICE) / RATE + 64 * 1024 / RATE)


async def test_burst_after_a_long_idle_is_bounded() -> None:
    vt = VirtualTime(start=1000.0)
    bucket = TokenBucket(RATE, burst=MiB, clock=vt.clock, sleep=vt.sleep)
    vt.now = 5000.0  # idle for over an hour: tokens are still capped at the burst
    await vt.run(bucket.take(10 * MiB))
    assert sum(vt.slept) == pytest.approx(9 * MiB / RATE)
    assert vt.now == pytest.approx(5000.0 + 9 * MiB / RATE)


@pytest.mark.parametrize("rate", [None, 0])
async def test_unlimited_never_reads_the_clock_nor_sleeps(rate: float | None) -> None:
    def no_clock() -> float:
        raise AssertionError("an unlimited bucket read the clock")

    async def no_sleep(_: float) -> None:
        raise AssertionError("an unlimited bucket slept")

    bucket = TokenBucket(rate, clock=no_clock, sleep=no_sleep)
    assert bucket.unlimited
    await bucket.take(10 << 30)
    assert [n async for n in bucket.paced(3 * SLICE + 1)] == [SLICE, SLICE, SLICE, 1]


async def test_paced_yields_slices_summing_to_the_count_at_the_rate() -> None:
    vt = VirtualTime()
    bucket = TokenBucket(RATE, burst=SLICE, clock=vt.clock, sleep=vt.sleep)
    parts: list[int] = []

    async def send() -> None:
        async for n in bucket.paced(5 * MiB + 7):
            parts.append(n)

    await vt.run(send())
    assert sum(parts) == 5 * MiB + 7 and max(parts) == SLICE
    assert vt.now == pytest.approx((5 * MiB + 7 - SLICE) / RATE)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100MiB", 100 * MiB),
        ("40MiB/s", 40 * MiB),
        ("1.5 GiB / s", 1.5 * (1 << 30)),
        ("1048576", MiB),
        ("10MB", 10**7),
        (12345, 12345),
        ("0", None),
        ("unlimited", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rate_reads_sizes_as_bytes_per_second(text: str | None, rate: float | None) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "10Gbit", "-5MiB", "5 MiB per hour"])
def test_parse_rate_refuses_what_is_not_a_rate(text: str) -> None:
    with pytest.raises(ValueError, match="not a rate in bytes per second"):
        parse_rate(text)


async def test_concurrent_paced_responses_never_get_more_than_burst_plus_rate_times_t() -> None:
    """Eight 1 MiB responses starting together: every slice ``paced`` yields
    was granted by the bucket first, so by any time t the slices handed out
    add up to at most ``burst + rate * t`` (a slice yielded before asking the
    bucket would give each response one free slice at t=0: 2 MiB at once)."""
    vt = VirtualTime()
    bucket = TokenBucket(RATE, clock=vt.clock, sleep=vt.sleep)
    granted: list[tuple[float, int]] = []  # (time, bytes) of every slice yielded

    async def respond() -> None:
        async for n in bucket.paced(MiB):
            granted.append((vt.now, n))

    await vt.run(*(respond() for _ in range(8)))
    assert sum(n for _, n in granted) == 8 * MiB
    sent = 0
    for when, n in sorted(granted):
        sent += n
        assert sent <= bucket.burst + RATE * when + 1, f"{sent} bytes granted by t={when}"
    # and the rate is reached, not merely respected: the last slice goes when
    # the bucket allows it, not later
    assert max(when for when, _ in granted) == pytest.approx((8 * MiB - bucket.burst) / RATE)

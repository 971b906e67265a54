"""The background scrubber: re-hashes every stored entry at a bounded rate, so
rot under a running service is found within one interval. It does not drop
or count entries itself: the store settles its verdicts (``found_by="scrub"``).

* A full pass every ``interval``: every entry present at its start,
  unverified ones first; an over-long pass is followed at once by the next,
  with a warning. A failed pass is logged; the scrubber never just stops.
* Never faster than ``rate`` bytes per second; idle time earns no credit.
* Safe against eviction: reads through a lease that does not touch recency.
* Off the loop: one :class:`~cachesvc.store.recheck.Recheck` block per thread
  hop; a cancelled block finishes before the lease is released.

Clock and sleep are injected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cachesvc.digest import Digest
from cachesvc.errors import ConfigError, DigestMismatch
from cachesvc.metrics import Metrics
from cachesvc.store.castore import Store
from cachesvc.store.recheck import Recheck

log = logging.getLogger(__name__)

BLOCK = 1 << 20  # bytes per thread hop (and the most the rate can burst)
MIN_BLOCK = 4096


@dataclass(frozen=True)
class PassReport:
    """One full pass: how long it took, how much it read. What it dropped is
    counted by the store's ``on_corrupt``."""

    seconds: float
    entries: int
    bytes: int


class Scrubber:
    """Re-verifies one store in the background; :meth:`run` until cancelled."""

    def __init__(
        self,
        store: Store,
        interval: float,
        rate: int,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not interval > 0:
            raise ConfigError(f"--scrub-interval {interval}: must be more than 0 seconds")
        if not rate > 0:
            raise ConfigError(f"--scrub-rate {rate}: must be more than 0 bytes per second")
        self._store = store
        self._interval = interval
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._block = max(MIN_BLOCK, min(BLOCK, rate))
        self._pace = _Pace(rate, clock, sleep)

    async def run(self, passes: int | None = None) -> None:
        """Scrub pass after pass, one every interval; forever, or ``passes`` times."""
        done = 0
        while passes is None or done < passes:
            started = self._clock()
            await self._pass_or_log()
            done += 1
            if passes is not None and done >= passes:
                return
            seconds = self._clock() - started
            if seconds > self._interval:
                log.warning("scrub: a pass took %.0fs, over the %.0fs interval: raise --scrub-rate",
                            seconds, self._interval)  # fmt: skip
            await self._sleep(max(0.0, self._interval - seconds))

    async def _pass_or_log(self) -> None:
        """A pass; a failure (a bug, the index refusing a write) is logged and
        the next pass tried after the interval: the scrubber never just stops."""
        try:
            await self.scrub_pass()
        except Exception:
            log.exception("scrub: a pass failed; the next one starts after the interval")

    async def scrub_pass(self) -> PassReport:
        """Re-hash every entry present now, unverified ones first."""
        started = self._clock()
        digests = sorted(self._store.digests(), key=self._store.is_verified)
        hashed = 0
        for digest in digests:
            hashed += await self.scrub(digest)
        report = PassReport(self._clock() - started, len(digests), hashed)
        self._count_pass(report)
        log.debug("scrub: %s", report)
        return report

    async def scrub(self, digest: Digest) -> int:
        """Re-hash one entry (one that is gone is skipped); the bytes read."""
        blob = await self._store.lease(digest, touch=False)
        if blob is None:
            return 0
        recheck = self._store.recheck(blob, found_by="scrub")
        try:
            await self._hash(recheck)
            await self._store.settle(recheck.verdict())  # wrong bytes: dropped, and it raises
        except DigestMismatch:
            pass  # dropped and counted by the store
        finally:
            await recheck.close()
        return recheck.on_disk

    async def _hash(self, recheck: Recheck) -> None:
        """Feed every block to the recheck, at the paced rate."""
        more = True
        while more:
            before = recheck.on_disk
            await self._pace.take(min(self._block, recheck.size - before))
            more = await recheck.step(self._block)
            if self._metrics is not None:
                self._metrics.scrub_bytes.inc(recheck.on_disk - before)

    def _count_pass(self, report: PassReport) -> None:
        if self._metrics is not None:
            self._metrics.scrub_passes.inc()
            self._metrics.scrub_last_pass.set_to_current_time()
            self._metrics.scrub_pass_seconds.set(report.seconds)


class _Pace:
    """Never more than ``rate`` bytes per second, with no credit for idle time.
    One taker, one sleep per block (egress's TokenBucket serves many takers
    in 256 KiB turns)."""

    def __init__(
        self, rate: int, clock: Callable[[], float], sleep: Callable[[float], Awaitable[None]]
    ) -> None:
        self._rate = rate
        self._clock = clock
        self._sleep = sleep
        self._free_at = float("-inf")

    async def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more may be read; then book their time."""
        now = self._clock()
        if self._free_at > now:
            await self._sleep(self._free_at - now)
            now = max(self._clock(), self._free_at)
        self._free_at = now + nbytes / self._rate

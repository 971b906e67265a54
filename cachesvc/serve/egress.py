"""The egress limit: one token bucket per process over every body byte it sends.

:class:`TokenBucket` paces senders to ``rate`` bytes per second with at most
``burst`` bytes ahead after idleness. It owns the pacing only: it does not
count bytes for metrics, know sockets, or tell local clients from other hosts
(the serve path passes every body byte, local clients included, because the
host's NIC is what the limit protects).

How the serve path uses it: take :data:`SLICE` bytes, send them, repeat
(:meth:`TokenBucket.paced` yields the slices); ``sendfile`` included, in
slices. Slices keep concurrent responses fair: waiters are served first come,
first served, one slice per turn, so a 500 MB response and a 64 KiB one
alternate instead of the big one holding the line.

Rejected: one asyncio.Lock per bucket with a refill loop (a lock hands out
turns, but not in a time order a test can state); a per-connection limit
(N connections would get N times the rate).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from cachesvc.config import parse_size

SLICE = 256 * 1024  # bytes per turn; the serve path sends at most this much per take
BURST_SECONDS = 0.02  # default burst in seconds of rate (see TokenBucket.__init__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """Paces body bytes to ``rate`` bytes/s; ``rate`` None or 0 means unlimited.

    Guarantees, for any number of concurrent takers on one event loop:

    * over any interval of length T the bytes granted are at most
      ``burst + rate * T`` (the bucket holds at most ``burst`` tokens);
    * turns are first come, first served, one :data:`SLICE` at most per turn;
    * unlimited buckets never call the clock or sleep: no waiting, no cost.

    A take is a reservation: the bytes are debited at once and the taker
    sleeps until the debt is repaid. A cancelled taker's reservation stays
    spent (the bucket errs towards sending less, never more).
    """

    def __init__(
        self,
        rate: float | None,
        burst: int | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        # The default burst is 20 ms of rate, at least one slice: asyncio
        # rounds sleeps up to whole milliseconds and a busy loop wakes late;
        # tokens that accrue meanwhile must not overflow a tiny bucket, or the
        # host sends below its rate.
        self.rate = float(rate or 0)
        self.burst = burst if burst is not None else max(SLICE, int(self.rate * BURST_SECONDS))
        if self.rate < 0 or self.burst <= 0:
            raise ValueError(f"token bucket: rate {rate!r} and burst {burst!r} must be positive")
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(self.burst)
        self._stamp = clock() if self.rate else 0.0

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    async def take(self, n: int) -> None:
        """Wait until ``n`` more bytes may be sent (taken a slice at a time)."""
        if self.unlimited:
            return
        while n > 0:
            part = min(n, SLICE)
            wait = self._reserve(part)
            if wait > 0:
                await self._sleep(wait)
            n -= part

    async def paced(self, count: int) -> AsyncIterator[int]:
        """Slice sizes summing to ``count``, each yielded once its bytes may be sent."""
        while count > 0:
            part = min(count, SLICE)
            await self.take(part)
            yield part
            count -= part

    def _reserve(self, n: int) -> float:
        """Debit ``n`` bytes now; returns the seconds until the debt is repaid."""
        now = self._clock()
        refill = (now - self._stamp) * self.rate
        self._tokens = min(float(self.burst), self._tokens + refill) - n
        self._stamp = now
        return -self._tokens / self.rate if self._tokens < 0 else 0.0


_UNLIMITED = frozenset(("", "0", "none", "unlimited", "off"))


def parse_rate(text: str | int | None) -> float | None:
    """``"100MiB"`` (or ``"100MiB/s"``) → bytes per second; None for unlimited.

    Sizes take the contract's suffixes (``512MiB``, ``10GiB``, plain bytes) and
    mean bytes per second. ``0``, ``unlimited``, ``none``, ``off`` or empty:
    unlimited. Raises ValueError for anything else."""
    if text is None:
        return None
    if isinstance(text, int):
        return float(text) or None
    if text.strip().lower() in _UNLIMITED:
        return None
    size = re.sub(r"\s*/\s*s(ec)?\s*$", "", text, flags=re.IGNORECASE)
    try:
        return float(parse_size(size)) or None
    except ValueError:
        raise ValueError(
            f"{text!r} is not a rate in bytes per second (examples: 100MiB, 40MiB/s, unlimited)"
        ) from None

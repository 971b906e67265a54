"""The one clock the tests inject: it moves only when the test moves it or
when something sleeps on it (every sleep recorded), so no test waits for a TTL,
a pace or an interval to pass."""

from __future__ import annotations


class Clock:
    """Call it for the time; ``await clock.sleep(s)`` moves it ``s`` on at once."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

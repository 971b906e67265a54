"""Readiness: whether a service should get traffic now, and if not, why (the
verdict of ``/readyz``; the route itself is :mod:`cachesvc.serve.service`'s).
Story: README "Under pressure".

* Not ready (503, with the reason) when the store's directory does not take a
  write (checked on every probe), when the origin refused us (wrong secret,
  unknown key, no bucket, a missing ``file://`` dir), or before the first
  origin check ends.
* An origin that does not answer leaves the service ready
  (``"origin": "unreachable: ..."``). Rejected: not ready on any origin
  failure: an outage would take every peer off the agents' ring (the headless
  Service publishes ready addresses only) and lose the hits caches still serve.
* :class:`OriginCheck`: at most one origin check per ``ttl``, one at a time,
  only when probed; a probe waits at most ``wait`` and never raises. Rejected:
  a background timer (asks when nobody looks) and a check per probe (probes
  wait on S3).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Required, TypedDict

from cachesvc.upstream.origin import Origin, Probe

log = logging.getLogger(__name__)

ORIGIN_TTL = 10.0  # seconds a verdict of the origin is reused
PROBE_WAIT = 1.0  # seconds a probe waits for a fresh check (k8s probes time out at 2 s here)


class ReadyzJSON(TypedDict, total=False):
    """The body of ``/readyz``: ``origin`` when ready (and ``peers``, which the
    service adds); ``reason``, ``error`` and ``detail`` when not."""

    status: Required[str]
    origin: str
    peers: int
    reason: str
    error: str
    detail: str


class OriginCheck:
    """The origin's last :class:`Probe`, refreshed on demand; clock injected.

    Guarantees: at most one check runs at a time; a new one starts only when
    the last verdict is at least ``ttl`` old (by ``clock``); :meth:`current`
    never raises and never waits more than ``wait`` seconds."""

    def __init__(
        self,
        origin: Origin,
        ttl: float = ORIGIN_TTL,
        wait: float = PROBE_WAIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.origin = origin
        self.ttl = ttl
        self.wait = wait
        self.clock = clock
        self.checks = 0  # origin checks finished, for tests and logs
        self._last: Probe | None = None
        self._at = -math.inf
        self._task: asyncio.Task[None] | None = None

    async def current(self) -> Probe | None:
        """The freshest verdict available within ``wait``; None before the first."""
        if self._task is None and self.clock() - self._at >= self.ttl:
            self._task = asyncio.create_task(self._refresh())
        task = self._task
        if task is not None:
            # shield: a probe that gives up must not cancel the check others share
            await asyncio.wait({asyncio.shield(task)}, timeout=self.wait)
        return self._last

    async def _refresh(self) -> None:
        try:
            probe = await self.origin.probe()
            self._log_change(probe)
            self._last, self._at = probe, self.clock()
            self.checks += 1
        finally:
            self._task = None

    def _log_change(self, probe: Probe) -> None:
        """One line when the verdict changes, not one per check."""
        if self._last is not None and probe.reason == self._last.reason:
            return
        if probe.ok:
            log.info("readiness: origin %s accepts us", self.origin.url)
        else:
            log.warning("readiness: %s", probe.reason)

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class Readiness:
    """The verdict of ``/readyz`` from the store's directory and the origin."""

    def __init__(self, store_tmp: Path, origin: OriginCheck) -> None:
        self.store_tmp = store_tmp
        self.origin = origin

    async def report(self) -> tuple[int, ReadyzJSON]:
        """(HTTP status, JSON body): 200 ``{"status": "ready", "origin": ...}``
        or 503 ``{"status": "not_ready", "reason": ...}`` (with the contract's
        ``error``/``detail`` keys too, as every error answer has them)."""
        # A name per probe: concurrent probes writing and unlinking one shared
        # name fail each other's unlink ("store not writable" on a healthy disk).
        probe_file = self.store_tmp / f".readyz.{secrets.token_hex(4)}"
        try:
            await asyncio.to_thread(_write_probe, probe_file)
        except OSError as exc:
            return not_ready(f"store not writable: {exc}")
        origin = await self.origin.current()
        if origin is None:
            return not_ready(f"origin {self.origin.origin.url}: first check still running")
        if origin.refused:
            return not_ready(origin.reason)
        state = "ok" if origin.ok else f"unreachable: {origin.reason}"
        return 200, {"status": "ready", "origin": state}

    async def close(self) -> None:
        await self.origin.close()


def not_ready(reason: str) -> tuple[int, ReadyzJSON]:
    return 503, {"status": "not_ready", "reason": reason, "error": "not_ready", "detail": reason}


def _write_probe(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(b"ok")
    os.unlink(path)

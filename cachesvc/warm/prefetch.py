"""Prefetch along ``calls``: when an agent serves a package whose reference says
it invokes other functions (in the caller's tenant), fetch those functions'
current packages and layers into L1 before they are asked for. Reads no HTTP.

* :meth:`Prefetcher.served` costs the request path one dict lookup and a
  ``put_nowait`` per called function: no origin call, no await, never raises.
* Bounded: :data:`QUEUE_CAP` queued functions (beyond, dropped and counted in
  ``cachesvc_prefetch_dropped_total``); a function is not queued again for
  :data:`DEDUP_SECONDS`; :data:`WORKERS` workers fill through ``Tiers.fetch``
  (verified, coalesced); a failure is logged, never fatal.
* A fill started counts in ``cachesvc_prefetches_total{signal="calls"}``; a
  package already in L1 costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from cachesvc.digest import PREFIX
from cachesvc.errors import CachesvcError
from cachesvc.metrics import Metrics
from cachesvc.readpath.tiers import Tiers
from cachesvc.store.castore import Store
from cachesvc.warm.references import ReferenceIndex

log = logging.getLogger(__name__)

WORKERS = 2
QUEUE_CAP = 64
DEDUP_SECONDS = 30.0
DEDUP_MAX = 10_000


class Prefetcher:
    """Background prefetch of called functions; :meth:`start`, then :meth:`close`."""

    def __init__(
        self,
        index: ReferenceIndex,
        tiers: Tiers,
        store: Store,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._index = index
        self._tiers = tiers
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(QUEUE_CAP)
        self._recent: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work()) for _ in range(WORKERS)]

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def served(self, digest: str) -> None:
        """A package was served (``sha256:<hex>`` or bare hex). Never blocks or raises."""
        ref = self._index.lookup(digest.removeprefix(PREFIX))
        if ref is None or not ref.calls:
            return
        for function in ref.calls:
            self._enqueue((ref.tenant, function))

    def _enqueue(self, key: tuple[str, str]) -> None:
        now = self._clock()
        queued = self._recent.get(key)
        if queued is not None and now - queued < DEDUP_SECONDS:
            return
        try:
            self._queue.put_nowait(key)
        except asyncio.QueueFull:
            self._metrics.prefetch_dropped.inc()
            return
        self._recent[key] = now
        self._recent.move_to_end(key)
        while len(self._recent) > DEDUP_MAX:
            self._recent.popitem(last=False)

    async def _work(self) -> None:
        while True:
            tenant, function = await self._queue.get()
            try:
                await self._prefetch(tenant, function)
            except CachesvcError as exc:
                log.warning("prefetch %s/%s failed: %s", tenant, function, exc)
            finally:
                self._queue.task_done()

    async def _prefetch(self, tenant: str, function: str) -> None:
        ref = await self._index.function(tenant, function)
        if ref is None:
            log.info("prefetch: %s calls %s, which has no references", tenant, function)
            return
        for digest in ref.digests:
            if digest in self._store:
                continue
            self._metrics.prefetches.labels("calls").inc()
            size, tier = await self._tiers.fetch(digest)
            log.info(
                "prefetched %s/%s %s (%d bytes from %s)", tenant, function, ref.version, size, tier
            )

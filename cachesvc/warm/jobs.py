"""Warm jobs: a fixed list of digests made present in this service's store, with
progress. Owns no HTTP route and reads no reference
(:mod:`cachesvc.serve.warm_routes` builds the list). Story: README "Operators".

* Each digest ends ``fetched``, ``cached``, ``skipped`` (a peer fills only
  the digests it owns on the ring; agents fill all) or ``failed`` (with why;
  every item, on a peer that is not on its own ring).
* Fills go through ``Tiers.fetch`` (verified, coalesced); at most
  :data:`CONCURRENCY` warm fills at once in a service, whatever the jobs.
* With ``pin``, pinned bytes stay within ``pin_share``; a pin over it fails
  the item (the package stays, evictable).
* A job is ``running``, then ``done`` or ``failed`` (any item failed); kept
  :data:`JOB_TTL` after it ends (injected clock); at most :data:`MAX_JOBS`,
  the oldest finished making room, else ``Overloaded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NotRequired, TypedDict

from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError, NotFound, Overloaded
from cachesvc.metrics import Metrics
from cachesvc.readpath.tiers import Tiers
from cachesvc.store.castore import Store
from cachesvc.tier import Tier
from cachesvc.upstream.ring import Ring

log = logging.getLogger(__name__)

CONCURRENCY = 8
JOB_TTL = 3600.0
MAX_JOBS = 100
MAX_ITEMS = 10_000
SIGNALS = ("warm", "publish")


class ItemJSON(TypedDict):
    """One item in ``GET /warm/{job}``."""

    digest: str
    outcome: str
    bytes: int
    tier: Tier | None
    pinned: bool
    error: str | None
    owner: NotRequired[str]


class JobJSON(TypedDict):
    """The answer of ``GET /warm/{job}``."""

    job: str
    state: str
    tenant: str | None
    pin: bool
    total: int
    done: int
    failed: int
    fetched: int
    cached: int
    skipped: int
    bytes: int
    seconds: float
    items: NotRequired[list[ItemJSON]]


@dataclass
class Item:
    """One digest of a job and what became of it."""

    digest: Digest
    outcome: str = "pending"
    bytes: int = 0
    tier: Tier | None = None
    pinned: bool = False
    owner: str | None = None
    error: str | None = None

    def as_json(self) -> ItemJSON:
        out: ItemJSON = {
            "digest": str(self.digest),
            "outcome": self.outcome,
            "bytes": self.bytes,
            "tier": self.tier,
            "pinned": self.pinned,
            "error": self.error,
        }
        if self.owner is not None:
            out["owner"] = self.owner
        return out


@dataclass
class Job:
    """One warm job; read it with :meth:`summary`."""

    id: str
    items: list[Item]
    started: float
    tenant: str | None = None
    pin: bool = False
    signal: str = "warm"
    finished: float | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def state(self) -> str:
        if self.finished is None:
            return "running"
        return "failed" if self.count("failed") else "done"

    def count(self, outcome: str) -> int:
        return sum(1 for item in self.items if item.outcome == outcome)

    def summary(self, now: float, items: str = "all") -> JobJSON:
        """The job as JSON. ``items``: "all", "failed" (only failed items) or "none".
        ``done`` counts finished items whatever their outcome; ``bytes`` counts
        what this job fetched (cached items add nothing)."""
        out: JobJSON = {
            "job": self.id,
            "state": self.state,
            "tenant": self.tenant,
            "pin": self.pin,
            "total": len(self.items),
            "done": sum(1 for item in self.items if item.outcome != "pending"),
            "failed": self.count("failed"),
            "fetched": self.count("fetched"),
            "cached": self.count("cached"),
            "skipped": self.count("skipped"),
            "bytes": sum(item.bytes for item in self.items if item.outcome == "fetched"),
            "seconds": round((self.finished or now) - self.started, 3),
        }
        if items == "all":
            out["items"] = [item.as_json() for item in self.items]
        elif items == "failed":
            out["items"] = [item.as_json() for item in self.items if item.outcome == "failed"]
        return out


@dataclass(frozen=True)
class Scope:
    """Which digests this service warms: all (``ring`` None: an agent), or
    those whose ring owner is ``me`` (an L2 peer; an empty ring means a lone
    peer that owns everything)."""

    ring: Ring | None = None
    me: str | None = None

    def owner_elsewhere(self, digest: Digest) -> str | None:
        """The peer that owns ``digest`` when it is not this one."""
        if self.ring is None:
            return None
        owner = self.ring.owner(digest)
        return None if owner is None or owner == self.me else owner

    def problem(self) -> str | None:
        """Why this peer cannot warm anything (it is not on its own ring)."""
        if self.ring is None or not self.ring.nodes or self.me in self.ring.nodes:
            return None
        return f"this peer ({self.me}) is not on its ring {list(self.ring.nodes)}: set --advertise"


class WarmJobs:
    """The warm jobs of one service. Use from its event loop; :meth:`close` on shutdown."""

    def __init__(
        self,
        tiers: Tiers,
        store: Store,
        metrics: Metrics,
        scope: Scope,
        pin_share: float,
        clock: Callable[[], float] = time.monotonic,
        ttl: float = JOB_TTL,
        max_jobs: int = MAX_JOBS,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self._tiers = tiers
        self._store = store
        self._metrics = metrics
        self._scope = scope
        self._pin_share = pin_share
        self._clock = clock
        self._ttl = ttl
        self._max_jobs = max_jobs
        self._slots = asyncio.Semaphore(concurrency)
        self._jobs: dict[str, Job] = {}  # oldest first

    def start(
        self,
        digests: Iterable[Digest],
        tenant: str | None = None,
        pin: bool = False,
        signal: str = "warm",
    ) -> Job:
        """Register a job and run it in the background; duplicates are dropped.
        Raises :class:`Overloaded` when :data:`MAX_JOBS` jobs are all running."""
        assert signal in SIGNALS
        self._make_room()
        items = [Item(d) for d in dict.fromkeys(digests)]
        job = Job(secrets.token_hex(8), items, self._clock(), tenant, pin, signal)
        self._jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        log.info("warm %s: %d digests (tenant %s, pin %s)", job.id, len(items), tenant, pin)
        return job

    def get(self, job_id: str) -> Job:
        """A job that is running or finished less than the TTL ago; else :class:`NotFound`."""
        self._expire()
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"warm job {job_id[:40]!r} is unknown or expired")
        return job

    def now(self) -> float:
        return self._clock()

    async def unpin(self, digests: Iterable[Digest]) -> int:
        """Unpin each digest that is pinned here; returns how many were."""
        return sum([await self._store.unpin(d) for d in dict.fromkeys(digests)])

    async def close(self) -> None:
        """Cancel running jobs and wait for them."""
        tasks = [job.task for job in self._jobs.values() if job.task and not job.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- bookkeeping ----------------------------------------------------------------

    def _expire(self) -> None:
        now = self._clock()
        for job_id, job in list(self._jobs.items()):
            if job.finished is not None and now - job.finished >= self._ttl:
                del self._jobs[job_id]

    def _make_room(self) -> None:
        self._expire()
        if len(self._jobs) < self._max_jobs:
            return
        oldest = next((j for j in self._jobs.values() if j.finished is not None), None)
        if oldest is None:
            raise Overloaded(f"{len(self._jobs)} warm jobs are running; retry later", 5)
        del self._jobs[oldest.id]

    # -- running a job ----------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        problem = self._scope.problem()
        try:
            await asyncio.gather(*(self._warm_one(job, item, problem) for item in job.items))
        finally:
            job.finished = self._clock()
        self._metrics.warm_jobs.labels(job.state).inc()
        log.info("warm %s %s: %s", job.id, job.state, job.summary(job.finished, "none"))

    async def _warm_one(self, job: Job, item: Item, problem: str | None) -> None:
        owner = self._scope.owner_elsewhere(item.digest)
        if problem is not None:
            item.outcome, item.error = "failed", problem
        elif owner is not None:
            item.outcome, item.owner = "skipped", owner
        else:
            async with self._slots:
                await self._fill(job, item)
        self._count(job, item)

    async def _fill(self, job: Job, item: Item) -> None:
        digest = item.digest
        try:
            if digest not in self._store:
                self._metrics.prefetches.labels(job.signal).inc()
            size, item.tier = await self._tiers.fetch(digest)
            if digest not in self._store:
                item.outcome, item.error = "failed", "verified, but the store had no room for it"
                return
            cached = item.tier == self._tiers.local_tier
            item.outcome, item.bytes = ("cached" if cached else "fetched"), size
            if job.pin:
                await self._pin(item)
        except CachesvcError as exc:
            item.outcome, item.error = "failed", f"{type(exc).__name__}: {exc}"
            log.warning("warm %s: %s failed: %s", job.id, digest.short, exc)

    async def _pin(self, item: Item) -> None:
        item.pinned = await self._store.pin(item.digest, self._pin_share)
        if not item.pinned:
            share = f"{self._pin_share:.0%}"
            item.outcome = "failed"
            item.error = f"cached but not pinned: pins would exceed {share} of capacity"

    def _count(self, job: Job, item: Item) -> None:
        self._metrics.warm_items.labels(item.outcome).inc()
        if item.outcome == "fetched":
            self._metrics.warm_bytes.inc(item.bytes)
        if job.tenant is not None:
            self._metrics.tenant_warm_items.labels(self._metrics.tenant_label(job.tenant)).inc()

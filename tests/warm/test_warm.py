"""Warm jobs, the reference index and the prefetch queue, without sockets: a
real store, real flights and tiers over a ``file://`` origin, an injected clock."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from cachesvc.digest import Digest
from cachesvc.errors import NotFound, Overloaded
from cachesvc.metrics import Metrics
from cachesvc.readpath.flight import Flights
from cachesvc.readpath.tiers import OriginSource, Tiers
from cachesvc.store.castore import Store
from cachesvc.tier import Tier
from cachesvc.upstream.origin import FileOrigin
from cachesvc.upstream.ring import Ring
from cachesvc.upstream.source import Body, Opened
from cachesvc.warm.client import Outcome, Progress
from cachesvc.warm.jobs import Job, Scope, WarmJobs
from cachesvc.warm.prefetch import QUEUE_CAP, Prefetcher
from cachesvc.warm.references import ReferenceIndex, natural_key, parse_key
from tests.clock import Clock
from tests.servers import digest_of, payload


class GatedOrigin(OriginSource):
    """An origin source whose bodies wait for a gate: keeps jobs running."""

    def __init__(self, origin: FileOrigin, gate: asyncio.Event) -> None:
        super().__init__(origin)
        self.gate = gate

    def open(self, digest: Digest, offset: int) -> Opened:
        @asynccontextmanager
        async def opened() -> AsyncIterator[Body]:
            await self.gate.wait()
            async with self.origin.open(digest, offset) as body:
                yield body

        return opened()


Parts = tuple[FileOrigin, Store, Tiers, Metrics]


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    origin = FileOrigin(tmp_path / "origin")
    await origin.start()
    store = await Store.open(tmp_path / "store", 10 << 20)
    metrics = Metrics()
    flights = Flights(store)
    tiers = Tiers(store, flights, lambda _d: [OriginSource(origin)], metrics, Tier.L1)
    yield origin, store, tiers, metrics
    await flights.close()
    await store.close()


async def put(origin: FileOrigin, data: bytes) -> Digest:
    digest = digest_of(data)
    path = origin.root / "blobs" / "sha256" / digest.hex
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


async def finished(job: Job) -> Job:
    assert job.task is not None
    await asyncio.wait_for(asyncio.shield(job.task), 10)
    return job


async def test_a_job_reports_fetched_cached_and_failed_items(parts: Parts) -> None:
    origin, store, tiers, metrics = parts
    jobs = WarmJobs(tiers, store, metrics, Scope(), pin_share=0.5)
    a, b = await put(origin, payload(1000, 1)), await put(origin, payload(2000, 2))
    await tiers.fetch(a)
    missing = Digest("1" * 64)

    job = await finished(jobs.start([a, b, missing, b]))

    summary = job.summary(jobs.now())
    assert summary["state"] == "failed"
    assert (summary["total"], summary["done"], summary["failed"]) == (3, 3, 1)
    assert (summary["fetched"], summary["cached"], summary["bytes"]) == (1, 1, 2000)
    outcomes = {i["digest"]: (i["outcome"], i["bytes"]) for i in summary["items"]}
    assert outcomes == {
        str(a): ("cached", 1000),
        str(b): ("fetched", 2000),
        str(missing): ("failed", 0),
    }
    assert "NotFound" in (job.items[2].error or "")
    assert job.summary(jobs.now(), "failed")["items"] == [job.items[2].as_json()]
    await jobs.close()


async def test_a_finished_job_expires_after_its_ttl(parts: Parts) -> None:
    origin, store, tiers, metrics = parts
    clock = Clock()
    jobs = WarmJobs(tiers, store, metrics, Scope(), 0.5, clock=clock, ttl=60)
    job = await finished(jobs.start([await put(origin, b"x" * 10)]))
    clock.now += 59
    assert jobs.get(job.id).state == "done"
    clock.now += 1
    with pytest.raises(NotFound):
        jobs.get(job.id)


async def test_running_jobs_never_expire_and_the_job_count_is_bounded(
    parts: Parts, tmp_path: Path
) -> None:
    origin, store, _, metrics = parts
    gate, clock = asyncio.Event(), Clock()
    flights = Flights(store)
    tiers = Tiers(store, flights, lambda _d: [GatedOrigin(origin, gate)], metrics, Tier.L1)
    jobs = WarmJobs(tiers, store, metrics, Scope(), 0.5, clock=clock, ttl=10, max_jobs=2)
    digests = [await put(origin, payload(100, i)) for i in range(3)]
    running = [jobs.start([digests[0]]), jobs.start([digests[1]])]
    with pytest.raises(Overloaded):
        jobs.start([digests[2]])
    clock.now += 1000
    assert jobs.get(running[0].id).state == "running"

    gate.set()
    for job in running:
        await finished(job)
    third = jobs.start([digests[2]])  # the oldest finished job makes room
    with pytest.raises(NotFound):
        jobs.get(running[0].id)
    assert jobs.get(running[1].id).state == "done"
    await finished(third)
    await flights.close()


async def test_a_peer_warms_only_what_it_owns(parts: Parts) -> None:
    origin, store, tiers, metrics = parts
    ring = Ring(["http://p1", "http://p2", "http://p3"])
    jobs = WarmJobs(tiers, store, metrics, Scope(ring, "http://p2"), 0.5)
    digests = [await put(origin, payload(100, i)) for i in range(12)]
    job = await finished(jobs.start(digests))
    mine = {d for d in digests if ring.owner(d) == "http://p2"}
    assert 0 < len(mine) < 12
    assert {i.digest for i in job.items if i.outcome == "fetched"} == mine
    assert {i.owner for i in job.items if i.outcome == "skipped"} == {"http://p1", "http://p3"}
    assert set(store.digests()) == mine and job.state == "done"


async def test_a_peer_missing_from_its_ring_fails_loudly(parts: Parts) -> None:
    origin, store, tiers, metrics = parts
    jobs = WarmJobs(tiers, store, metrics, Scope(Ring(["http://p1"]), "http://0.0.0.0:8701"), 0.5)
    job = await finished(jobs.start([await put(origin, b"y")]))
    assert job.state == "failed" and "--advertise" in (job.items[0].error or "")


async def test_pins_stay_within_the_pin_share(parts: Parts) -> None:
    origin, store, tiers, metrics = parts
    jobs = WarmJobs(tiers, store, metrics, Scope(), pin_share=0.25)  # 2.5 MiB of 10
    digests = [await put(origin, payload(1 << 20, 10 + i)) for i in range(3)]
    job = await finished(jobs.start(digests, pin=True))
    refused = [i for i in job.items if not i.pinned]  # the one that finished last
    assert len(refused) == 1 and "not pinned" in (refused[0].error or "") and job.state == "failed"
    assert store.usage().pinned_bytes == 2 << 20
    assert await jobs.unpin(digests) == 2
    assert not any(store.is_pinned(d) for d in digests)


# -- references -----------------------------------------------------------------------


def test_versions_sort_naturally() -> None:
    versions = ["v9", "v10", "v1.10", "v1.9", "2024-01-02", "2024-01-10", "rc"]
    assert sorted(versions, key=natural_key) == [
        "2024-01-02", "2024-01-10", "rc", "v1.9", "v1.10", "v9", "v10",
    ]  # fmt: skip


def test_only_reference_shaped_keys_parse() -> None:
    assert parse_key("tenants/t/f/v1.json") == ("t", "f", "v1")
    for key in ("tenants/t/f/v1.txt", "tenants/t/v1.json", "tenants/t/f/g/v1.json", "x/t/f/v.json"):
        assert parse_key(key) is None


async def write_ref(origin: FileOrigin, key: str, digest: Digest, **extra: object) -> None:
    await origin.put_text(key, json.dumps({"digest": str(digest), "size": 1, **extra}))


async def test_the_index_reads_each_reference_once_and_forgets_deleted_ones(tmp_path: Path) -> None:
    origin = FileOrigin(tmp_path / "o")
    reads: list[str] = []
    read_text = origin.read_text

    async def counting(key: str) -> str:
        reads.append(key)
        return await read_text(key)

    # a real origin whose reads are counted: mypy forbids assigning a method
    origin.read_text = counting  # type: ignore[method-assign]
    d1, d2, d3 = (Digest(c * 64) for c in "abc")
    await write_ref(origin, "tenants/t/f/v9.json", d1, calls=["g"])
    await write_ref(origin, "tenants/t/f/v10.json", d2, layers=[str(d3)])
    await origin.put_text("tenants/t/f/broken.json", "{nope")
    index = ReferenceIndex(origin)

    refs = await index.tenant("t")
    assert sorted(r.version for r in refs) == ["v10", "v9"]
    current, called = index.current("t", "f"), index.lookup(d1.hex)
    assert current is not None and current.digests == [d2, d3]
    assert called is not None and called.calls == ("g",)
    await index.tenant("t")
    assert reads.count("tenants/t/f/v9.json") == reads.count("tenants/t/f/v10.json") == 1
    assert reads.count("tenants/t/f/broken.json") == 2  # retried: it may get fixed

    (origin.root / "tenants/t/f/v10.json").unlink()
    assert [r.version for r in await index.tenant("t")] == ["v9"]
    current = index.current("t", "f")
    assert current is not None and current.digest == d1 and index.lookup(d2.hex) is None
    assert await index.tenant("nobody") == []


async def test_prefetch_signals_are_deduplicated_and_bounded(parts: Parts) -> None:
    origin, store, tiers, metrics = parts
    index = ReferenceIndex(origin)
    caller = Digest("e" * 64)
    await write_ref(origin, "tenants/t/a/1.json", caller, calls=[f"f{i}" for i in range(100)])
    await index.refresh_all()
    prefetcher = Prefetcher(index, tiers, store, metrics)  # not started: nothing drains

    prefetcher.served(str(caller))
    prefetcher.served(caller.hex)
    assert prefetcher._queue.qsize() == QUEUE_CAP
    assert metrics.prefetch_dropped._value.get() == 2 * (100 - QUEUE_CAP)


# -- the command's progress bar ---------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_redraws_in_place_on_a_terminal_and_prints_lines_otherwise() -> None:
    outcomes = [Outcome("http://a", total=4, done=1), Outcome("http://b", total=4, done=3)]
    tty, log_file = Terminal(), io.StringIO()
    for stream in (tty, log_file):
        progress = Progress(outcomes, stream, width=8)
        progress.draw()
        progress.draw()  # unchanged: a terminal redraws, a log file gets nothing new
        outcomes[0].state = "done"
        progress.finish()
        outcomes[0].state = "pending"
    line = "warm [####....] 4/8 items, 0 B, 0/2 targets"
    assert tty.getvalue() == f"\r{line}\r{line}\r{line[:-11]}1/2 targets\n"
    assert log_file.getvalue() == f"{line}\n{line[:-11]}1/2 targets\n"

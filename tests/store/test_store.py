"""The store on a real disk: verify-then-commit, eviction, recovery ("mayhem")."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cachesvc.errors import ConfigError, DigestMismatch, UpstreamError
from cachesvc.store.castore import Store, StoreFull
from cachesvc.store.ingest import MIN_BATCH, Ingest, Verified
from cachesvc.store.recheck import Verdict
from tests.servers import digest_of, eventually, flip_byte, payload, store_files
from tests.stores import hashed, put, writable

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

KiB = 1024


async def test_ingest_verifies_then_commits_and_serves_an_open_handle(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    data = payload(300 * KiB)
    await put(store, data)
    blob = await store.lease(digest_of(data))
    assert blob is not None and blob.size == len(data)
    assert os.pread(blob.file.fileno(), len(data), 0) == data
    store.release(blob)
    assert store.usage().entries == 1 and store.usage().bytes == len(data)
    await store.close()


async def test_wrong_bytes_are_never_kept(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    data = payload(200 * KiB)
    with pytest.raises(DigestMismatch):
        await put(store, data, digest_of(b"something else"))
    assert store.usage().entries == 0 and store_files(tmp_path) == []
    await store.close()


async def test_closing_while_the_first_batch_makes_the_file_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that leaves at once: close() while the first batch's thread is
    still creating the temp file (a slow open) removes it and closes its fd."""
    create = Ingest._create
    in_open, done = threading.Event(), threading.Event()

    def slow_create(self: Ingest) -> None:  # an open that lasts until the test says
        in_open.set()
        assert done.wait(30), "the test never let the open finish"
        create(self)

    monkeypatch.setattr(Ingest, "_create", slow_create)
    store = await Store.open(tmp_path, 100 * 2**20)
    data = payload(MIN_BATCH)
    fds_before = len(os.listdir("/proc/self/fd"))
    ingest = await store.begin(digest_of(data), len(data) * 2)
    await ingest.write(data)  # the batch starts in a thread ...
    await eventually(in_open.is_set, "the first batch's thread in the open")
    closing = asyncio.ensure_future(ingest.close())  # ... and close races it:
    await asyncio.sleep(0)  # one turn of the loop: close now waits for the thread
    done.set()
    await closing
    assert store_files(tmp_path) == []
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    await store.close()


async def test_a_short_body_is_refused(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    data = payload(10 * KiB)
    ingest = await store.begin(digest_of(data), len(data) + 1)
    await ingest.write(data)
    with pytest.raises(UpstreamError, match="got 10240 of 10241"):
        await ingest.verify()
    await ingest.close()
    assert store_files(tmp_path) == []
    await store.close()


async def test_eviction_is_least_recently_used_and_keeps_the_cap(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 1000 * KiB)
    blobs = [payload(200 * KiB, seed=i) for i in range(4)]
    for b in blobs:
        await put(store, b)
    first = await store.lease(digest_of(blobs[0]))  # touch the oldest
    assert first is not None
    store.release(first)
    await put(store, payload(250 * KiB, seed=9))  # 1050 KiB would not fit
    assert digest_of(blobs[0]) in store and digest_of(blobs[1]) not in store
    assert store.usage().bytes <= 1000 * KiB
    await store.close()


async def test_a_package_larger_than_the_store_raises_store_full(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100 * KiB)
    with pytest.raises(StoreFull):
        await store.begin(digest_of(b"x"), 200 * KiB)
    await store.close()


async def test_enospc_mid_write_spills_but_still_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    data = payload(3 * 2**20)
    real = os.pwrite
    calls = {"n": 0}

    def flaky(fd: int, buf: ReadableBuffer, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buf, offset)

    monkeypatch.setattr("cachesvc.store.castore.os.pwrite", flaky)
    ingest = await store.begin(digest_of(data), len(data))
    for i in range(0, len(data), 2**20):
        await ingest.write(data[i : i + 2**20])
    verified = await ingest.verify()
    assert ingest.spilled and verified.path is None
    await store.commit(verified)  # keeps nothing
    await ingest.close()
    assert digest_of(data) not in store and store_files(tmp_path) == []
    await store.close()


async def test_evicted_file_keeps_reading_through_an_open_lease(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    data = payload(100 * KiB)
    await put(store, data)
    blob = await store.lease(digest_of(data))
    assert blob is not None
    await store.evict(digest_of(data))
    assert os.pread(blob.file.fileno(), 10, 0) == data[:10]
    store.release(blob)
    assert blob.file.closed
    await store.close()


async def test_restart_keeps_entries_and_their_recency(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    a, b = await put_two_then_lease_the_first(store)
    await store.close()
    again = await Store.open(tmp_path, 10 * 2**20)
    assert again.digests() == [digest_of(b), digest_of(a)]  # a was used last
    await again.close()


async def test_mayhem_check_repairs_what_a_crash_or_a_disk_can_leave(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    good, gone, bad = (payload(KiB, seed=i) for i in range(3))
    for b in (good, gone, bad):
        await put(store, b)
    await store.close()
    blobs = tmp_path / "blobs" / "sha256"
    (blobs / digest_of(gone).hex).unlink()  # row without a file
    writable(blobs / digest_of(bad).hex).write_bytes(b"short")  # size differs from the row
    orphan = payload(KiB, seed=7)  # renamed but never indexed (kill -9 between)
    (blobs / digest_of(orphan).hex).write_bytes(orphan)
    (blobs / digest_of(b"liar").hex).write_bytes(b"not liar")  # orphan with wrong bytes
    (tmp_path / "tmp" / "abc.1234").write_bytes(b"partial")  # an interrupted ingest

    store = await Store.open(tmp_path, 10 * 2**20)
    assert sorted(store.digests(), key=str) == sorted([digest_of(good), digest_of(orphan)], key=str)
    assert store.startup_report == {
        "temp_removed": 1, "rows_dropped": 2, "adopted": 1, "corrupt_removed": 2,
        "junk_removed": 0, "layout_replaced": 0,
    }  # fmt: skip
    assert not any(store.check().values())
    assert sorted(store_files(tmp_path)) == sorted(
        f"blobs/sha256/{digest_of(x).hex}" for x in (good, orphan)
    )
    await store.close()


async def test_pinned_entries_survive_eviction_within_their_share(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 1000 * KiB)
    pinned = payload(300 * KiB, seed=1)
    await put(store, pinned)
    assert await store.pin(digest_of(pinned), max_share=0.5)
    other = payload(300 * KiB, seed=2)
    await put(store, other)
    assert not await store.pin(digest_of(other), max_share=0.5)  # over the share
    for i in range(5):
        await put(store, payload(300 * KiB, seed=10 + i))
    assert digest_of(pinned) in store
    assert await store.unpin(digest_of(pinned))
    for i in range(4):
        await put(store, payload(300 * KiB, seed=20 + i))
    assert digest_of(pinned) not in store
    await store.close()


async def test_concurrent_begins_never_reserve_more_than_the_capacity(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100)
    results = await asyncio.gather(
        store.begin(digest_of(b"a"), 60), store.begin(digest_of(b"b"), 60), return_exceptions=True
    )
    started = [r for r in results if not isinstance(r, BaseException)]
    assert len(started) == 1 and any(isinstance(r, StoreFull) for r in results)
    for ingest in started:
        await ingest.close()
    await store.close()


async def test_an_ingest_closed_without_a_commit_gives_its_room_back(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100)
    first = await store.begin(digest_of(b"a"), 60)
    with pytest.raises(StoreFull):
        await store.begin(digest_of(b"b"), 60)
    await first.close()
    second = await store.begin(digest_of(b"b"), 60)
    await second.close()
    await store.close()


async def test_the_store_refuses_a_verified_result_the_ingest_did_not_return(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    data = payload(KiB)
    ingest = await store.begin(digest_of(data), len(data))
    await ingest.write(b"x" * len(data))  # wrong bytes, never verified
    await ingest.drain()
    with pytest.raises(ValueError, match="not an ingest this store writes"):
        await store.commit(Verified(digest_of(data), len(data), ingest.path))
    assert digest_of(data) not in store
    await ingest.close()
    good = await store.begin(digest_of(data), len(data))
    await good.write(data)
    verified = await good.verify()
    with pytest.raises(ValueError, match="not an ingest this store writes"):
        await store.commit(Verified(verified.digest, verified.size, verified.path))  # equal, not it
    await store.commit(verified)
    assert digest_of(data) in store
    await good.close()
    await store.close()


async def test_the_store_commits_only_what_its_own_open_ingests_verified(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "one", 10 * 2**20)
    other = await Store.open(tmp_path / "two", 10 * 2**20)
    data = payload(KiB)
    ingest = await other.begin(digest_of(data), len(data))
    await ingest.write(data)
    verified = await ingest.verify()
    with pytest.raises(ValueError, match="not an ingest this store writes"):
        await store.commit(verified)  # another store's temp file
    await ingest.close()
    with pytest.raises(ValueError, match="not an ingest this store writes"):
        await other.commit(verified)  # closed: its temp file is gone
    assert digest_of(data) not in store and digest_of(data) not in other
    assert store_files(tmp_path / "one") == store_files(tmp_path / "two") == []
    await store.close()
    await other.close()


async def test_a_committed_entry_still_streaming_is_counted_once(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 100)
    a, b, c = b"a" * 40, b"b" * 50, b"c" * 10
    await put(store, a)
    ingest_b = await store.begin(digest_of(b), 50)
    await ingest_b.write(b)
    await store.commit(await ingest_b.verify())  # left open: a follower still reads its temp fd
    ingest_c = await store.begin(digest_of(c), 10)  # 40 + 50 + 10 fits exactly
    assert digest_of(a) in store and digest_of(b) in store
    for ingest in (ingest_c, ingest_b):
        await ingest.close()
    await store.close()


async def test_committed_blobs_are_read_only(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    data = payload(KiB)
    await put(store, data)
    assert stat.S_IMODE(os.stat(store.path_of(digest_of(data))).st_mode) == 0o444
    await store.close()


async def test_entries_are_verified_only_once_this_process_hashed_them(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    indexed, orphan = payload(KiB, seed=1), payload(KiB, seed=2)
    await put(store, indexed)
    assert store.is_verified(digest_of(indexed))  # ingested here
    await store.close()
    (tmp_path / "blobs" / "sha256" / digest_of(orphan).hex).write_bytes(orphan)

    store = await Store.open(tmp_path, 10 * 2**20)
    assert not store.is_verified(digest_of(indexed))  # its row was trusted, its bytes not read
    assert store.is_verified(digest_of(orphan))  # re-hashed to be adopted
    blob = await store.lease(digest_of(indexed))
    assert blob is not None and not store.is_verified(digest_of(indexed))
    store.mark_verified(digest_of(indexed), blob)
    assert store.is_verified(digest_of(indexed))
    store.release(blob)
    again = await store.lease(digest_of(indexed))
    assert again is not None and store.is_verified(digest_of(indexed))
    store.release(again)
    await store.close()


async def recheck(store: Store, data: bytes) -> bool:
    """Re-hash a stored entry in place; True when its bytes matched."""
    blob = await store.lease(digest_of(data))
    assert blob is not None
    check = await hashed(store, blob, "scrub")
    try:
        await store.settle(check.verdict())
        return True
    except DigestMismatch:
        return False
    finally:
        await check.close()


async def test_a_recheck_drops_rotten_bytes_counts_them_and_marks_good_ones(
    tmp_path: Path,
) -> None:
    found: list[str] = []
    store = await Store.open(tmp_path, 10 * 2**20)
    good, rotten = payload(3 * 2**20, seed=1), payload(KiB, seed=2)
    await put(store, good)
    await put(store, rotten)
    await store.close()
    store = await Store.open(tmp_path, 10 * 2**20, on_corrupt=found.append)
    flip_byte(store.path_of(digest_of(rotten)), 0)
    assert await recheck(store, good) and not await recheck(store, rotten)
    assert store.is_verified(digest_of(good)) and digest_of(rotten) not in store
    assert not store.path_of(digest_of(rotten)).exists()
    assert found == ["scrub"]
    await store.close()


async def test_a_recheck_only_reports_and_the_store_acts_on_its_verdict(tmp_path: Path) -> None:
    found: list[str] = []
    store = await Store.open(tmp_path, 10 * 2**20, on_corrupt=found.append)
    data = payload(KiB)
    await put(store, data)
    flip_byte(store.path_of(digest_of(data)), 7)
    blob = await store.lease(digest_of(data))
    assert blob is not None
    check = await hashed(store, blob, "serve")
    verdict = check.verdict()
    assert verdict.problem is not None and "recheck" in verdict.problem
    assert digest_of(data) in store and found == []  # nothing happened yet
    with pytest.raises(DigestMismatch):
        await store.settle(verdict)
    assert digest_of(data) not in store and found == ["serve"]
    await check.close()
    assert blob.file.closed  # the lease was the last user of the dropped file
    await store.close()


async def test_a_verdict_on_a_replaced_file_leaves_the_fresh_copy_alone(tmp_path: Path) -> None:
    found: list[str] = []
    store = await Store.open(tmp_path, 10 * 2**20, on_corrupt=found.append)
    data = payload(KiB)
    await put(store, data)
    old = await store.lease(digest_of(data), touch=False)
    assert old is not None
    await store.evict(digest_of(data))
    await put(store, data)  # committed afresh while the old lease was being judged
    assert not await store.drop_corrupt(digest_of(data), "rot", found_by="scrub", lease=old)
    store.release(old)
    assert digest_of(data) in store and found == []
    await store.close()


async def put_two_then_lease_the_first(store: Store, touch: bool = True) -> tuple[bytes, bytes]:
    a, b = payload(KiB, seed=1), payload(KiB, seed=2)
    await put(store, a)
    await put(store, b)
    lease = await store.lease(digest_of(a), touch)
    assert lease is not None
    store.release(lease)
    return a, b


async def test_a_lease_without_touch_keeps_the_eviction_order(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    a, b = await put_two_then_lease_the_first(store, touch=False)
    assert store.digests() == [digest_of(a), digest_of(b)]  # a is still the oldest
    await store.close()


async def test_a_link_swapped_in_for_a_blob_is_never_served(tmp_path: Path) -> None:
    found: list[str] = []
    store = await Store.open(tmp_path, 10 * 2**20, on_corrupt=found.append)
    data, outside = payload(KiB), tmp_path / "outside"
    outside.write_bytes(data)
    await put(store, data)
    path = store.path_of(digest_of(data))
    path.unlink()
    path.symlink_to(outside)
    hot = await store.lease(digest_of(data))  # the handle opened at commit: the real file
    assert (
        hot is not None and os.path.samestat(os.fstat(hot.file.fileno()), os.stat(outside)) is False
    )
    store.release(hot)
    store._open.pop(digest_of(data).hex).retire()  # no longer hot: the next lease opens the path
    assert await store.lease(digest_of(data)) is None
    assert digest_of(data) not in store and found == ["serve"]
    assert outside.read_bytes() == data and not path.is_symlink()
    await store.close()


async def test_a_second_store_on_the_same_dir_is_refused(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    with pytest.raises(ConfigError, match=rf"cache dir {tmp_path} is in use by pid {os.getpid()}"):
        await Store.open(tmp_path, 10 * 2**20)
    await store.close()
    again = await Store.open(tmp_path, 10 * 2**20)  # released on close
    await again.close()


class LoopOnly(OrderedDict[str, int]):
    """An LRU that fails when iterated off the loop's thread (the loop moves
    its keys with every request: a thread iterating it would meet "mutated
    during iteration")."""

    def __iter__(self) -> Iterator[str]:
        assert threading.current_thread() is threading.main_thread(), "LRU read off the loop"
        return super().__iter__()


async def test_access_order_and_pins_are_flushed_without_reading_the_lru_off_the_loop(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    packages = [payload(1000, seed=i) for i in range(3)]
    for data in packages:
        await put(store, data)
    store._lru = LoopOnly(store._lru)
    first = digest_of(packages[0])
    blob = await store.lease(first)
    assert blob is not None
    store.release(blob)
    await store.flush()
    assert await store.pin(digest_of(packages[1]), max_share=0.5)
    assert await store.unpin(digest_of(packages[1]))
    await store.close()
    reopened = await Store.open(tmp_path, 10 * 2**20)
    # the flushed order survived: used (p0), then pinned and unpinned (p1)
    assert list(reopened._lru) == [digest_of(p).hex for p in (packages[2], *packages[:2])]
    await reopened.close()


async def test_a_flush_the_disk_refuses_keeps_its_touches_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await Store.open(tmp_path, 10 * 2**20)
    packages = [payload(1000, seed=20 + i) for i in range(2)]
    for data in packages:
        await put(store, data)
    await store.flush()
    blob = await store.lease(digest_of(packages[0]))
    assert blob is not None
    store.release(blob)

    def refuse(rows: object) -> None:
        raise OSError(errno.EIO, "disk said no")

    with monkeypatch.context() as patch:
        patch.setattr(store._index, "put_many", refuse)
        with pytest.raises(OSError):
            await store.flush()
    await store.flush()  # the touch of packages[0] is written now
    await store.close()
    reopened = await Store.open(tmp_path, 10 * 2**20)
    assert list(reopened._lru) == [digest_of(p).hex for p in (packages[1], packages[0])]
    await reopened.close()


async def test_the_store_acts_only_on_a_verdict_its_recheck_returned(tmp_path: Path) -> None:
    found: list[str] = []
    store = await Store.open(tmp_path, 10 * 2**20, on_corrupt=found.append)
    data = payload(KiB)
    await put(store, data)
    await store.close()
    store = await Store.open(tmp_path, 10 * 2**20, on_corrupt=found.append)
    flip_byte(store.path_of(digest_of(data)), 7)
    blob = await store.lease(digest_of(data))
    assert blob is not None
    with pytest.raises(ValueError, match="not a verdict"):
        await store.settle(Verdict(blob, "serve", None))  # hand-made: "the bytes are right"
    check = await hashed(store, blob, "serve")
    verdict = check.verdict()
    with pytest.raises(ValueError, match="not a verdict"):
        await store.settle(Verdict(verdict.lease, verdict.found_by, None))
    assert not store.is_verified(digest_of(data)) and found == []
    with pytest.raises(DigestMismatch):
        await store.settle(verdict)
    assert digest_of(data) not in store and found == ["serve"]
    await check.close()
    await store.close()

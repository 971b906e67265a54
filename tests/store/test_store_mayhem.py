"""Mayhem: a cache dir holding whatever a crash, an operator, another program or
a failing disk can leave. The store must open without raising, never follow a
link, serve the good entries and remove the bad (at start, or by the scrubber
for entries whose row and size agree)."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from cachesvc.digest import Digest
from cachesvc.store.castore import Store
from cachesvc.store.scrub import Scrubber
from tests.clock import Clock
from tests.servers import digest_of, payload, store_files
from tests.stores import failing, put, writable
from tests.trees import deep_tree

KiB = 1024
CAP = 10 * 2**20


def blob_path(root: Path, data: bytes) -> Path:
    return root / "blobs" / "sha256" / digest_of(data).hex


async def read_all(store: Store, digest: Digest) -> bytes:
    blob = await store.lease(digest)
    assert blob is not None, f"{digest} is not served"
    try:
        return os.pread(blob.file.fileno(), blob.size, 0)
    finally:
        store.release(blob)


async def scrub_once(store: Store) -> None:
    clock = Clock(0.0)
    await Scrubber(store, 60.0, 1 << 30, clock=clock, sleep=clock.sleep).run(passes=1)


@pytest.mark.slow
async def test_mayhem_the_store_opens_serves_the_good_and_removes_the_bad(tmp_path: Path) -> None:
    root, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"never touched")
    data = {name: payload(4 * KiB, seed=i) for i, name in enumerate(
        ["good", "good2", "rotten", "truncated", "unreadable", "dir", "orphan", "orphan_bad",
         "orphan_eio", "linked", "dangling"])}  # fmt: skip
    store = await Store.open(root, CAP)
    for name in ("good", "good2", "rotten", "truncated", "unreadable", "dir"):
        await put(store, data[name])
    await store.close()

    blobs = root / "blobs" / "sha256"
    # files with an index row: rotten (right size), truncated (wrong size), a directory
    flip = writable(blob_path(root, data["rotten"]))
    flip.write_bytes(b"X" + data["rotten"][1:])
    writable(blob_path(root, data["truncated"])).write_bytes(data["truncated"][:100])
    blob_path(root, data["dir"]).unlink()
    (blob_path(root, data["dir"]) / "inner").mkdir(parents=True)
    # files without a row: a good orphan, rotten bytes, one whose open fails with EIO
    blob_path(root, data["orphan"]).write_bytes(data["orphan"])
    blob_path(root, data["orphan_bad"]).write_bytes(data["orphan_bad"][::-1])
    blob_path(root, data["orphan_eio"]).write_bytes(data["orphan_eio"])
    # links: to a good blob, to a file outside, dangling; and names that are not digests
    (outside / "linked").write_bytes(data["linked"])
    blob_path(root, data["linked"]).symlink_to(outside / "linked")
    (blobs / ("a" * 64)).symlink_to(blob_path(root, data["good"]))
    blob_path(root, data["dangling"]).symlink_to(tmp_path / "nowhere")
    (blobs / digest_of(data["good2"]).hex.upper()).write_bytes(data["good2"])
    (blobs / "README").write_text("not a blob")
    (blobs / ("b" * 63)).mkdir()
    (blobs / ("e" * 64) / ("f" * 64)).mkdir(parents=True)  # named like a digest, no row
    # temp leftovers: a partial ingest, a tree far past PATH_MAX, a link to a dir outside
    (root / "tmp" / "abc.1234").write_bytes(b"partial")
    deep_tree(root / "tmp" / "deep", 3000)
    (root / "tmp" / "out").symlink_to(outside)

    found: list[str] = []
    with failing(digest_of(data["orphan_eio"]).hex, "open", errno.EIO):
        store = await Store.open(root, CAP, on_corrupt=found.append)
    assert found == ["startup"] * 3  # truncated, orphan_bad, orphan_eio
    assert store.startup_report == {
        "temp_removed": 3, "rows_dropped": 2, "adopted": 1, "corrupt_removed": 3,
        "junk_removed": 8, "layout_replaced": 0,
    }  # fmt: skip
    kept = ("good", "good2", "orphan")
    assert {str(d) for d in store.digests()} == {
        str(digest_of(data[n])) for n in (*kept, "rotten", "unreadable")
    }
    for name in kept:
        assert await read_all(store, digest_of(data[name])) == data[name]

    # Rows whose size agrees are not read at start: the scrubber finds the rot.
    assert not store.is_verified(digest_of(data["rotten"]))
    with failing(digest_of(data["unreadable"]).hex, "pread", errno.EACCES):
        await scrub_once(store)
    assert found == ["startup"] * 3 + ["scrub"] * 2
    assert {str(d) for d in store.digests()} == {str(digest_of(data[n])) for n in kept}
    assert all(store.is_verified(digest_of(data[n])) for n in kept)
    await store.close()

    assert store_files(root) == sorted(f"blobs/sha256/{digest_of(data[n]).hex}" for n in kept)
    assert sorted(os.listdir(root / "tmp")) == []
    assert (outside / "precious").read_bytes() == b"never touched"
    assert (outside / "linked").read_bytes() == data["linked"]


def _garbage(index: Path) -> None:
    (index / "cache.db").write_bytes(os.urandom(8192))


def _truncated(index: Path) -> None:
    db = index / "cache.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])


def _a_file(index: Path) -> None:
    for p in index.iterdir():
        p.unlink()
    index.rmdir()
    index.write_bytes(b"not a directory")


def _hostile_settings(index: Path) -> None:
    # diskcache would setattr() this onto the cache object and run it as a PRAGMA
    with sqlite3.connect(index / "cache.db") as con:
        con.execute("INSERT INTO Settings VALUES ('sqlite_writable_schema', 1)")
    con.close()


@pytest.mark.parametrize("damage", [_garbage, _truncated, _a_file, _hostile_settings])
async def test_a_corrupt_index_is_quarantined_and_rebuilt_from_the_blobs(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    store = await Store.open(tmp_path, CAP)
    good, rotten = payload(64 * KiB, seed=1), payload(64 * KiB, seed=2)
    for data in (good, rotten):
        await put(store, data)
    await store.close()
    writable(blob_path(tmp_path, rotten)).write_bytes(b"X" + rotten[1:])
    damage(tmp_path / "index")

    store = await Store.open(tmp_path, CAP)
    assert store.digests() == [digest_of(good)]  # re-hashed: adopted, rotten removed
    assert store.is_verified(digest_of(good))
    assert await read_all(store, digest_of(good)) == good
    await store.close()
    assert len(os.listdir(tmp_path / "quarantine")) == 1
    again = await Store.open(tmp_path, CAP)  # the rebuilt index is a good one
    assert again.digests() == [digest_of(good)] and again.startup_report["adopted"] == 0
    await again.close()


async def test_index_rows_cannot_run_code_or_remove_files(tmp_path: Path) -> None:
    store = await Store.open(tmp_path, CAP)
    good = payload(KiB)
    await put(store, good)
    await store.close()
    victim = tmp_path / "victim"
    victim.write_text("kept")
    evil = b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR."
    with sqlite3.connect(tmp_path / "index" / "cache.db") as con:
        con.execute("UPDATE Cache SET value = ? WHERE key = ?", (evil, digest_of(good).hex))
        con.execute(  # a row naming a file diskcache would remove with it
            "INSERT INTO Cache (key, raw, store_time, access_time, size, mode, filename, value) "
            "VALUES (?, 1, 0, 0, 0, 4, ?, NULL)",
            ("c" * 64, str(victim)),
        )
    con.close()

    store = await Store.open(tmp_path, CAP)
    assert store.digests() == [digest_of(good)]  # its row dropped, the file adopted again
    await store.close()
    assert not (tmp_path / "pwned").exists()
    assert victim.read_text() == "kept"


@pytest.mark.parametrize("name", ["tmp", "blobs", "blobs/sha256"])
@pytest.mark.parametrize("shape", ["file", "link"])
async def test_a_store_directory_replaced_by_a_file_or_link_is_made_again(
    tmp_path: Path, name: str, shape: str
) -> None:
    root, outside = tmp_path / "cache", tmp_path / "outside"
    store = await Store.open(root, CAP)
    await store.close()
    outside.mkdir()
    (outside / ("d" * 64)).write_bytes(b"outside")  # would look like a blob if followed
    path = root / name
    os.rename(path, tmp_path / "moved")
    if shape == "file":
        path.write_bytes(b"in the way")
    else:
        path.symlink_to(outside)

    store = await Store.open(root, CAP)
    assert store.digests() == [] and store.startup_report["layout_replaced"] == 1
    data = payload(KiB)
    await put(store, data)
    assert await read_all(store, digest_of(data)) == data
    await store.close()
    assert (root / name).is_dir() and not (root / name).is_symlink()
    assert os.listdir(outside) == ["d" * 64]

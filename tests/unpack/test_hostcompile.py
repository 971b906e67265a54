"""Bytecode made once per host: real unpacked trees, real runtimes, atomic swaps."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cachesvc.unpack.bytecode import CompileBudget, Runtime
from cachesvc.unpack.hostcompile import HostCompiler, check_module, plan
from cachesvc.unpack.unpacker import Unpacker, UnpackResult
from tests.archives import make_zip
from tests.pysources import package_files
from tests.servers import digest_of, eventually


@pytest.fixture
async def runtime() -> Runtime:
    return await Runtime.probe("python3.11", Path(sys.executable))


@pytest.fixture
async def unpacker(tmp_path: Path) -> AsyncIterator[Unpacker]:
    async with Unpacker(tmp_path / "code", workers=1) as unpacker:
        yield unpacker


async def unpacked(unpacker: Unpacker, files: dict[str, bytes], tmp: Path) -> UnpackResult:
    data = make_zip(files)
    digest = digest_of(data)
    path = tmp / f"{digest.hex}.zip"
    path.write_bytes(data)
    return await unpacker.unpack(digest, path)


def pycs_in(tree_fd: int) -> set[str]:
    """The pycs of one tree, walked from an open directory: never a mix of two trees."""
    return {
        os.path.join(top, name)
        for top, _dirs, names, _fd in os.fwalk(".", dir_fd=tree_fd)
        for name in names
        if name.endswith(".pyc")
    }


def test_plan_puts_the_hinted_modules_and_their_parents_first(
    tmp_path: Path, runtime: Runtime
) -> None:
    for rel, data in package_files(3, 3).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    first, rest = plan(tmp_path, [runtime], ["handler", "app.core"])
    assert first[runtime.name] == [
        "app/__init__.py", "app/core/__init__.py", "app/core/m0.py", "app/core/m1.py",
        "app/core/m2.py", "handler.py",
    ]  # fmt: skip
    assert rest[runtime.name] == ["app/broken.py", *(f"vendor/lib0/m{i}.py" for i in range(3))]
    (single,) = plan(tmp_path, [runtime], [])
    assert sorted(single[runtime.name]) == sorted(first[runtime.name] + rest[runtime.name])


def test_a_hint_must_be_a_module_name() -> None:
    assert check_module("sklearn.linear_model") == "sklearn.linear_model"
    for bad in ("../etc", "a..b", "a/b", "", "1abc", "a." * 40):
        with pytest.raises(ValueError):
            check_module(bad)


async def test_a_swapped_tree_matches_its_package_and_adds_only_pycs_of_its_sources(
    tmp_path: Path, unpacker: Unpacker, runtime: Runtime
) -> None:
    files = package_files(20, 20)
    result = await unpacked(unpacker, files, tmp_path)
    compiler = HostCompiler(unpacker.code_dir, [runtime], CompileBudget())
    compiler.schedule(result.digest, result.path, ["handler", "app.core"])
    await compiler.wait(result.digest)
    status = compiler.status(result.digest)
    assert status["state"] == "done" and status["swaps"] == 2
    assert status["runtimes"]["python3.11"]["skipped"] == 1  # app/broken.py
    found = {
        os.path.relpath(os.path.join(top, name), result.path)
        for top, _dirs, names in os.walk(result.path)
        for name in names
    }
    sources = [rel for rel in files if rel.endswith(".py") and rel != "app/broken.py"]
    assert found == set(files) | {runtime.pyc_of(rel) for rel in sources}
    for rel, data in files.items():
        assert (result.path / rel).read_bytes() == data
    for rel in sources:  # each pyc is of the very bytes beside it, made by this runtime
        pyc = (result.path / runtime.pyc_of(rel)).read_bytes()
        assert pyc[:4] == runtime.magic and pyc[4:8] == b"\x01\x00\x00\x00"
        assert pyc[8:16] == importlib.util.source_hash(files[rel])
    assert await unpacker.unpack(result.digest, tmp_path / "unused") == result  # manifest holds
    assert not [p for p in unpacker.code_dir.iterdir() if p.name.startswith(".tmp-")]
    await compiler.aclose()


async def test_a_served_tree_is_never_visible_half_compiled(
    tmp_path: Path, unpacker: Unpacker, runtime: Runtime
) -> None:
    files = package_files(150, 250)
    result = await unpacked(unpacker, files, tmp_path)
    held = os.open(result.path / "app/core/m7.py", os.O_RDONLY)
    compiler = HostCompiler(unpacker.code_dir, [runtime], CompileBudget())
    compiler.schedule(result.digest, result.path, ["app.core"])
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        """Count the pycs of the served tree; a sample counts only when the tree walked
        was the served one from start to end (a tree swapped out is then removed)."""
        while not stop.is_set():
            fd = os.open(result.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                count = len(pycs_in(fd))
                if os.stat(result.path).st_ino == os.fstat(fd).st_ino:
                    seen.add(count)
            except OSError:  # the walk met the removal of a tree swapped out
                pass
            finally:
                os.close(fd)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        await compiler.wait(result.digest)
    finally:
        stop.set()
        await asyncio.to_thread(watcher.join)
    hinted = 152  # app/__init__, app/core/__init__ and 150 modules
    everything = hinted + 250 + 1  # and handler.py
    assert seen <= {0, hinted, everything} and everything in seen
    # A runtime holding a file of the old tree reads on, the same inode as the new one.
    assert os.pread(held, 100, 0) == files["app/core/m7.py"]
    assert os.fstat(held).st_ino == os.stat(result.path / "app/core/m7.py").st_ino
    os.close(held)
    await compiler.aclose()


async def test_a_cancelled_compile_leaves_the_served_tree_and_no_copy(
    tmp_path: Path, unpacker: Unpacker, runtime: Runtime
) -> None:
    files = package_files(150, 250)
    result = await unpacked(unpacker, files, tmp_path)
    compiler = HostCompiler(unpacker.code_dir, [runtime], CompileBudget())
    compiler.schedule(result.digest, result.path)
    compiling = lambda: compiler.status(result.digest)["state"] == "compiling"  # noqa: E731
    await eventually(compiling, "the compile started")
    compiler.cancel(result.digest)  # as an eviction does
    await compiler.aclose()
    assert compiler.status(result.digest)["state"] == "none"
    assert [p.name for p in unpacker.code_dir.iterdir() if p.name.startswith(".tmp-")] == []
    assert (result.path / "handler.py").read_bytes() == files["handler.py"]


async def test_published_bytecode_is_left_alone(
    tmp_path: Path, unpacker: Unpacker, runtime: Runtime
) -> None:
    files = {"handler.py": b"X = 1\n", f"__pycache__/handler.{runtime.cache_tag}.pyc": b"ours"}
    result = await unpacked(unpacker, files, tmp_path)
    compiler = HostCompiler(unpacker.code_dir, [runtime], CompileBudget())
    compiler.schedule(result.digest, result.path)
    await compiler.wait(result.digest)
    assert compiler.status(result.digest)["swaps"] == 0
    assert (result.path / runtime.pyc_of("handler.py")).read_bytes() == b"ours"
    await compiler.aclose()


async def test_a_tree_evicted_during_its_compile_is_not_brought_back(
    tmp_path: Path, unpacker: Unpacker, runtime: Runtime
) -> None:
    result = await unpacked(unpacker, package_files(150, 250), tmp_path)
    compiler = HostCompiler(unpacker.code_dir, [runtime], CompileBudget())
    compiler.schedule(result.digest, result.path)
    await unpacker.remove(result.digest)  # the exchange finds no tree: the copy is dropped
    await compiler.wait(result.digest)
    assert not result.path.exists()
    assert [p.name for p in unpacker.code_dir.iterdir()] == []
    await compiler.aclose()
